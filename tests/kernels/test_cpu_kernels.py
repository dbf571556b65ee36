"""The compiled CPU decode kernels against float64 numpy, inside jit, loops and vmap; their
build cache; when `layers.dense` and `dot_product_attention` use them; and decoding with them
against decoding with XLA's ops."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.kernels import cpu as cpu_kernels
from gqa_t5x.model import attention, decoding, layers
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or jax.default_backend() != "cpu",
    reason="needs a C++ compiler and the CPU backend")


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("m,d,f", [
    (1, 1, 1), (3, 5, 7), (8, 64, 64), (8, 512, 1000), (9, 64, 65), (13, 100, 130),
    (32, 17, 129), (5, 1024, 512), (2, 3, 64 * 9 + 1)])
def test_small_matmul_matches_numpy(m, d, f):
    rng = np.random.default_rng(m * 1000 + f)
    x = rng.standard_normal((m, d), dtype=np.float32)
    w = rng.standard_normal((d, f), dtype=np.float32)
    y = np.asarray(jax.jit(cpu_kernels.small_matmul)(x, w))
    assert y.shape == (m, f) and y.dtype == np.float32
    np.testing.assert_allclose(y, _reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(d))


def test_small_matmul_in_a_loop_and_under_vmap():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 96), dtype=np.float32) / 10
    x = rng.standard_normal((4, 96), dtype=np.float32)

    @jax.jit
    def iterate(x, w):  # 5 dependent products, as in a decode loop
        return jax.lax.fori_loop(0, 5, lambda _, h: jnp.tanh(cpu_kernels.small_matmul(h, w)), x)

    expected = np.asarray(x, np.float64)
    for _ in range(5):
        expected = np.tanh(_reference(expected, w))
    np.testing.assert_allclose(np.asarray(iterate(x, w)), expected, rtol=1e-5, atol=1e-5)

    xs = rng.standard_normal((3, 2, 96), dtype=np.float32)  # a batch of [M, D] inputs
    ys = jax.jit(jax.vmap(cpu_kernels.small_matmul, in_axes=(0, None)))(xs, w)
    np.testing.assert_allclose(np.asarray(ys), _reference(xs, w), rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(3, 4\) and kernel \(5, 6\)"):
        cpu_kernels.small_matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="kernel is bfloat16, the CPU kernels take float32"):
        cpu_kernels.small_matmul(jnp.ones((3, 4)), jnp.ones((4, 6), jnp.bfloat16))
    q, kv, bias = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 3, 5, 8)), jnp.ones((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"bias \(2, 3, 4, 6\) are not"):
        cpu_kernels.decode_attention(q, kv, kv, jnp.ones((2, 3, 4, 6)))
    with pytest.raises(ValueError, match=r"q \(2, 12, 8\)"):
        cpu_kernels.decode_attention(jnp.ones((2, 12, 8)), kv, kv, bias)
    with pytest.raises(ValueError, match="value is float16"):
        cpu_kernels.decode_attention(q, kv, kv.astype(jnp.float16), bias)


def _reference_attention(q, key, value, bias):
    q, key, value, bias = (np.asarray(a, np.float64) for a in (q, key, value, bias))
    logits = np.einsum("bkgh,bksh->bkgs", q, key) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bkgs,bksh->bkgh", p / p.sum(-1, keepdims=True), value)


@pytest.mark.parametrize("b,k,g,s,h", [  # G < 8: a dot product per query; G >= 8: vector lanes
    (2, 3, 2, 37, 20), (8, 8, 1, 1024, 64), (8, 1, 8, 1024, 64), (1, 1, 1, 1, 1),
    (3, 2, 4, 17, 16), (1, 2, 20, 33, 70), (2, 1, 8, 5, 3)])
def test_decode_attention_matches_numpy(b, k, g, s, h):
    rng = np.random.default_rng(s * 100 + h)
    q, key, value = (rng.standard_normal(shape, dtype=np.float32)
                     for shape in [(b, k, g, h), (b, k, s, h), (b, k, s, h)])
    bias = rng.standard_normal((b, k, g, s), dtype=np.float32)
    bias[0, ..., s // 2 + 1:] = -1e10  # padded keys in the first example
    out = np.asarray(jax.jit(cpu_kernels.decode_attention)(q, key, value, bias))
    assert out.shape == (b, k, g, h)
    np.testing.assert_allclose(out, _reference_attention(q, key, value, bias), rtol=1e-5,
                               atol=1e-5)


def test_decode_attention_softmax_over_the_whole_exp_range():
    # Zero queries and one-hot values make the output the softmax of the bias itself; the bias
    # spans the range where exp goes from 1 down to underflow.
    s = 200
    bias = np.linspace(-95.0, 0.0, s, dtype=np.float32)[None, None, None, :]
    value = np.eye(s, dtype=np.float32)[None, None]
    out = np.asarray(cpu_kernels.decode_attention(np.zeros((1, 1, 1, s), np.float32), value,
                                                  value, bias))[0, 0, 0]
    expected = np.exp(bias[0, 0, 0].astype(np.float64))
    np.testing.assert_allclose(out, expected / expected.sum(), rtol=1e-6, atol=1e-30)


def test_attention_step_uses_the_kernel_and_keeps_gradients(monkeypatch):
    rng = np.random.default_rng(3)
    query = jnp.asarray(rng.standard_normal((2, 1, 4, 8), dtype=np.float32))  # [B, 1, N, H]
    key, value = (jnp.asarray(rng.standard_normal((2, 2, 6, 8), dtype=np.float32))
                  for _ in range(2))  # [B, K, S, H]
    bias = jnp.asarray(rng.standard_normal((1, 4, 1, 6), dtype=np.float32))

    def loss(query, key, value, bias):
        return jnp.sum(jnp.sin(attention.dot_product_attention(query, key, value, bias)))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    assert cpu_kernels.ATTENTION_TARGET in _lowered(grad, query, key, value, bias)
    got = jax.jit(grad)(query, key, value, bias)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.ATTENTION_TARGET not in _lowered(grad, query, key, value, bias)
    want = jax.jit(grad)(query, key, value, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    no_bias = attention.dot_product_attention(query, key, value)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    np.testing.assert_allclose(attention.dot_product_attention(query, key, value), no_bias,
                               rtol=1e-5, atol=1e-6)


def _lowered(fn, *args) -> str:
    jax.clear_caches()  # the choice is made when `fn` is traced
    return jax.jit(fn).lower(*args).as_text()


def test_dense_uses_the_kernel_only_for_few_float32_rows(monkeypatch):
    w = jnp.ones((16, 24), jnp.float32)
    few = jnp.ones((2, 1, 16), jnp.float32)  # a decode step: 2 rows
    most = jnp.ones((1, cpu_kernels.MAX_ROWS, 16), jnp.float32)
    many = jnp.ones((1, cpu_kernels.MAX_ROWS + 1, 16), jnp.float32)
    assert cpu_kernels.MATMUL_TARGET in _lowered(layers.dense, few, w)
    assert cpu_kernels.MATMUL_TARGET in _lowered(layers.dense, most, w)
    assert cpu_kernels.MATMUL_TARGET not in _lowered(layers.dense, many, w)
    assert cpu_kernels.MATMUL_TARGET not in _lowered(layers.dense, few.astype(jnp.bfloat16),
                                              w.astype(jnp.bfloat16))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.MATMUL_TARGET not in _lowered(layers.dense, few, w)


def test_dense_with_the_kernel_keeps_values_and_gradients(monkeypatch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 40), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((40, 70), dtype=np.float32))

    def loss(x, w):
        return jnp.sum(jnp.sin(layers.dense(x, w)))

    with_kernel = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert cpu_kernels.MATMUL_TARGET in with_kernel.lower(x, w).as_text()
    value, grads = with_kernel(x, w)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    jax.clear_caches()
    without = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert cpu_kernels.MATMUL_TARGET not in without.lower(x, w).as_text()
    ref_value, ref_grads = without(x, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails: nothing may be left behind
    with pytest.raises(RuntimeError, match="building the CPU kernels failed: false "):
        cpu_kernels.build(tmp_path / "failed")
    assert list((tmp_path / "failed").iterdir()) == []

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        cpu_kernels.build(tmp_path)


def test_decoding_with_the_kernel_equals_decoding_with_xla_dot(monkeypatch):
    cfg = TransformerConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, num_encoder_layers=1, num_decoder_layers=2)
    module = Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 40, (3, 6)), jnp.int32)
    params = module.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                         enable_dropout=False)["params"]

    def run():
        jax.clear_caches()  # the switch is read when the decode loop is traced
        return decoding.generate(module, params, tokens, max_decode_length=5, eos_id=-1)

    assert cpu_kernels.enabled()
    tokens_k, scores_k = run()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    tokens_x, scores_x = run()
    np.testing.assert_array_equal(tokens_k, tokens_x)
    np.testing.assert_allclose(scores_k, scores_x, rtol=1e-5, atol=1e-5)
