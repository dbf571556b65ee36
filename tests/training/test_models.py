"""EncoderDecoderModel: loss against a numpy reference, scoring, greedy prediction, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model.config import get_config
from gqa_t5x.training import models, optim

V = 24


def _numpy_loss(logits, targets, weights, z_loss, label_smoothing, normalizer=None):
    """t5x's loss with an explicit one-hot smoothed target distribution."""
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    log_p = logits - log_z[..., None]
    conf = 1.0 - label_smoothing
    low = label_smoothing / (V - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], conf, axis=-1)
    ce = -np.sum(soft * log_p, -1)
    if label_smoothing:
        ce -= -(conf * np.log(conf) + (V - 1) * low * np.log(low + 1e-20))
    total = np.sum((ce + z_loss * log_z**2) * weights)
    return total if normalizer is None else total / normalizer


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("factor", [None, "NUM_REAL_TARGET_TOKENS", 1000.0])
def test_weighted_loss_matches_numpy(label_smoothing, factor):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    loss, sums = models.weighted_loss(logits, targets, weights, z_loss=1e-4,
                                      label_smoothing=label_smoothing,
                                      loss_normalizing_factor=factor)
    normalizer = {None: None, "NUM_REAL_TARGET_TOKENS": weights.sum(), 1000.0: 1000.0}[factor]
    want = _numpy_loss(logits, targets, weights, 1e-4, label_smoothing, normalizer)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(sums["weight_sum"]) == weights.sum()
    correct = np.sum((logits.argmax(-1) == targets) * weights)
    assert float(sums["correct"]) == correct


def test_label_smoothing_perfect_prediction_has_near_zero_loss():
    # The smoothed distribution itself as prediction: cross-entropy equals its entropy.
    ls = 0.1
    probs = np.full((1, 1, V), ls / (V - 1))
    probs[0, 0, 5] = 1 - ls
    loss, _ = models.weighted_loss(np.log(probs), np.array([[5]]), np.ones((1, 1)),
                                   label_smoothing=ls)
    assert abs(float(loss)) < 1e-5


def test_bad_loss_normalizing_factor():
    with pytest.raises(ValueError, match="loss_normalizing_factor='TOKENS'"):
        models.build_model(get_config("tiny"), loss_normalizing_factor="TOKENS")


def _model_and_params():
    model = models.build_model(get_config("tiny", vocab_size=V, num_kv_heads=2))
    variables = model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 7), "decoder_input_tokens": (2, 5)})
    return model, variables["params"]


def test_score_batch_is_sum_of_target_log_probs():
    model, params = _model_and_params()
    enc = jnp.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]])
    tgt = jnp.array([[3, 4, 5, 1, 0], [6, 1, 0, 0, 0]])
    dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], 1)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(jnp.int32)}
    logits = np.asarray(model.module.apply({"params": params}, enc, dec_in, tgt,
                                           enable_dropout=False), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(log_p[b, t, int(tgt[b, t])] for t in range(5) if tgt[b, t] > 0) for b in range(2)]
    got = model.score_batch(params, batch)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_predict_batch_is_greedy_argmax_of_full_forward():
    model, params = _model_and_params()
    enc = jnp.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0]])
    length = 5
    got = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc,
                                                  "decoder_input_tokens": jnp.zeros((2, length),
                                                                                    jnp.int32)}))
    # Reference: re-run the teacher-forced network on the prefix, take the argmax.
    want = np.zeros((2, length), np.int32)
    for b in range(2):
        out = []
        for t in range(length):
            dec_in = np.array([[0] + out + [0] * (length - 1 - len(out))], np.int32)
            logits = model.module.apply({"params": params}, enc[b:b + 1], dec_in,
                                        np.ones_like(dec_in), enable_dropout=False)
            tok = int(np.argmax(logits[0, t]))
            out.append(tok)
            if tok == 1:
                break
        want[b, :len(out)] = out
    np.testing.assert_array_equal(got, want)


def test_rsqrt_schedule_values():
    s = optim.rsqrt_schedule(1.0, 10_000)
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(9_999)) == pytest.approx(0.01)
    assert float(s(40_000)) == pytest.approx(1 / 200)
    assert float(s(1_000_000)) == pytest.approx(1e-3)
    assert float(optim.constant_schedule(1e-3)(123)) == pytest.approx(1e-3)


def test_adafactor_factors_large_matrices_only():
    tx = optim.adafactor()
    params = {"big": jnp.ones((256, 128)), "small": jnp.ones((64, 32)), "vec": jnp.ones((200,))}
    state = tx.init(params)[0]
    assert {state.v_row["big"].shape, state.v_col["big"].shape} == {(256,), (128,)}
    assert state.v["small"].shape == (64, 32) and state.v["vec"].shape == (200,)


def test_adafactor_first_update_is_clipped_parameter_scaled_direction():
    # Step 1: v = g^2 (decay 1 - 1^-0.8 = 0), so the update is sign(g), whose RMS 1 is not
    # clipped, scaled by max(rms(param), 1e-3) and negated.
    tx = optim.adafactor()
    p = {"w": jnp.full((4, 3), 2.0)}
    g = {"w": jnp.array(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
    upd, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(upd["w"]), -2.0 * np.sign(np.asarray(g["w"])),
                               rtol=1e-4)


def test_scanned_model_scores_and_predicts_from_unscanned_params():
    """A scan_layers model takes the params in t5x's layout (as checkpoints and the train state
    hold them) and scores and decodes as the plain model does."""
    model, params = _model_and_params()
    scanned = models.build_model(model.config.replace(scan_layers=True, remat="full"))
    enc = jnp.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0]])
    tgt = jnp.array([[3, 4, 5, 1, 0], [6, 1, 0, 0, 0]])
    dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], 1)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": tgt}
    np.testing.assert_allclose(scanned.score_batch(params, batch),
                               model.score_batch(params, batch), rtol=1e-5)
    np.testing.assert_array_equal(scanned.predict_batch(params, batch),
                                  model.predict_batch(params, batch))
