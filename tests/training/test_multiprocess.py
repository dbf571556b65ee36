"""Two processes on localhost (`jax.distributed`, one CPU device each) train like one process.

Each process reads its own shard of the data (seqio ShardInfo) and feeds its half of the global
batch; the reference is this (one-device) process fed the same global batches (shard 0's rows,
then shard 1's). The two-process run is also interrupted and resumed, so per-host data order on
resume is covered.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
import toy_tasks

from gqa_t5x.model.config import get_config
from gqa_t5x.training import models, optim, run_log, train, train_state

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # toy_tasks.py
ROOT = os.path.dirname(TESTS)
TASK = toy_tasks.register()
CACHE_ENV = toy_tasks.enable_compilation_cache()
BATCH = 8


def _config():
    return get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1,
                      num_decoder_layers=1, num_kv_heads=2, dropout_rate=0.1)


_WORKER = """
import sys
sys.path.insert(0, {tests!r})
import jax
import toy_tasks
from gqa_t5x.training import models
from gqa_t5x.training import optim
from gqa_t5x.training import partitioning
from gqa_t5x.training import train
from gqa_t5x.model.config import get_config

partitioning.initialize_distributed({address!r}, 2, {process_id})
assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
toy_tasks.register()
config = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1,
                    num_decoder_layers=1, num_kv_heads=2, dropout_rate=0.1)
result = train.train(sys.argv[1], mixture_or_task_name=toy_tasks.NAME,
                     task_feature_lengths=toy_tasks.LENGTHS, batch_size={batch},
                     train_steps=int(sys.argv[2]), model=models.build_model(config),
                     schedule=optim.constant_schedule(1e-2), checkpoint_every=10, log_every=5)
print("PROCESS", jax.process_index(), "STEP", result.step, "LOSS", result.train_metrics["loss"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(model_dir, steps):
    address = f"localhost:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=ROOT, **CACHE_ENV)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER.format(tests=TESTS, address=address, process_id=i,
                                              batch=BATCH), str(model_dir), str(steps)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


train_dataset = train.train_dataset  # the original, kept before the test patches it


def _sharded_batches(name, feature_lengths, batch_size, *, skip_examples, **kw):
    """What the two processes feed together: shard 0's rows then shard 1's, each process reading
    `batch_size` rows of its shard and skipping its own share of the examples seen."""
    kw.pop("shard_info")
    streams = [train_dataset(name, feature_lengths, batch_size // 2,
                             skip_examples=skip_examples // 2,
                             shard_info=seqio.ShardInfo(index=i, num_shards=2), **kw)
               for i in range(2)]
    for parts in zip(*streams):
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.slow
def test_two_processes_equal_one_process_fed_the_same_batches(tmp_path, monkeypatch):
    two = tmp_path / "two"
    first = _run_two_processes(two, 10)
    assert "PROCESS 0 STEP 10" in first[0] and "PROCESS 1 STEP 10" in first[1]
    resumed = _run_two_processes(two, 20)  # resumes from checkpoint_10
    assert "resuming from" in resumed[0]
    assert "PROCESS 0 STEP 20" in resumed[0] and "PROCESS 1 STEP 20" in resumed[1]
    # Only process 0 logs: one record per logged step.
    steps = [r["step"] for r in run_log.read_metrics(str(two)) if "loss" in r]
    assert steps == [5, 10, 15, 20], steps

    assert jax.device_count() == 1  # the reference: this process, its one device
    monkeypatch.setattr(train, "train_dataset", _sharded_batches)
    one = tmp_path / "one"
    train.train(str(one), mixture_or_task_name=TASK, task_feature_lengths=toy_tasks.LENGTHS,
                batch_size=BATCH, train_steps=20, model=models.build_model(_config()),
                schedule=optim.constant_schedule(1e-2), checkpoint_every=10, log_every=5)
    a = train_state.read_train_checkpoint(str(two / "checkpoint_20"))[0]
    b = train_state.read_train_checkpoint(str(one / "checkpoint_20"))[0]
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    losses = {d: [r["loss"] for r in run_log.read_metrics(str(d)) if "loss" in r]
              for d in (one, two)}
    np.testing.assert_allclose(losses[two], losses[one], rtol=1e-5)
