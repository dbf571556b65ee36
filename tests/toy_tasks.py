"""Small seqio tasks over integer tokens for the training tests (no vocabulary to train).

`toy_reverse`: inputs are 3-8 random ids in [3, 40), targets the same ids reversed. The
metric `sequence_accuracy` is the percentage of exactly reproduced target sequences.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import numpy as np
import seqio
import tensorflow as tf

VOCAB_SIZE = 48
NAME = "toy_reverse"
LENGTHS = {"inputs": 10, "targets": 10}


def _examples(split: str, shuffle_files: bool = False, seed: int | None = None, *, num: int):
    del shuffle_files, seed
    rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
    rows = []
    for _ in range(num if split == "train" else 16):
        n = int(rng.integers(3, 9))
        x = rng.integers(3, 40, size=n).astype(np.int32)
        rows.append((x, x[::-1].copy()))
    inputs = tf.ragged.constant([r[0] for r in rows], dtype=tf.int32)
    targets = tf.ragged.constant([r[1] for r in rows], dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets}).map(
        lambda ex: {k: v for k, v in ex.items()})


def sequence_accuracy(targets, predictions):
    hits = [list(t) == list(p) for t, p in zip(targets, predictions)]
    return {"sequence_accuracy": 100.0 * float(np.mean(hits))}


def register(name: str = NAME, num_train: int = 512, metric_fns=(sequence_accuracy,)) -> str:
    """Registers (or replaces) the toy task `name`; returns the name."""
    vocabulary = seqio.PassThroughVocabulary(size=VOCAB_SIZE, eos_id=1)
    features = {k: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
                for k in ("inputs", "targets")}
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_examples, num=num_train),
                                        splits=("train", "validation", "test")),
        preprocessors=[functools.partial(_to_dense), seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=list(metric_fns),
    )
    return name


@seqio.map_over_dataset
def _to_dense(ex):
    return {k: v.to_tensor() if isinstance(v, tf.RaggedTensor) else v for k, v in ex.items()}


CACHE_DIR = os.path.join(tempfile.gettempdir(), "gqa_t5x_tests_jax_cache")


def enable_compilation_cache() -> dict[str, str]:
    """Turns on JAX's persistent compilation cache, so that the many short runs of the tests
    compile each program once; returns the environment variables that do the same for
    subprocesses."""
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
