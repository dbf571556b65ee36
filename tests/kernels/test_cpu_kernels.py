"""The compiled CPU decode kernels against float64 numpy, inside jit, loops and vmap; their
build cache and its key; when `layers.dense` and `dot_product_attention` use them; and decoding
with them against decoding with XLA's ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_cpu_kernels

from gqa_t5x.kernels import cpu as cpu_kernels
from gqa_t5x.model import attention, decoding, layers
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

pytestmark = [needs_cpu_kernels, pytest.mark.cpu_kernels]


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("m,d,f", [
    (1, 1, 1), (3, 5, 7), (8, 64, 64), (8, 512, 1000), (9, 64, 65), (13, 100, 130),
    (32, 17, 129), (32, 512, 1000), (20, 1024, 512), (5, 1024, 512), (2, 3, 64 * 9 + 1)])
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


def test_attention_step_uses_the_kernel_and_keeps_gradients():
    rng = np.random.default_rng(3)
    query = jnp.asarray(rng.standard_normal((2, 1, 4, 8), dtype=np.float32))  # [B, 1, N, H]
    key, value = (jnp.asarray(rng.standard_normal((2, 2, 6, 8), dtype=np.float32))
                  for _ in range(2))  # [B, K, S, H]
    bias = jnp.asarray(rng.standard_normal((1, 4, 1, 6), dtype=np.float32))

    def loss(kernels, query, key, value, bias):
        out = attention.dot_product_attention(query, key, value, bias, kernels=kernels)
        return jnp.sum(jnp.sin(out))

    grads = {k: jax.value_and_grad(functools.partial(loss, k), argnums=(0, 1, 2, 3))
             for k in ("cpu", "auto", "xla")}
    assert cpu_kernels.ATTENTION_TARGET in _lowered(grads["cpu"], query, key, value, bias)
    assert cpu_kernels.ATTENTION_TARGET in _lowered(grads["auto"], query, key, value, bias)
    assert cpu_kernels.ATTENTION_TARGET not in _lowered(grads["xla"], query, key, value, bias)
    got = jax.jit(grads["cpu"])(query, key, value, bias)
    want = jax.jit(grads["xla"])(query, key, value, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attention.dot_product_attention(query, key, value, kernels="cpu"),
                               attention.dot_product_attention(query, key, value),
                               rtol=1e-5, atol=1e-6)


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_dense_uses_the_kernel_only_for_few_float32_rows():
    w = jnp.ones((16, 24), jnp.float32)
    few = jnp.ones((2, 1, 16), jnp.float32)  # a decode step: 2 rows
    most = jnp.ones((1, cpu_kernels.MAX_ROWS, 16), jnp.float32)
    many = jnp.ones((1, cpu_kernels.MAX_ROWS + 1, 16), jnp.float32)
    dense = functools.partial(layers.dense, kernels="cpu")
    assert cpu_kernels.MATMUL_TARGET in _lowered(dense, few, w)
    assert cpu_kernels.MATMUL_TARGET in _lowered(dense, most, w)
    assert cpu_kernels.MATMUL_TARGET not in _lowered(dense, many, w)
    assert cpu_kernels.MATMUL_TARGET not in _lowered(dense, few.astype(jnp.bfloat16),
                                                     w.astype(jnp.bfloat16))
    assert cpu_kernels.MATMUL_TARGET not in _lowered(layers.dense, few, w)  # "xla", the default


def test_dense_with_the_kernel_keeps_values_and_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 40), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((40, 70), dtype=np.float32))

    def loss(kernels, x, w):
        return jnp.sum(jnp.sin(layers.dense(x, w, kernels)))

    with_kernel = jax.jit(jax.value_and_grad(functools.partial(loss, "cpu"), argnums=(0, 1)))
    assert cpu_kernels.MATMUL_TARGET in with_kernel.lower(x, w).as_text()
    value, grads = with_kernel(x, w)
    # float64 numpy: d/dy sum(sin(y)) = cos(y); dx = cos(y) w^T, dw = x^T cos(y).
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = x64 @ w64
    np.testing.assert_allclose(value, np.sin(y).sum(), rtol=1e-5)
    np.testing.assert_allclose(grads[0], np.cos(y) @ w64.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], np.einsum("bti,bto->io", x64, np.cos(y)), rtol=1e-4,
                               atol=1e-4)


def _fake_compiler(path, version="fake c++ 1.0"):
    """A "compiler" that states a version and fails every build."""
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{version}'; exit 0; fi\n"
                    "echo 'fake: cannot compile' >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

    # A compiler that fails: nothing may be left behind.
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path / "fake-c++"))
    with pytest.raises(RuntimeError, match="building the CPU kernels failed: .*fake-c\\+\\+ "):
        cpu_kernels.build(tmp_path / "failed")
    assert list((tmp_path / "failed").iterdir()) == []

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        cpu_kernels.build(tmp_path)


def test_cache_key_tells_machines_apart(tmp_path, monkeypatch):
    # Everything the library's code depends on goes into its name: two machines sharing a cache
    # folder must never load each other's build.
    key = functools.partial(cpu_kernels.library_path, "c++", tmp_path)
    base = key(features="flags: avx2 avx512f", version="g++ 13.2")
    assert key(features="flags: avx2 avx512f", version="g++ 13.2") == base
    assert key(features="flags: avx2", version="g++ 13.2") != base  # same model, no AVX-512
    assert key(features="flags: avx2 avx512f", version="g++ 14.1") != base
    assert cpu_kernels.library_path("clang++", tmp_path, features="flags: avx2 avx512f",
                                    version="g++ 13.2") != base
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    assert key(features="flags: avx2 avx512f", version="g++ 13.2") != base
    # The compiler's version is asked of the compiler itself.
    fake = _fake_compiler(tmp_path / "fake-c++", version="fake c++ 2.0")
    assert cpu_kernels.compiler_version(fake) == "fake c++ 2.0"


def test_cpu_features_where_the_os_states_them_or_not(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n"
                       "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n")
    assert cpu_kernels.cpu_features(cpuinfo) == "flags\t\t: fpu avx2\nmodel name\t: Some CPU"
    # Where the OS states no flags the build is not -march=native: its key could not tell two
    # CPUs of one architecture apart.
    monkeypatch.setattr(cpu_kernels.platform, "system", lambda: "Windows")
    assert cpu_kernels.cpu_features(tmp_path / "absent") == ""
    assert cpu_kernels.NATIVE_FLAG in cpu_kernels.compile_flags("flags: avx2")
    assert cpu_kernels.NATIVE_FLAG not in cpu_kernels.compile_flags("")


@pytest.mark.slow
def test_decoding_with_the_kernel_equals_decoding_with_xla_dot():
    cfg = TransformerConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, num_encoder_layers=1, num_decoder_layers=2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 40, (3, 6)), jnp.int32)
    params = Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                   enable_dropout=False)["params"]
    results = {}
    for kernels in ("cpu", "xla"):
        module = Transformer(cfg.replace(kernels=kernels))
        step = jax.jit(functools.partial(decoding.decode_step, module, max_decode_length=5))
        cache = decoding.init_cache(module, params, jnp.zeros((3, 6, 32)), tokens,
                                    max_decode_length=5)
        hlo = step.lower(params, cache, jnp.zeros((3, 6, 32)), tokens, tokens[:, 0]).as_text()
        assert (cpu_kernels.MATMUL_TARGET in hlo) == (kernels == "cpu")
        assert (cpu_kernels.ATTENTION_TARGET in hlo) == (kernels == "cpu")
        results[kernels] = decoding.generate(module, params, tokens, max_decode_length=5,
                                             eos_id=-1)
    np.testing.assert_array_equal(results["cpu"][0], results["xla"][0])
    np.testing.assert_allclose(results["cpu"][1], results["xla"][1], rtol=1e-5, atol=1e-5)
