"""Kv heads are sharded whole or replicated: K/V kernels and decode caches of MHA, GQA-8, GQA-2 and
MQA on 8 virtual CPU devices with model_parallel 8 (in a subprocess, which gets its own devices).

The expected specs and per-device shapes are written out by hand: 16 query heads of width 8 shard
two per device; 16 or 8 kv heads shard two or one per device; 2 kv heads or 1 do not divide over
8 and are replicated (never split inside a head: [D, 2 * 8] would otherwise give each device half
a head).
"""

import os
import subprocess
import sys

import pytest
import toy_tasks

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
CACHE_ENV = toy_tasks.enable_compilation_cache()

_SCRIPT = """
import functools
import jax
import jax.numpy as jnp
from gqa_t5x.model import decoding
from gqa_t5x.model.config import get_config
from gqa_t5x.training import models, optim, partitioning, train_state

assert jax.device_count() == 8, jax.devices()
mesh = partitioning.create_mesh(8)
shapes = {"encoder_input_tokens": (1, 6), "decoder_input_tokens": (1, 5)}
for name, k in (("MHA", 16), ("GQA-8", 8), ("GQA-2", 2), ("MQA", 1)):
    config = get_config("tiny", num_heads=16, num_kv_heads=k, head_dim=8, num_encoder_layers=1,
                        num_decoder_layers=1)
    model = models.build_model(config)
    state, _ = train_state.create_train_state(model, optim.adafactor(), mesh, shapes, 0)
    tokens = jnp.ones((2, 6), jnp.int32)
    step = jax.jit(functools.partial(decoding.decode_step, model.module, max_decode_length=5))
    with partitioning.activation_rules(mesh, partitioning.rules_for(config, mesh)):
        encoded = decoding.encode(model.module, state.params, tokens)
        cache = decoding.init_cache(model.module, state.params, encoded, tokens,
                                    max_decode_length=5)
        _, stepped = step(state.params, cache, encoded, tokens, jnp.zeros((2,), jnp.int32))
    layer = state.params["decoder"]["layers_0"]
    arrays = {"query": layer["self_attention"]["query"]["kernel"],
              "key": layer["self_attention"]["key"]["kernel"],
              "cross_value": layer["encoder_decoder_attention"]["value"]["kernel"],
              "self_cache": cache["decoder"]["layers_0"]["self_attention"]["cached_key"],
              "cross_cache":
                  cache["decoder"]["layers_0"]["encoder_decoder_attention"]["cached_value"],
              "stepped_cache": stepped["decoder"]["layers_0"]["self_attention"]["cached_value"]}
    for what, x in arrays.items():
        print(name, what, tuple(x.sharding.spec), x.addressable_shards[0].data.shape)
"""

M = "model"
SHARDED = {  # kv heads per device: 2 (MHA, 16 kv heads) and 1 (GQA-8)
    "key": ((None, M), (32, 8)), "cross_value": ((None, M), (32, 8)),
    "self_cache": ((None, M, None, None), (2, 1, 5, 8)),
    "cross_cache": ((None, M, None, None), (2, 1, 6, 8)),
    "stepped_cache": ((None, M, None, None), (2, 1, 5, 8))}


def _expected(name):
    if name in ("GQA-2", "MQA"):
        k = {"GQA-2": 2, "MQA": 1}[name]
        out = {"key": ((), (32, 8 * k)), "cross_value": ((), (32, 8 * k)),
               "self_cache": ((), (2, k, 5, 8)), "cross_cache": ((), (2, k, 6, 8)),
               "stepped_cache": ((), (2, k, 5, 8))}
    else:
        per = {"MHA": 2, "GQA-8": 1}[name]
        out = {w: (spec, tuple(per * d if i == 1 else d
                               for i, d in enumerate(shape)))
               for w, (spec, shape) in SHARDED.items()}
    out["query"] = ((None, M), (32, 16))  # 16 heads x 8 over 8 devices: two whole heads each
    return out


def _trim(spec):
    """A spec's trailing Nones are implicit."""
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _spec(text):
    return tuple(None if t == "None" else t.strip("'") for t in text.strip("()").split(", ") if t)


@pytest.mark.slow
def test_kv_heads_sharded_whole_or_replicated_on_model_8():
    env = dict(os.environ, PYTHONPATH=ROOT, **CACHE_ENV,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {}
    for line in proc.stdout.splitlines():
        name, what, rest = line.split(" ", 2)
        spec, shape = rest.split(") (")
        got.setdefault(name, {})[what] = (
            _spec(spec + ")"), tuple(int(d) for d in shape.strip("()").split(",") if d.strip()))
    for name in ("MHA", "GQA-8", "GQA-2", "MQA"):
        want = _expected(name)
        for what in want:
            spec, shape = got[name][what]
            want_spec, want_shape = want[what]
            assert _trim(spec) == _trim(want_spec), (name, what, spec, want_spec)
            assert shape == want_shape, (name, what, shape, want_shape)
