"""Grouped-query attention against an independent numpy reference (tests/numpy_t5.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_t5
import pytest

from gqa_t5x.model import attention, layers


def _rng(seed=0):
    return np.random.default_rng(seed)


def _reference_dpa(query, key, value, bias):
    """Loop over heads; query [B,T,N,H], key/value [B,K,S,H], bias [B,N,T,S] -> [B,T,N,H]."""
    q, k, v, bias = (np.asarray(a, np.float64) for a in (query, key, value, bias))
    n, kh = q.shape[2], k.shape[1]
    out = np.zeros(q.shape)
    for head in range(n):
        j = head // (n // kh)
        logits = np.einsum("bth,bsh->bts", q[:, :, head], k[:, j]) + bias[:, head]
        out[:, :, head] = numpy_t5.softmax(logits) @ v[:, j]
    return out


# ---- relative position buckets ------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 32), (64, 256)])
def test_relative_position_bucket_matches_reference(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    ours = np.asarray(layers.relative_position_bucket(jnp.asarray(rel), bidirectional,
                                                      num_buckets, max_distance))
    ref = [numpy_t5.relative_position_bucket(int(r), bidirectional, num_buckets, max_distance)
           for r in rel]
    np.testing.assert_array_equal(ours, ref)


def test_relative_position_bucket_hand_values():
    # rel = memory - query. Bidirectional, 32 buckets / 128: 16 per side, 8 exact.
    cases = {0: 0, -1: 1, -7: 7, -8: 8, -12: 9, -16: 10, -127: 15, -128: 15, -1000: 15,
             1: 17, 7: 23, 16: 26, 1000: 31}
    rel = jnp.asarray(list(cases))
    got = layers.relative_position_bucket(rel, True, 32, 128)
    np.testing.assert_array_equal(np.asarray(got), list(cases.values()))
    # Unidirectional (decoder): future positions fall into bucket 0; 16 exact buckets.
    cases = {5: 0, 0: 0, -15: 15, -16: 16, -127: 31, -128: 31, -5000: 31}
    got = layers.relative_position_bucket(jnp.asarray(list(cases)), False, 32, 128)
    np.testing.assert_array_equal(np.asarray(got), list(cases.values()))


# ---- masks --------------------------------------------------------------------------------------


def test_decoder_mask_causal_padding_and_segments():
    targets = jnp.array([[5, 6, 7, 8, 0]])
    segments = jnp.array([[1, 1, 2, 2, 0]])
    got = np.asarray(attention.make_decoder_mask(targets, segments))[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ], bool)
    np.testing.assert_array_equal(got, expected)
    got = np.asarray(attention.make_decoder_mask(targets))[0, 0]
    expected = np.tril(np.ones((5, 5), bool))
    expected[4, :] = expected[:, 4] = False
    np.testing.assert_array_equal(got, expected)


def test_attention_mask_and_bias():
    q = jnp.array([[1, 1, 0]])
    k = jnp.array([[1, 0]])
    mask = attention.make_attention_mask(q, k)
    assert mask.shape == (1, 1, 3, 2)
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], [[1, 0], [1, 0], [0, 0]])
    np.testing.assert_array_equal(np.asarray(attention.mask_to_bias(mask))[0, 0],
                                  [[0, -1e10], [0, -1e10], [-1e10, -1e10]])


# ---- the pure function --------------------------------------------------------------------------


# `kernels`: XLA's ops, and the compiled CPU kernel (a decode step, t == 1) where it builds.
@pytest.mark.parametrize("t", [3, 1])  # 1: one query per sequence, as in a decode step
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2)])
def test_dot_product_attention_matches_reference(num_heads, num_kv_heads, t, kernels):
    r = _rng(num_heads * 10 + num_kv_heads)
    b, s, h = 2, 5, 8
    query = r.normal(size=(b, t, num_heads, h)).astype(np.float32)
    key = r.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)
    value = r.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)
    rel_bias = r.normal(size=(1, num_heads, t, s)).astype(np.float32)
    mask = np.ones((b, 1, t, s), bool)
    mask[0, 0, :, 3:] = False  # padded keys in the first example
    bias = np.where(mask, 0.0, -1e10) + rel_bias
    got = attention.dot_product_attention(jnp.asarray(query), jnp.asarray(key),
                                          jnp.asarray(value), jnp.asarray(bias, jnp.float32),
                                          kernels=kernels)
    assert got.shape == (b, t, num_heads, h)
    np.testing.assert_allclose(np.asarray(got), _reference_dpa(query, key, value, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [2, 1])
@pytest.mark.parametrize("bias_rows", ["beams", "examples"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_shared_key_rows_equal_repeated_keys(num_heads, num_kv_heads, bias_rows, t, kernels):
    """W adjacent query rows on one key/value row (beams sharing cross-attention K/V) give the
    reference output with the key/value rows repeated W times; the bias may have either batch."""
    r = _rng(num_kv_heads * 7 + t)
    b, w, s, h = 2, 3, 5, 8
    query = r.normal(size=(b * w, t, num_heads, h)).astype(np.float32)
    key = r.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)
    value = r.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)
    rel = r.normal(size=(1, num_heads, t, s))
    mask = np.ones((b, 1, 1, s), bool)
    mask[1, ..., 2:] = False  # padded keys in the second example
    bias = np.where(mask, 0.0, -1e10) + rel  # [B, N, T, S]
    if bias_rows == "beams":  # a different bias for every query row
        bias = np.repeat(bias, w, axis=0) + r.normal(size=(b * w, num_heads, t, s))
    got = attention.dot_product_attention(jnp.asarray(query), jnp.asarray(key),
                                          jnp.asarray(value), jnp.asarray(bias, jnp.float32),
                                          kernels=kernels)
    assert got.shape == (b * w, t, num_heads, h)
    full_bias = np.broadcast_to(bias, (b, num_heads, t, s)) if bias_rows == "examples" else bias
    if bias_rows == "examples":
        full_bias = np.repeat(full_bias, w, axis=0)
    ref = _reference_dpa(query, np.repeat(key, w, axis=0), np.repeat(value, w, axis=0),
                         full_bias)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_dot_product_attention_rejects_key_rows_that_do_not_divide_queries():
    with pytest.raises(ValueError, match="do not fit query"):
        attention.dot_product_attention(jnp.zeros((5, 1, 4, 8)), jnp.zeros((2, 2, 3, 8)),
                                        jnp.zeros((2, 2, 3, 8)))


def test_query_head_n_reads_kv_head_n_div_g():
    # With all-zero queries the weights are uniform, so head n returns the mean of its kv head's
    # values; make kv head j's values all equal to j + 1 and read the mapping off the output.
    b, t, s, h, n, k = 1, 2, 3, 4, 8, 2
    value = jnp.broadcast_to(jnp.arange(1.0, k + 1)[None, :, None, None], (b, k, s, h))
    key = jnp.asarray(_rng().normal(size=(b, k, s, h)), jnp.float32)
    out = attention.dot_product_attention(jnp.zeros((b, t, n, h)), key, value)
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, 0], [1, 1, 1, 1, 2, 2, 2, 2])
    # And each query head looks at its own group's keys: query head n matches key j = n // 4 at
    # position j only, strongly, so it returns that position's value.
    key = np.zeros((b, k, s, h), np.float32)
    key[0, 0, 0, 0] = key[0, 1, 2, 0] = 50.0
    value = np.arange(s, dtype=np.float32)[None, None, :, None] * np.ones((b, k, s, h))
    query = np.zeros((b, t, n, h), np.float32)
    query[..., 0] = 1.0
    out = attention.dot_product_attention(jnp.asarray(query), jnp.asarray(key),
                                          jnp.asarray(value, jnp.float32))
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, 0], [0, 0, 0, 0, 2, 2, 2, 2], atol=1e-6)


def test_dot_product_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible"):
        attention.dot_product_attention(jnp.zeros((1, 2, 6, 4)), jnp.zeros((1, 4, 3, 4)),
                                        jnp.zeros((1, 4, 3, 4)))


# ---- the module ---------------------------------------------------------------------------------


def _module(num_heads, num_kv_heads, head_dim=8, **kw):
    return attention.GroupedQueryAttention(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                           head_dim=head_dim, **kw)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_module_matches_numpy_attention(num_heads, num_kv_heads):
    r = _rng(num_kv_heads)
    b, t, s, d, h = 2, 4, 6, 16, 8
    x_q = r.normal(size=(b, t, d)).astype(np.float32)
    x_kv = r.normal(size=(b, s, d)).astype(np.float32)
    rel = r.normal(size=(num_heads, t, s)).astype(np.float32)
    mask = np.ones((b, t, s), bool)
    mask[1, :, 4:] = False
    bias = jnp.asarray(np.where(mask[:, None], 0.0, -1e10) + rel[None], jnp.float32)
    module = _module(num_heads, num_kv_heads, h)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x_q), jnp.asarray(x_kv), bias)
    p = variables["params"]
    assert p["query"]["kernel"].shape == (d, num_heads * h)
    assert p["key"]["kernel"].shape == (d, num_kv_heads * h)
    assert p["value"]["kernel"].shape == (d, num_kv_heads * h)
    assert p["out"]["kernel"].shape == (num_heads * h, d)
    # Larger queries than the init gives, so that attention is far from uniform.
    p = dict(p, query={"kernel": p["query"]["kernel"] * 8.0})
    got = module.apply({"params": p}, jnp.asarray(x_q), jnp.asarray(x_kv), bias)
    ref = numpy_t5.attention(x_q, x_kv, p, num_heads, num_kv_heads, h, mask, rel)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_module_axes_keep_kv_heads_apart():
    module = _module(4, 2)
    x = jnp.ones((1, 3, 16))
    axes = module.init(jax.random.PRNGKey(0), x, x)["params_axes"]
    names = {k: tuple(v["kernel_axes"].names) for k, v in axes.items()}
    assert names == {"query": ("embed", "joined_kv"), "key": ("embed", "kv_joined"),
                     "value": ("embed", "kv_joined"), "out": ("joined_kv", "embed")}


@pytest.mark.parametrize("cross", [False, True])
def test_module_cache_has_kv_heads(cross):
    b, s, d, h, n, k, length = 2, 5, 16, 8, 4, 2, 7
    module = _module(n, k, h, cross=cross)
    x_kv = jnp.asarray(_rng().normal(size=(b, s, d)), jnp.float32)
    x_q = x_kv[:, :1]
    params = module.init(jax.random.PRNGKey(0), x_kv, x_kv)["params"]
    _, v = module.apply({"params": params}, x_q, x_kv, decode=True, max_decode_length=length,
                        mutable=["cache"])
    expected = (b, k, s if cross else length, h)
    assert v["cache"]["cached_key"].shape == expected
    assert v["cache"]["cached_value"].shape == expected
    assert not np.any(np.asarray(v["cache"]["cached_key"]))  # zeros until the first step


def test_cross_cache_is_filled_at_step_zero_and_only_read_after():
    """As t5x drives it: the cache is created from a dummy input, the step at cache_index 0 gets
    the real encoder output and projects it (head-major, numpy reference), later steps get
    zeros and must keep it."""
    b, s, d, h, n, k = 2, 5, 16, 8, 4, 2
    module = _module(n, k, h, cross=True)
    x_kv = _rng().normal(size=(b, s, d)).astype(np.float32)
    params = module.init(jax.random.PRNGKey(0), jnp.asarray(x_kv), jnp.asarray(x_kv))["params"]
    x_q = jnp.ones((b, 1, d))
    _, v = module.apply({"params": params}, x_q, jnp.ones((b, s, d)), decode=True,
                        mutable=["cache"])
    step = jax.jit(lambda cache, x, i: module.apply(
        {"params": params, "cache": cache}, x_q, x, decode=True, cache_index=i,
        mutable=["cache"]))
    kernels = {name: np.asarray(params[name]["kernel"]) for name in ("key", "value")}
    ref = {name: (x_kv @ kernels[name]).reshape(b, s, k, h).transpose(0, 2, 1, 3)
           for name in kernels}
    cache = v["cache"]
    outs = []
    for i, x in enumerate([x_kv, np.zeros_like(x_kv), np.zeros_like(x_kv)]):
        out, v = step(cache, jnp.asarray(x), jnp.int32(i))
        cache = v["cache"]
        outs.append(np.asarray(out))
        for name in ("key", "value"):
            np.testing.assert_allclose(np.asarray(cache[f"cached_{name}"]), ref[name],
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="encoder output"):
        step(cache, jnp.zeros((b, s + 1, d)), jnp.int32(1))


