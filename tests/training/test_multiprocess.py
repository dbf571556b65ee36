"""Two processes on localhost (`jax.distributed`, two CPU devices each) train like one process
with four devices, when one model replica spans both processes (model_parallel=4) and when each
process holds its own replica (model_parallel=2).

With model_parallel=4 both processes hold the one replica, so both read the whole (unsharded)
data; with model_parallel=2 each reads its own seqio shard and feeds its half of the global batch.
The reference is one process with four devices fed the same global batches (for
model_parallel=2: shard 0's rows, then shard 1's). The two-process runs are interrupted and
resumed, so the per-shard data order on resume is covered.
"""

import os
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import toy_tasks

from gqa_t5x.training import partitioning, run_log, train_state

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # toy_tasks.py
ROOT = os.path.dirname(TESTS)
CACHE_ENV = toy_tasks.enable_compilation_cache()
BATCH = 8
MODEL_PARALLEL = (4, 2)

_WORKER = """
import sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
import seqio
import toy_tasks
from gqa_t5x.training import models
from gqa_t5x.training import optim
from gqa_t5x.training import partitioning
from gqa_t5x.training import train
from gqa_t5x.model.config import get_config

model_dir, steps, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if process_id >= 0:
    partitioning.initialize_distributed({address!r}, 2, process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
else:
    assert jax.process_count() == 1 and jax.device_count() == 4, jax.devices()
toy_tasks.register()
config = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1,
                    num_decoder_layers=1, num_kv_heads=2, dropout_rate=0.1)
original = train.train_dataset


def two_shards(name, feature_lengths, batch_size, *, skip_examples, shard_info, **kw):
    # What two processes with one replica each feed together: shard 0's rows, then shard 1's.
    assert shard_info is None
    streams = [original(name, feature_lengths, batch_size // 2, skip_examples=skip_examples // 2,
                        shard_info=seqio.ShardInfo(index=i, num_shards=2), **kw)
               for i in range(2)]
    return Joined(streams)


class Joined:
    # Saves no iterator state, so the resumed reference regenerates and skips its stream: the
    # processes' restored iterators are checked against that.
    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(s) for s in self.streams]
        return {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}

    def save(self, model_dir, step):
        pass

    def restore(self, model_dir, step):
        return False


for mp in {model_parallel}:
    layout = partitioning.data_layout(partitioning.create_mesh(mp), {batch})
    print("PROCESS", jax.process_index(), "MP", mp, "SHARD", layout.shard_id, "OF",
          layout.num_shards)
    train.train_dataset = two_shards if process_id < 0 and mp == 2 else original
    result = train.train(f"{{model_dir}}/mp{{mp}}", mixture_or_task_name=toy_tasks.NAME,
                         task_feature_lengths=toy_tasks.LENGTHS, batch_size={batch},
                         train_steps=steps, model=models.build_model(config),
                         schedule=optim.constant_schedule(1e-2), model_parallel=mp,
                         checkpoint_every=10, log_every=5)
    print("PROCESS", jax.process_index(), "MP", mp, "STEP", result.step)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(model_dir, steps, process_ids, devices_per_process):
    """Runs the worker once per process id (-1: a single process without jax.distributed)."""
    script = _WORKER.format(tests=TESTS, address=f"localhost:{_free_port()}", batch=BATCH,
                            model_parallel=MODEL_PARALLEL)
    env = dict(os.environ, PYTHONPATH=ROOT, **CACHE_ENV,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    # Output goes to files, not pipes: a process blocked on a full pipe that nobody reads would
    # stall the other at jax.distributed's shutdown barrier.
    logs = [(model_dir.parent / f"{model_dir.name}_{steps}_{i}.out",
             model_dir.parent / f"{model_dir.name}_{steps}_{i}.err") for i in process_ids]
    procs = []
    for i, (out, err) in zip(process_ids, logs):
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", script, str(model_dir), str(steps), str(i)],
                env=env, stdout=o, stderr=e, text=True))
    for p in procs:
        try:
            p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err.read_text()[-3000:]
    return [out.read_text() for out, _ in logs]


@pytest.mark.slow
def test_two_processes_equal_one_process_fed_the_same_batches(tmp_path):
    two = tmp_path / "two"
    first = _run(two, 10, (0, 1), 2)
    # One replica over both hosts: one shard, both read it. One replica per host: two shards.
    for i, out in enumerate(first):
        assert f"PROCESS {i} MP 4 SHARD 0 OF 1" in out, out
        assert f"PROCESS {i} MP 2 SHARD {i} OF 2" in out, out
        assert f"PROCESS {i} MP 4 STEP 10" in out and f"PROCESS {i} MP 2 STEP 10" in out
    resumed = _run(two, 20, (0, 1), 2)  # resumes from checkpoint_10
    assert resumed[0].count("resuming from") == 2, resumed[0]
    one = tmp_path / "one"
    _run(one, 20, (-1,), 4)

    for mp in MODEL_PARALLEL:
        # Only process 0 logs: one record per logged step.
        steps = [r["step"] for r in run_log.read_metrics(str(two / f"mp{mp}")) if "loss" in r]
        assert steps == [5, 10, 15, 20], (mp, steps)
        a = train_state.read_train_checkpoint(str(two / f"mp{mp}" / "checkpoint_20"))[0]
        b = train_state.read_train_checkpoint(str(one / f"mp{mp}" / "checkpoint_20"))[0]
        jax.tree_util.tree_map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
        losses = {d: [r["loss"] for r in run_log.read_metrics(str(d / f"mp{mp}")) if "loss" in r]
                  for d in (one, two)}
        np.testing.assert_allclose(losses[two], losses[one], rtol=1e-5)


# ---- the layout from the mesh, by hand ----------------------------------------------------------


def _mesh(processes: int, devices_per_process: int, model_parallel: int):
    """A stand-in mesh: devices in process order, reshaped to [data, model] as create_mesh does
    on CPU and GPU."""
    devices = [types.SimpleNamespace(process_index=p) for p in range(processes)
               for _ in range(devices_per_process)]
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    grid = grid.reshape(-1, model_parallel)
    return types.SimpleNamespace(devices=grid, shape={"data": grid.shape[0],
                                                      "model": model_parallel})


def _layouts(processes, devices_per_process, model_parallel, batch):
    mesh = _mesh(processes, devices_per_process, model_parallel)
    return [(lay.shard_id, lay.num_shards, lay.first_row, lay.per_host_batch_size)
            for lay in (partitioning.data_layout(mesh, batch, p) for p in range(processes))]


def test_data_layout_per_replica():
    # XXL's setup: 8-way model parallel on 4-device hosts; 4 hosts = 2 replicas of 2 hosts each.
    assert _layouts(4, 4, 8, 16) == [(0, 2, 0, 8), (0, 2, 0, 8), (1, 2, 8, 8), (1, 2, 8, 8)]
    # One replica per host and two replicas per host: one shard per host.
    assert _layouts(2, 2, 2, 8) == [(0, 2, 0, 4), (1, 2, 4, 4)]
    assert _layouts(2, 4, 2, 8) == [(0, 2, 0, 4), (1, 2, 4, 4)]
    # One replica over all hosts: everyone feeds the whole batch.
    assert _layouts(2, 2, 4, 8) == [(0, 1, 0, 8), (0, 1, 0, 8)]


def test_data_layout_refuses_a_replica_split_unevenly():
    # 3 devices per host, model_parallel 2: host 1 holds half of replica 1 and half of replica 2.
    with pytest.raises(ValueError, match=r"data-axis rows \[\(0, 1\), \(1, 2\)\]"):
        partitioning.data_layout(_mesh(2, 3, 2), 6, 0)
