"""The train data stream resumes from saved iterator state, at a cost independent of the step."""

import os
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy_tasks  # noqa: E402

from gqa_t5x.training import data_stream  # noqa: E402

TASK = toy_tasks.register()
B = 8


@pytest.fixture
def produced(monkeypatch):
    """Counts the packed examples the pipeline produces (skipped ones included)."""
    count = tf.Variable(0, dtype=tf.int64)
    get_dataset = seqio.get_dataset

    def counting(*args, **kw):
        def tick(ex):
            count.assign_add(1)
            return ex
        options = tf.data.Options()  # the counter is not part of the saved stream
        options.experimental_external_state_policy = \
            tf.data.experimental.ExternalStatePolicy.IGNORE
        return get_dataset(*args, **kw).map(tick).with_options(options)

    monkeypatch.setattr(data_stream.seqio, "get_dataset", counting)
    return count


def _stream(skip=0):
    return data_stream.train_batches(TASK, toy_tasks.LENGTHS, B, shuffle_seed=3,
                                     skip_examples=skip)


def _resume(model_dir, steps, produced, *, restore):
    """(batch after `steps` batches, packed examples produced to resume and yield it)."""
    first = _stream()
    rows = [next(first) for _ in range(steps)]
    first.save(str(model_dir), steps)
    want = next(first)
    del first, rows  # stops its prefetching before the count starts
    produced.assign(0)
    if restore:
        resumed = _stream()
        assert resumed.restore(str(model_dir), steps)
    else:
        resumed = _stream(skip=steps * B)
    got = next(resumed)
    return got, want, int(produced.numpy())


def test_resume_continues_the_stream_at_a_cost_independent_of_the_step(tmp_path, produced):
    costs = {}
    for steps in (40, 80):
        got, want, costs[steps] = _resume(tmp_path, steps, produced, restore=True)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # A resume regenerates at most the batches in flight (prefetch), not the 40 x 8 rows (at
    # least 320 packed examples) between the two steps.
    assert costs[80] < costs[40] + 160, costs


def test_skipping_fallback_gives_the_same_batch_at_a_cost_that_grows(tmp_path, produced):
    """The reference of the test above: replaying the stream gives the same batch, and the
    counter sees the replayed examples."""
    costs = {}
    for steps in (40, 80):
        got, want, costs[steps] = _resume(tmp_path, steps, produced, restore=False)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # 40 batches more (320 packed examples), less what the earlier stream's prefetching may
    # still count after the counter is reset
    assert costs[80] >= costs[40] + 30 * B, costs


def test_restore_says_when_there_is_no_state(tmp_path):
    assert not _stream().restore(str(tmp_path), 10)


def test_a_changed_stream_setting_is_refused_with_its_macro():
    saved = {"task": "a", "batch_size": 8, "shuffle_seed": 0}
    data_stream.check_same_stream(saved, dict(saved), "/m")
    with pytest.raises(ValueError, match=r"batch_size=8 \(BATCH_SIZE\).*batch_size=16"):
        data_stream.check_same_stream(saved, {**saved, "batch_size": 16}, "/m")
    with pytest.raises(ValueError, match=r"shuffle_seed=0 \(SHUFFLE_SEED\)"):
        data_stream.check_same_stream(saved, {**saved, "shuffle_seed": 1}, "/m")
    with pytest.raises(ValueError, match=r"task='a' \(MIXTURE_OR_TASK_NAME\)"):
        data_stream.check_same_stream(saved, {**saved, "task": "b"}, "/m")


def test_a_stream_tf_data_cannot_serialize_is_not_saved_and_resume_skips(tmp_path, capfd):
    """A pipeline with a stateful op (the synthetic suite's tf.py_function generators) cannot be
    serialized: save says so (tf.data's own C++ log of the refusal is held back), writes nothing,
    and restore then finds no state."""
    ds = tf.data.Dataset.range(100).map(
        lambda x: tf.py_function(lambda v: v * 2, [x], tf.int64)).batch(4)
    batches = data_stream.TrainBatches(ds)
    next(batches)
    capfd.readouterr()
    assert batches.save(str(tmp_path), 1) is False
    assert "stateful" not in capfd.readouterr().err
    assert not os.path.exists(data_stream.step_dir(str(tmp_path), 1)) or not os.listdir(
        data_stream.step_dir(str(tmp_path), 1))
    assert not batches.restore(str(tmp_path), 1)
    assert batches.save(str(tmp_path), 2) is False  # not tried again
