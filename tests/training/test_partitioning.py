"""Mesh, logical axis rules with fallback to replication, sharded state, 8 devices == 1 device."""

import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import toy_tasks
from jax.sharding import PartitionSpec as P

from gqa_t5x.model.config import get_config
from gqa_t5x.training import models, optim, partitioning, train, train_state

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # toy_tasks.py
ROOT = os.path.dirname(TESTS)
TASK = toy_tasks.register()
CACHE_ENV = toy_tasks.enable_compilation_cache()


def _fake_mesh(data, model):
    """Only `.shape` (and `.devices.size`) are read by the rules code."""
    return types.SimpleNamespace(shape={"data": data, "model": model},
                                 devices=np.zeros((data, model)))


def test_rules_map_logical_axes():
    mesh = _fake_mesh(1, 8)
    assert partitioning.mesh_axes(("embed", "mlp"), (512, 1024), mesh) == P(None, "model")
    assert partitioning.mesh_axes(("vocab", "embed"), (32128, 512), mesh) == P("model", None)
    assert partitioning.mesh_axes(("joined_kv", "embed"), (384, 512), mesh) == P("model", None)
    assert partitioning.mesh_axes(("heads", "relpos_buckets"), (8, 32), mesh) == P("model", None)


def test_indivisible_dimension_falls_back_to_replication():
    # An MLP of 1000 units does not divide over model=3: replicated.
    assert partitioning.mesh_axes(("embed", "mlp"), (512, 1000), _fake_mesh(1, 3)) == \
        P(None, None)
    # T5.1.1-small's 6 heads do not divide over 8: relpos bias replicated.
    assert partitioning.mesh_axes(("heads", "relpos_buckets"), (6, 32), _fake_mesh(1, 8)) == \
        P(None, None)


def test_heads_are_sharded_whole_or_replicated():
    # A key kernel [D, K*H] = [512, 2 * 64]: 128 columns divide over model=8, but 2 kv heads do
    # not, so the kernel is replicated rather than split inside a head.
    rules = partitioning.rules_for(get_config("t5_1_1_small", num_kv_heads=2), _fake_mesh(1, 8))
    assert partitioning.mesh_axes(("embed", "kv_joined"), (512, 128), _fake_mesh(1, 8), rules) \
        == P(None, None)
    rules = partitioning.rules_for(get_config("t5_1_1_base", num_kv_heads=4), _fake_mesh(1, 4))
    assert partitioning.mesh_axes(("embed", "kv_joined"), (768, 256), _fake_mesh(1, 4), rules) \
        == P(None, "model")
    assert partitioning.mesh_axes(("batch", "kv_heads", "length", "head_dim"), (8, 4, 16, 64),
                                  _fake_mesh(2, 4), rules) == P("data", "model", None, None)


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("a", "model"), ("b", "model"))
    assert partitioning.mesh_axes(("a", "b"), (8, 8), _fake_mesh(1, 4), rules) == \
        P("model", None)


def test_param_specs_of_an_mqa_small_model_on_model_8():
    config = get_config("t5_1_1_small", num_kv_heads=1)
    model = models.build_model(config)
    abstract = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}))
    mesh = _fake_mesh(1, 8)
    specs = partitioning.param_specs(abstract["params"], abstract["params_axes"], mesh,
                                     partitioning.rules_for(config, mesh))
    dec = ("decoder", "layers_0")
    assert specs[dec + ("self_attention", "key", "kernel")] == P(None, None)  # [512, 64], K=1
    # 6 query heads [512, 6 * 64] do not divide over 8 either: replicated, not split in heads.
    assert specs[dec + ("self_attention", "query", "kernel")] == P(None, None)
    assert specs[dec + ("mlp", "wi_0", "kernel")] == P(None, "model")  # [512, 1024]
    assert specs[("encoder", "layers_0", "attention", "key", "kernel")] == P(None, None)
    assert specs[("decoder", "relpos_bias", "rel_embedding")] == P(None, None)  # 6 heads
    assert specs[("token_embedder", "embedding")] == P("model", None)
    assert specs[("decoder", "decoder_norm", "scale")] == P(None)


def test_optimizer_state_follows_params_and_factored_stats_replicate():
    mesh = partitioning.create_mesh(1)
    model = models.build_model(get_config("tiny", emb_dim=128, mlp_dim=256))
    tx = optim.adafactor()
    state, shardings = train_state.create_train_state(
        model, tx, mesh, {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}, 0)
    adafactor_state = shardings.opt_state[0]
    wi = ("encoder", "layers_0", "mlp", "wi_0", "kernel")  # [128, 256]: factored

    def get(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    assert get(shardings.params, wi).spec == P(None, "model")
    assert get(adafactor_state.v_row, wi).spec == P()
    assert get(adafactor_state.v_col, wi).spec == P()
    scale = ("encoder", "encoder_norm", "scale")  # [128]: not factored, `v` like the param
    assert get(adafactor_state.v, scale).spec == get(shardings.params, scale).spec
    assert int(state.step) == 0


def test_batch_not_divisible_by_data_axis():
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the mesh's data "
                                         r"axis \(4 = 8 devices / model_parallel 2\); choose a "
                                         r"multiple of 4"):
        partitioning.check_batch_size(6, _fake_mesh(4, 2))


def test_model_parallel_must_divide_devices():
    with pytest.raises(ValueError, match="model_parallel=3 does not divide the 1 devices"):
        partitioning.create_mesh(3)


# ---- 8 CPU devices == 1 device ------------------------------------------------------------------

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax
import toy_tasks
toy_tasks.register()
from gqa_t5x.training import models
from gqa_t5x.training import optim
from gqa_t5x.training import partitioning
from gqa_t5x.training import train
from gqa_t5x.training import train_state
from gqa_t5x.model.config import get_config

assert jax.device_count() == 8, jax.devices()
config = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_kv_heads=2, dropout_rate=0.1)
model = models.build_model(config)
for mp in (2, 4):
    mesh = partitioning.create_mesh(mp)
    state, _ = train_state.create_train_state(
        model, optim.adafactor(), mesh, {{"encoder_input_tokens": (1, 10),
                                         "decoder_input_tokens": (1, 10)}}, 0)
    kernel = state.params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
    print("KEY_SHARD", mp, kernel.sharding.spec, kernel.addressable_shards[0].data.shape)
for mp in (2, 4):
    train.train(sys.argv[1] + f"/mp{{mp}}", mixture_or_task_name=toy_tasks.NAME,
                task_feature_lengths=toy_tasks.LENGTHS, batch_size=8, train_steps=8,
                model=model, schedule=optim.constant_schedule(1e-2), model_parallel=mp,
                checkpoint_every=8, log_every=8)
try:
    train.train(sys.argv[1] + "/bad", mixture_or_task_name=toy_tasks.NAME,
                task_feature_lengths=toy_tasks.LENGTHS, batch_size=6, train_steps=8, model=model)
except ValueError as e:
    print("BATCH_ERROR", e)
"""


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, **CACHE_ENV,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=TESTS), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # [32, 2 * 16] key kernel: one kv head per device over model=2, replicated over model=4.
    assert "KEY_SHARD 2 P(None, 'model') (32, 16)" in proc.stdout, proc.stdout
    assert "KEY_SHARD 4 P(None, None) (32, 32)" in proc.stdout, proc.stdout
    assert "BATCH_ERROR batch_size=6 is not divisible by the mesh's data axis (8 = 8 devices " \
           "/ model_parallel 1); choose a multiple of 8" in proc.stdout
    config = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_kv_heads=2,
                        dropout_rate=0.1)
    train.train(str(tmp_path / "one"), mixture_or_task_name=TASK,
                task_feature_lengths=toy_tasks.LENGTHS, batch_size=8, train_steps=8,
                model=models.build_model(config), schedule=optim.constant_schedule(1e-2),
                checkpoint_every=8, log_every=8)
    one = train_state.read_train_checkpoint(str(tmp_path / "one" / "checkpoint_8"))[0]
    for mp in (2, 4):
        many = train_state.read_train_checkpoint(str(tmp_path / f"mp{mp}" / "checkpoint_8"))[0]
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one, many)
