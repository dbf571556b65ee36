# Everything installs into .venv. torch comes first and pinned: an unpinned torch (pulled in by
# transformers) would be a multi-GB CUDA build; 2.13.0 is a CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gqa-demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check gqa_t5x tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
