"""The T5.1.1 network: numpy reference forward, cached decoding, cache layout, packing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_t5
import pytest

from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

BASE = TransformerConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                         mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=12)

# Encoder inputs with padding in the second row; decoder inputs shifted targets.
ENC = np.array([[3, 9, 4, 12, 7, 22, 5, 1, 18, 6, 2, 1],
                [8, 17, 5, 33, 2, 1, 0, 0, 0, 0, 0, 0]], np.int32)
TGT = np.array([[4, 11, 6, 25, 9, 1, 15, 3, 12],
                [31, 7, 19, 2, 14, 1, 5, 7, 21]], np.int32)
DEC = np.concatenate([np.zeros((2, 1), np.int32), TGT[:, :-1]], axis=1)


@functools.cache
def _params(config: TransformerConfig):
    """Random params; norm scales and position biases are randomized too, so that a mixed-up
    name or layout shows."""
    init = jax.jit(functools.partial(Transformer(config).init, enable_dropout=False))
    variables = init(jax.random.PRNGKey(1), ENC[:1, :4], DEC[:1, :3], TGT[:1, :3])
    r = np.random.default_rng(2)

    def randomize(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(r.uniform(0.5, 1.5, x.shape), jnp.float32)
        if name == "rel_embedding":
            return jnp.asarray(r.normal(0, 1.0, x.shape), jnp.float32)
        return x

    return jax.tree_util.tree_map_with_path(randomize, variables["params"])


@functools.cache
def _jitted(config, recompute_cross_kv=False):
    """Jitted (forward, encode, decode-step) of one model: eager dispatch is slow on CPU."""
    model = Transformer(config, recompute_cross_kv=recompute_cross_kv)
    forward = jax.jit(functools.partial(model.apply, enable_dropout=False))
    encode = jax.jit(functools.partial(model.apply, enable_dropout=False,
                                       method=Transformer.encode))
    step = jax.jit(functools.partial(model.apply, decode=True, enable_dropout=False,
                                     mutable=["cache"], method=Transformer.decode),
                   static_argnames="max_decode_length")
    return forward, encode, step


def _forward(config, params, enc, dec, tgt, **kw):
    forward = _jitted(config)[0]
    return np.asarray(forward({"params": params}, jnp.asarray(enc), jnp.asarray(dec),
                              jnp.asarray(tgt), **kw))


CONFIGS = {
    "mha": BASE,
    "gqa": BASE.replace(num_kv_heads=2),
    "mqa": BASE.replace(num_kv_heads=1),
    "gqa_all": BASE.replace(num_kv_heads=2, grouped=("encoder_self", "decoder_self", "cross")),
}


# One numpy-reference forward stays in `make test-fast`; the other layouts are slow.
@pytest.mark.parametrize("name", [n if n == "gqa" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CONFIGS])
def test_forward_matches_numpy_t5(name):
    config = CONFIGS[name]
    params = _params(config)
    got = _forward(config, params, ENC, DEC, TGT)
    assert got.shape == (2, TGT.shape[1], config.vocab_size) and got.dtype == np.float32
    ref = numpy_t5.forward(params, config, ENC, DEC, TGT)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_forward_matches_numpy_t5_with_decoder_padding():
    config = CONFIGS["gqa"]
    params = _params(config)
    tgt = TGT.copy()
    tgt[1, 6:] = 0
    dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)
    got = _forward(config, params, ENC, dec, tgt)
    ref = numpy_t5.forward(params, config, ENC, dec, tgt)
    valid = tgt > 0  # padded target positions are never scored
    np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


def _cached_step_logits(config, params, enc, dec, recompute_cross_kv=False):
    _, encode, step = _jitted(config, recompute_cross_kv)
    length = dec.shape[1]
    encoded = encode({"params": params}, jnp.asarray(enc))
    step = functools.partial(step, max_decode_length=length)
    first = jnp.asarray(dec[:, :1])
    _, v = step({"params": params}, encoded, jnp.asarray(enc), first, first)
    cache = v["cache"]
    out = []
    for i in range(length):
        tok = jnp.asarray(dec[:, i:i + 1])
        logits, v = step({"params": params, "cache": cache}, encoded, jnp.asarray(enc), tok, tok)
        cache = v["cache"]
        assert logits.shape == (dec.shape[0], 1, config.vocab_size)
        assert int(cache["decoder"]["cache_index"]) == i + 1
        out.append(np.asarray(logits[:, 0]))
    return np.stack(out, axis=1), cache


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
def test_cached_decode_equals_full_forward(name, kernels):
    config = CONFIGS[name]
    params = _params(config)
    full = _forward(config, params, ENC, DEC, TGT)  # XLA's; ENC row 1 is padded
    steps, _ = _cached_step_logits(config.replace(kernels=kernels), params, ENC, DEC)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    if name == "gqa":  # re-projecting cross-attention K/V each step changes nothing
        recomputed, _ = _cached_step_logits(config, params, ENC, DEC, recompute_cross_kv=True)
        np.testing.assert_allclose(recomputed, steps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
def test_t5x_style_decode_equals_full_forward(name):
    """t5x's predict_batch: the cache is created by a call on all-ones inputs of the full target
    length (no max_decode_length), the steps get the real encoder output at cache index 0 and,
    here, zeros after it: the cross-attention caches must hold the real input's keys/values."""
    config = CONFIGS[name]
    params = _params(config)
    forward, encode, step = _jitted(config)
    length = DEC.shape[1]
    _, v = jax.jit(functools.partial(Transformer(config).apply, decode=True,
                                     enable_dropout=False, mutable=["cache"]))(
        {"params": params}, jnp.ones_like(ENC), jnp.ones_like(DEC), jnp.ones_like(DEC))
    cache = v["cache"]
    encoded = encode({"params": params}, jnp.asarray(ENC))
    out = []
    for i in range(length):
        tok = jnp.asarray(DEC[:, i:i + 1])
        given = encoded if i == 0 else jnp.zeros_like(encoded)
        logits, v = step({"params": params, "cache": cache}, given, jnp.asarray(ENC), tok, tok,
                         max_decode_length=length)
        cache = v["cache"]
        out.append(np.asarray(logits[:, 0]))
    full = _forward(config, params, ENC, DEC, TGT)
    np.testing.assert_allclose(np.stack(out, axis=1), full, rtol=1e-5, atol=1e-5)


def test_float_token_ids_give_the_int_logits():
    """t5x initializes and evaluates with float32 dummy token ids; they are cast to int32."""
    config = CONFIGS["gqa"]
    params = _params(config)
    want = _forward(config, params, ENC, DEC, TGT)
    got = _forward(config, params, ENC.astype(np.float32), DEC.astype(np.float32),
                   TGT.astype(np.float32))
    np.testing.assert_array_equal(got, want)


def test_cache_arrays_have_kv_heads():
    config = CONFIGS["gqa"]
    params = _params(config)
    _, cache = _cached_step_logits(config, params, ENC, DEC)
    b, s, h, k = ENC.shape[0], ENC.shape[1], config.head_dim, config.num_kv_heads
    length = DEC.shape[1]
    for i in range(config.num_decoder_layers):
        layer = cache["decoder"][f"layers_{i}"]
        for name in ("cached_key", "cached_value"):
            assert layer["self_attention"][name].shape == (b, k, length, h)
            assert layer["encoder_decoder_attention"][name].shape == (b, k, s, h)
    assert cache["decoder"]["cache_index"].shape == ()
    assert cache["decoder"]["cache_index"].dtype == jnp.int32
    assert "encoder" not in cache


def test_encoder_stays_multi_head_unless_grouped():
    for name, enc_heads in (("gqa", 4), ("gqa_all", 2)):
        config = CONFIGS[name]
        shapes = jax.tree_util.tree_map(lambda x: x.shape, _params(config))
        d, h = config.emb_dim, config.head_dim
        for i in range(config.num_encoder_layers):
            attn = shapes["encoder"][f"layers_{i}"]["attention"]
            assert attn["key"]["kernel"] == attn["value"]["kernel"] == (d, enc_heads * h)
            assert attn["query"]["kernel"] == (d, 4 * h)
        for i in range(config.num_decoder_layers):
            layer = shapes["decoder"][f"layers_{i}"]
            for attn in ("self_attention", "encoder_decoder_attention"):
                assert layer[attn]["key"]["kernel"] == (d, 2 * h)
                assert layer[attn]["query"]["kernel"] == (d, 4 * h)
                assert layer[attn]["out"]["kernel"] == (4 * h, d)


def test_packed_row_equals_separate_examples():
    config = CONFIGS["gqa"]
    params = _params(config)
    enc_a, enc_b = np.array([5, 9, 14, 3, 1]), np.array([7, 22, 1])
    tgt_a, tgt_b = np.array([4, 8, 1]), np.array([11, 6, 19, 1])

    def shift(t):
        return np.concatenate([[0], t[:-1]])

    pad = 2
    enc = np.concatenate([enc_a, enc_b, np.zeros(pad, int)])[None]
    enc_seg = np.array([[1] * 5 + [2] * 3 + [0] * pad])
    tgt = np.concatenate([tgt_a, tgt_b, np.zeros(pad, int)])[None]
    dec = np.concatenate([shift(tgt_a), shift(tgt_b), np.zeros(pad, int)])[None]
    dec_seg = np.array([[1] * 3 + [2] * 4 + [0] * pad])
    packed = _forward(config, params, enc, dec, tgt, encoder_segment_ids=jnp.asarray(enc_seg),
                      decoder_segment_ids=jnp.asarray(dec_seg))
    alone_a = _forward(config, params, enc_a[None], shift(tgt_a)[None], tgt_a[None])
    alone_b = _forward(config, params, enc_b[None], shift(tgt_b)[None], tgt_b[None])
    np.testing.assert_allclose(packed[0, :3], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], alone_b[0], rtol=1e-5, atol=1e-5)
    # And the numpy reference agrees on the packed row.
    ref = numpy_t5.forward(params, config, enc, dec, tgt, enc_seg, dec_seg)
    np.testing.assert_allclose(packed[0, :7], ref[0, :7], rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())

