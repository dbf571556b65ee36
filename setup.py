"""gqa-t5x: grouped-query attention for T5.1.1 encoder-decoders in JAX/Flax."""

import re

import setuptools

with open("gqa_t5x/__init__.py", encoding="utf-8") as f:  # one version: gqa_t5x.__version__
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setuptools.setup(
    name="gqa-t5x",
    version=VERSION,
    description=(
        "Grouped-query (GQA) and multi-query (MQA) attention for T5.1.1 in JAX/Flax: "
        "checkpoint conversion, uptraining, fine-tuning, evaluation and decode benchmarks."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["gqa_t5x", "gqa_t5x.*"]),
    package_data={
        # gqa_t5x/configs links to the top-level configs/; the wheel gets the files themselves.
        "gqa_t5x": ["gin/**/*.gin", "configs/*.toml"],
        "gqa_t5x.kernels": ["csrc/*"],  # compiled on first use
    },
    # The floors are the oldest releases the tests were run on: jax.set_mesh is new in jax 0.7.1
    # (the public jax.ffi is older), and jax 0.7 needs Python 3.11.
    python_requires=">=3.11",
    install_requires=[
        "numpy>=1.26",
        "jax>=0.7.1",
        "jaxlib>=0.7.1",
        "flax>=0.11.2",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.24",
        "tensorstore>=0.1.60",
        "msgpack>=1.0",
        "safetensors>=0.4",
        "gin-config>=0.5.0",
        "seqio>=0.0.19",
        "tensorflow>=2.16",
        "tensorflow-text>=2.16",
        "tensorflow-datasets>=4.9.4",
        "sentencepiece>=0.1.99",
        "rouge-score>=0.1.2",
        "sacrebleu>=2.3",
        "nltk>=3.8",
        "matplotlib>=3.7",
        "tensorboard>=2.16",
        "psutil>=5.9",
        "absl-py>=1.4",
    ],
    extras_require={
        # torch must be installed first (pinned, CPU build): see the Makefile.
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "ruff>=0.4", "transformers>=4.40"],
    },
    entry_points={
        "console_scripts": [
            "gqa-demo=gqa_t5x.cli.demo:main",
            "gqa-convert=gqa_t5x.cli.convert:main",
            "gqa-bench=gqa_t5x.cli.bench:main",
            "gqa-train=gqa_t5x.cli.run:train_main",
            "gqa-eval=gqa_t5x.cli.run:eval_main",
            "gqa-infer=gqa_t5x.cli.run:infer_main",
            "gqa-reproduce=gqa_t5x.cli.reproduce:main",
            "gqa-plan=gqa_t5x.cli.plan:main",
        ],
    },
)
