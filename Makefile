# Everything installs into .venv. torch comes first, pinned, as its CPU build: on Linux, PyPI's
# torch wheels are CUDA builds that pull in several GB of nvidia-* packages, and the CPU build
# (version "+cpu") is on PyTorch's own index (TORCH_INDEX; empty: the configured indexes only).
# macOS wheels on PyPI are CPU builds already.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(shell uname -s),Linux)
TORCH := torch==$(TORCH_VERSION)+cpu
else
TORCH := torch==$(TORCH_VERSION)
endif

.PHONY: install reproduce demo test test-fast lint bench clean

$(VENV)/.installed: setup.py constraints.txt
	@echo "== make install: virtual environment $(VENV)"
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	@echo "== make install: $(TORCH) (CPU build)"
	$(PIP) install --progress-bar off $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) '$(TORCH)'
	@echo "== make install: gqa_t5x and its dependencies (constraints.txt)"
	$(PIP) install --progress-bar off -c constraints.txt -e '.[test]'
	touch $@
	@echo "== make install: done ($(VENV))"

install: $(VENV)/.installed

# The paper's experiments at CPU scale on the embedded synthetic suite; rerun to resume.
REPRODUCE_OUT ?= reproduce_out
reproduce: install
	$(VENV)/bin/gqa-reproduce --out $(REPRODUCE_OUT) $(REPRODUCE_FLAGS)

demo: install
	$(VENV)/bin/gqa-demo

# Tests run in TEST_WORKERS processes (pytest-xdist; 0 runs them in this one).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: install
	$(VENV)/bin/ruff check gqa_t5x tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
