"""bfloat16 activations (the dtype TPU users run) against the float64 numpy T5.1.1.

Parameters stay float32 in both; with dtype="bfloat16" the activations, the attention and the
decode cache are bfloat16, while the logits and the loss come out float32. Tolerance: bfloat16
keeps 8 bits of mantissa (relative rounding 2**-9 ~ 0.002 per operation); through 2 + 2 layers the
logits stay within 5% of the logits' standard deviation of the float64 reference (float32: 1e-4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_t5

from gqa_t5x.model import decoding
from gqa_t5x.model.config import get_config
from gqa_t5x.model.network import Transformer
from gqa_t5x.training import models

F32 = get_config("tiny", vocab_size=48, num_kv_heads=2)
BF16 = F32.replace(dtype="bfloat16")
BF16_TOLERANCE = 5e-2  # max |logit error| / std(logits)
ENC = np.array([[5, 9, 23, 14, 7, 1, 0, 0], [12, 3, 8, 40, 17, 22, 6, 1]], np.int32)
TGT = np.array([[4, 11, 6, 25, 9, 1], [31, 7, 19, 2, 1, 0]], np.int32)
DEC = np.concatenate([np.zeros((2, 1), np.int32), TGT[:, :-1]], axis=1)


@functools.cache
def _params(sharpen: float = 1.0):
    """Random float32 params; norm scales randomized so that a dtype slip in a norm shows. With
    `sharpen`, the logits kernel is scaled up: a sharpened output distribution, whose argmax the
    bfloat16 rounding cannot flip."""
    variables = jax.jit(functools.partial(Transformer(F32).init, enable_dropout=False))(
        jax.random.PRNGKey(3), ENC, DEC, TGT)
    r = np.random.default_rng(4)

    def randomize(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(r.uniform(0.5, 1.5, x.shape), jnp.float32)
        if name == "kernel" and path[-2].key == "logits_dense":
            return x * sharpen
        return x

    return jax.tree_util.tree_map_with_path(randomize, variables["params"])


def _logits(config, params):
    return jax.jit(functools.partial(Transformer(config).apply, enable_dropout=False))(
        {"params": params}, ENC, DEC, TGT)


def test_bfloat16_forward_within_tolerance_and_logits_float32():
    params = _params()
    reference = numpy_t5.forward(params, F32, ENC, DEC, TGT)  # float64
    scale = np.std(reference)
    f32, bf16 = _logits(F32, params), _logits(BF16, params)
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(f32) - reference)) / scale < 1e-4
    err = np.max(np.abs(np.asarray(bf16) - reference)) / scale
    # Within the tolerance, and really computed in bfloat16 (not float32 relabelled).
    assert 1e-4 < err < BF16_TOLERANCE, err


def test_bfloat16_loss_is_float32_and_close_to_the_reference():
    params = _params()
    model = models.build_model(BF16, z_loss=0.0)
    batch = {"encoder_input_tokens": ENC, "decoder_input_tokens": DEC,
             "decoder_target_tokens": TGT}
    loss, sums = jax.jit(model.eval_fn)(params, batch)
    assert loss.dtype == jnp.float32 and sums["cross_ent_sum"].dtype == jnp.float32
    reference = numpy_t5.forward(params, F32, ENC, DEC, TGT)
    log_p = reference - np.log(np.sum(np.exp(reference - reference.max(-1, keepdims=True)),
                                      -1, keepdims=True)) - reference.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_p, TGT[..., None], -1)[..., 0]
    want = float(np.sum(nll * (TGT > 0)))
    np.testing.assert_allclose(float(sums["cross_ent_sum"]), want, rtol=1e-2)


def test_bfloat16_cache_stays_bfloat16():
    params = _params()
    module = Transformer(BF16)
    encoded = decoding.encode(module, params, ENC)
    assert encoded.dtype == jnp.bfloat16
    cache = decoding.init_cache(module, params, encoded, ENC, max_decode_length=4)
    _, stepped = jax.jit(functools.partial(decoding.decode_step, module, max_decode_length=4))(
        params, cache, encoded, ENC, jnp.zeros((2,), jnp.int32))
    for tree in (cache, stepped):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        kv = [x for p, x in leaves if str(p[-1].key).startswith("cached_")]
        assert len(kv) == 2 * 2 * 2  # 2 layers x (self, cross) x (key, value)
        assert all(x.dtype == jnp.bfloat16 for x in kv)


def _numpy_greedy(params, config, length):
    """Greedy decoding by re-running the float64 forward on the growing prefix; also the
    smallest gap between the best and second-best logit over the steps."""
    out = np.zeros((ENC.shape[0], length), np.int32)
    ended = np.zeros(ENC.shape[0], bool)
    gap = np.inf
    for i in range(length):
        dec = np.concatenate([np.zeros((ENC.shape[0], 1), np.int32), out[:, :i]], axis=1)
        logits = numpy_t5.forward(params, config, ENC, dec, np.ones_like(dec))[:, i]  # [B, V]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        gap = min(gap, float(np.min((top2[:, 1] - top2[:, 0])[~ended]))) if (~ended).any() \
            else gap
        nxt = np.where(ended, 0, np.argmax(logits, axis=-1))
        out[:, i] = nxt
        ended |= nxt == 1
    return out, gap


def test_bfloat16_greedy_agrees_on_a_sharpened_model():
    params = _params(sharpen=8.0)
    want, gap = _numpy_greedy(params, F32, 6)
    assert gap > 0.5, gap  # the sharpening makes every step's choice clear
    tokens, _ = decoding.generate(Transformer(BF16), params, jnp.asarray(ENC),
                                  max_decode_length=6)
    np.testing.assert_array_equal(np.asarray(tokens), want)
