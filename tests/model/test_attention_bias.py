"""The attention bias as separate terms: the mask [B, 1, T, S] and the relative position bias
[1, N, T, S] are added inside each attention, and no [B, N, T, S] sum is built in the network.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model.attention import dot_product_attention
from gqa_t5x.model.config import get_config
from gqa_t5x.model.network import Transformer


def _numpy_attention(q, k, v, bias):
    """q [B, T, N, H], k/v [B, K, S, H], bias [B, N, T, S]; query head n reads kv head n // G."""
    b, t, n, h = q.shape
    g = n // k.shape[1]
    out = np.zeros((b, t, n, h))
    for head in range(n):
        logits = np.einsum("bth,bsh->bts", q[:, :, head], k[:, head // g]) + bias[:, head]
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, :, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // g]
    return out


def test_bias_terms_equal_their_sum():
    r = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 3, 5, 4, 2, 8
    q, key, value = (r.normal(size=shape).astype(np.float32)
                     for shape in ((b, t, n, h), (b, k, s, h), (b, k, s, h)))
    mask = np.where(r.random((b, 1, t, s)) < 0.3, -1e10, 0.0).astype(np.float32)
    relpos = r.normal(size=(1, n, t, s)).astype(np.float32)
    want = _numpy_attention(q, key, value, np.broadcast_to(mask + relpos, (b, n, t, s)))
    got = dot_product_attention(q, key, value, (mask, relpos))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # One query (a decode step, the compiled kernel on CPU where it applies).
    got = dot_product_attention(q[:, :1], key, value, (mask[:, :, :1], relpos[:, :, :1]))
    np.testing.assert_allclose(np.asarray(got), want[:, :1], rtol=1e-5, atol=1e-5)


def _shapes(jaxpr):
    """Shapes of every value computed in `jaxpr` and the jaxprs inside it (jit, custom_vjp)."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for value in eqn.params.values():
            for x in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(x, "jaxpr", x)  # ClosedJaxpr or Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_no_batch_by_heads_bias_in_the_forward():
    # GQA (K=2 of N=4) so that the attention's own logits are [B, K, G, T, S], not [B, N, T, S].
    config = get_config("tiny", num_kv_heads=2, grouped=("encoder_self", "decoder_self", "cross"))
    b, s, t = 2, 7, 5
    enc, dec = jnp.ones((b, s), jnp.int32), jnp.ones((b, t), jnp.int32)
    model = Transformer(config)
    params = model.init(jax.random.PRNGKey(0), enc, dec, dec, enable_dropout=False)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, enable_dropout=False))(
        params, enc, dec, dec).jaxpr
    shapes = set(_shapes(jaxpr))
    n = config.num_heads
    assert (1, n, s, s) in shapes and (1, n, t, t) in shapes  # the relative position biases
    for shape in ((b, n, s, s), (b, n, t, t), (b, n, t, s)):
        assert shape not in shapes, shape
