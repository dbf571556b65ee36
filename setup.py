"""gqa-t5x: grouped-query attention for T5.1.1 encoder-decoders in JAX/Flax."""

import setuptools

setuptools.setup(
    name="gqa-t5x",
    version="0.1.0",
    description=(
        "Grouped-query (GQA) and multi-query (MQA) attention for T5.1.1 in JAX/Flax: "
        "checkpoint conversion, uptraining, fine-tuning, evaluation and decode benchmarks."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["gqa_t5x", "gqa_t5x.*"]),
    package_data={
        "gqa_t5x": ["gin/*/*.gin", "configs/*.toml"],  # configs: the top-level folder
        "gqa_t5x.kernels": ["csrc/*.cc", "csrc/*.h"],  # compiled on first use
    },
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26",
        "jax>=0.4.30",
        "jaxlib>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.6.0",
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
        "test": ["pytest>=7.4", "ruff>=0.4", "transformers>=4.40"],
    },
    entry_points={
        "console_scripts": [
            "gqa-demo=gqa_t5x.cli.demo:main",
            "gqa-convert=gqa_t5x.cli.convert:main",
            "gqa-bench=gqa_t5x.cli.bench:main",
            "gqa-train=gqa_t5x.cli.run:train_main",
            "gqa-eval=gqa_t5x.cli.run:eval_main",
            "gqa-infer=gqa_t5x.cli.run:infer_main",
        ],
    },
)
