"""The train data stream and its checkpoints: resume without replaying the stream.

The stream (`train_batches`) is seqio's train split, shuffled with `shuffle_seed`, repeated,
packed and batched. Its position is saved with every train-state checkpoint as tf.data iterator
state (`tf.train.Checkpoint(iterator=...)`, as t5x's `checkpoint_dataset_iterator`): the
shuffle buffer, the packer's pending examples and the source offsets, so a resumed run continues
with the next batch of the interrupted one at a cost independent of the step. Each process saves
its own iterator, t5x's naming:

  MODEL_DIR/train_ds/checkpoint_<step>/train_ds-<process>-of-<processes>.{index,data-*}

A checkpoint without iterator state (written before iterator checkpointing, or by a run with
another number of processes) falls back to regenerating the stream and skipping the examples
already seen: the same batches, at a cost that grows with the step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import jax
import seqio
import tensorflow as tf

from gqa_t5x import native_stderr
from gqa_t5x.data.registry import get_mixture_or_task

ITERATOR_DIR = "train_ds"
# What the saved stream depends on: a resume that changes one of them is refused. (run info key,
# the gin macro that sets it)
STREAM_SETTINGS = (("task", "MIXTURE_OR_TASK_NAME"), ("batch_size", "BATCH_SIZE"),
                   ("shuffle_seed", "SHUFFLE_SEED"))


def check_same_stream(saved: Mapping, current: Mapping, model_dir: str) -> None:
    """Refuses to resume the run in `model_dir` (run info `saved`) with other data settings."""
    for key, macro in STREAM_SETTINGS:
        if key in saved and saved[key] != current[key]:
            raise ValueError(
                f"MODEL_DIR {model_dir} was trained with {key}={saved[key]!r} ({macro}) but this "
                f"run has {key}={current[key]!r}; its data stream cannot continue with another "
                f"{key}: set {macro} back to {saved[key]!r}, or use another MODEL_DIR")


def _process_name() -> str:
    return f"train_ds-{jax.process_index()}-of-{jax.process_count()}"


def step_dir(model_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(model_dir), ITERATOR_DIR, f"checkpoint_{step}")


class TrainBatches:
    """An iterator of numpy batches over a tf.data dataset, whose position can be saved."""

    def __init__(self, ds: tf.data.Dataset):
        self._iterator = iter(ds)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self.saveable = True  # False once tf.data has refused to serialize the pipeline

    def __iter__(self):
        return self

    def __next__(self):
        return jax.tree_util.tree_map(lambda t: t.numpy(), next(self._iterator))

    def save(self, model_dir: str, step: int) -> bool:
        """Writes this process's iterator state for train-state checkpoint `step` (complete or
        absent: written under a temporary name, then renamed). False when the pipeline cannot
        be saved: tf.data refuses to serialize stateful ops such as `tf.py_function` (the
        synthetic suite's generators), and a resume then regenerates the stream and skips."""
        if not self.saveable:
            return False
        final = os.path.join(step_dir(model_dir, step), _process_name())
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with native_stderr.held() as output:  # tf.data's C++ log of the refusal
            try:
                self._checkpoint.write(os.path.join(tmp, "iterator"))
            except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError):
                output.drop()  # the refusal, said once by the caller
                shutil.rmtree(tmp, ignore_errors=True)
                self.saveable = False
                return False
        shutil.rmtree(final, ignore_errors=True)  # a step saved again after a failed run
        os.rename(tmp, final)
        return True

    def restore(self, model_dir: str, step: int) -> bool:
        """Moves the iterator to where checkpoint `step` left it; False if it holds no state for
        this process."""
        path = os.path.join(step_dir(model_dir, step), _process_name())
        if not os.path.isdir(path):
            return False
        self._checkpoint.read(os.path.join(path, "iterator")).assert_consumed()
        return True


def prune(model_dir: str, keep_steps) -> None:
    """Removes iterator states of train-state checkpoints that are gone (process 0 only)."""
    root = os.path.join(os.path.abspath(model_dir), ITERATOR_DIR)
    if jax.process_index() != 0 or not os.path.isdir(root):
        return
    keep = {f"checkpoint_{s}" for s in keep_steps}
    for name in os.listdir(root):
        if name.startswith("checkpoint_") and name not in keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def train_batches(name: str, feature_lengths: Mapping[str, int], batch_size: int, *,
                  shuffle_seed: int, pack: bool = True, skip_examples: int = 0,
                  shard_info: seqio.ShardInfo | None = None,
                  use_cached: bool = False) -> TrainBatches:
    """Batches of model features (numpy) of the train split, repeated forever.

    The stream is a pure function of the arguments: shuffled with `shuffle_seed`, then
    `skip_examples` (packed) examples dropped (the fallback resume), then batched.
    """
    get_mixture_or_task(name)
    ds = seqio.get_dataset(
        name, task_feature_lengths=dict(feature_lengths),
        feature_converter=seqio.EncDecFeatureConverter(pack=pack), dataset_split="train",
        use_cached=use_cached, shuffle=True, num_epochs=None, shard_info=shard_info,
        seed=shuffle_seed, verbose=False)
    if skip_examples:
        ds = ds.skip(skip_examples)
    return TrainBatches(ds.batch(batch_size, drop_remainder=True).prefetch(2))
