"""EncoderDecoderModel: the T5 training loss, prediction and scoring, with t5x's interface.

A batch is a dict of seqio `EncDecFeatureConverter` features, all [B, S] (encoder) or [B, T]
(decoder) int32 arrays:
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
  and, when packed, encoder_segment_ids, decoder_segment_ids, encoder_positions,
  decoder_positions.

The loss is t5x's: softmax cross-entropy against (optionally label-smoothed) targets, plus
`z_loss * logsumexp(logits)^2` per token, weighted by `decoder_loss_weights`, summed, and divided
by `loss_normalizing_factor` (None: no division, t5x's default; a number; or
"NUM_REAL_TARGET_TOKENS": the batch's sum of weights). Label smoothing subtracts the entropy of the
smoothed target distribution, so that a perfect prediction has zero loss, as in t5x.

Axis letters: B batch, S input length, T target length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import config as config_lib
from gqa_t5x.model import decoding, scan
from gqa_t5x.model.network import Transformer

LOSS_NORMALIZING_FACTORS = ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS")


@gin.configurable(module="gqa_t5x.models")
def model_config(preset: str = "tiny", **overrides: Any) -> config_lib.TransformerConfig:
    """The TransformerConfig of preset `preset` with field overrides: what the gin files bind.

    `num_kv_heads=None` means multi-head: as many kv heads as query heads (the preset's or the
    `num_heads` override); `grouped` may be a list.
    """
    if overrides.get("num_kv_heads", 0) is None:
        heads = overrides.get("num_heads", config_lib.get_config(preset).num_heads)
        overrides["num_kv_heads"] = heads
    if "grouped" in overrides:
        overrides["grouped"] = tuple(overrides["grouped"])
    return config_lib.get_config(preset, **overrides)


# ---- the loss (pure) ----------------------------------------------------------------------------


def cross_entropy_with_logits(logits, targets, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0):
    """Per-token loss of integer `targets` [B, T] under `logits` [B, T, V].

    The smoothed target puts `1 - label_smoothing` on the target and spreads the rest evenly over
    the other V - 1 ids; it is never materialized as a [B, T, V] array.

    Returns:
      (loss [B, T] = cross-entropy - entropy of the smoothed target + z-loss, z_loss [B, T]).
    """
    logits = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    log_p_target = target_logit - log_z  # [B, T]
    confidence = 1.0 - label_smoothing
    if label_smoothing > 0.0:
        low = label_smoothing / (vocab - 1)
        sum_log_p = jnp.sum(logits, axis=-1) - vocab * log_z  # sum_v log p_v, [B, T]
        cross_entropy = -(confidence * log_p_target + low * (sum_log_p - log_p_target))
        normalizing = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        cross_entropy = cross_entropy - normalizing
    else:
        cross_entropy = -log_p_target
    token_z_loss = z_loss * jnp.square(log_z)  # [B, T]
    return cross_entropy + token_z_loss, token_z_loss


def normalizing_factor(factor, weights) -> jnp.ndarray | None:
    """The divisor of the summed loss: None, a number, or a name in LOSS_NORMALIZING_FACTORS."""
    if factor is None:
        return None
    if isinstance(factor, str):
        if factor == "NUM_REAL_TARGET_TOKENS":
            return jnp.sum(weights)
        if factor == "NUM_TOTAL_TARGET_TOKENS":
            return jnp.asarray(np.prod(weights.shape), jnp.float32)
        raise ValueError(f"loss_normalizing_factor={factor!r} is not a number, None, or one of "
                         f"{LOSS_NORMALIZING_FACTORS}")
    return jnp.asarray(factor, jnp.float32)


def weighted_loss(logits, targets, weights, *, z_loss: float = 0.0, label_smoothing: float = 0.0,
                  loss_normalizing_factor=None):
    """The objective and its parts, summed over the batch.

    Args:
      logits: [B, T, V]; targets: [B, T] int; weights: [B, T] (0 on padding).
    Returns:
      (loss, metrics): loss is the scalar that is differentiated; metrics holds sums over the
      batch: cross_ent_sum, z_loss_sum, correct (argmax == target), weight_sum, num_examples.
    """
    weights = jnp.asarray(weights, jnp.float32)
    token_loss, token_z = cross_entropy_with_logits(
        logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
    loss = jnp.sum(token_loss * weights)
    z_sum = jnp.sum(token_z * weights)
    divisor = normalizing_factor(loss_normalizing_factor, weights)
    objective = loss if divisor is None else loss / divisor
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    metrics = {
        "cross_ent_sum": loss - z_sum,
        "z_loss_sum": z_sum,
        "correct": correct,
        "weight_sum": jnp.sum(weights),
        "num_examples": jnp.asarray(targets.shape[0], jnp.float32),
    }
    return objective, metrics


def summarize_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Per-token averages from (accumulated) `weighted_loss` sums: loss (cross-entropy +
    z-loss), cross_ent_loss, z_loss, accuracy."""
    w = max(float(sums["weight_sum"]), 1e-9)
    ce, z = float(sums["cross_ent_sum"]), float(sums["z_loss_sum"])
    return {"loss": (ce + z) / w, "cross_ent_loss": ce / w, "z_loss": z / w,
            "accuracy": float(sums["correct"]) / w}


# ---- the model ----------------------------------------------------------------------------------


@gin.configurable(module="gqa_t5x.models")
class EncoderDecoderModel:
    """A `Transformer` with T5's loss and t5x's `loss_fn` / `predict_batch` / `score_batch`.

    Args:
      module: the flax module (its `config` is the model's hyperparameters).
      z_loss: coefficient of logsumexp(logits)^2 (t5x: 1e-4).
      label_smoothing: mass spread over the non-target ids.
      loss_normalizing_factor: see the module docstring.
      decoding: default keyword arguments of `decoding.generate` (default greedy, as the paper).
    """

    def __init__(self, module: Transformer, *, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 loss_normalizing_factor=None, decoding: Mapping[str, Any] | None = None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        normalizing_factor(loss_normalizing_factor, jnp.ones((1, 1)))  # validate early
        self.module = module
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.loss_normalizing_factor = loss_normalizing_factor
        self.decoding = {"method": "greedy", **dict(decoding or {})}
        # Params are always held in t5x's unscanned layout (model/scan.py). Initialization and
        # decoding run the unscanned network: the same seed gives the same params scanned or
        # not, and the decode cache keeps its per-layer layout.
        self._unscanned = module.clone(config=module.config.replace(scan_layers=False,
                                                                    remat="none"))

    @property
    def config(self) -> config_lib.TransformerConfig:
        return self.module.config

    def get_initial_variables(self, rng, input_shapes: Mapping[str, tuple[int, ...]]):
        """Variables ('params' and 'params_axes') for inputs of `input_shapes`:
        {"encoder_input_tokens": (B, S), "decoder_input_tokens": (B, T)}."""
        enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
        dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self._unscanned.init(rng, enc, dec, dec, enable_dropout=False)

    def _logits(self, params, batch, dropout_rng):
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        if self.config.scan_layers:
            params = scan.stack_layers(params)  # inside the step: the stacking is compiled in
        return self.module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            batch.get("encoder_segment_ids"),
            batch.get("decoder_segment_ids"),
            batch.get("encoder_positions"),
            batch.get("decoder_positions"),
            enable_dropout=dropout_rng is not None,
            rngs=rngs,
        )  # [B, T, V]

    def loss_fn(self, params, batch, dropout_rng):
        """(loss, metric sums) of a batch; dropout is on iff `dropout_rng` is not None."""
        logits = self._logits(params, batch, dropout_rng)
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = batch["decoder_target_tokens"] > 0
        return weighted_loss(logits, batch["decoder_target_tokens"], weights,
                             z_loss=self.z_loss, label_smoothing=self.label_smoothing,
                             loss_normalizing_factor=self.loss_normalizing_factor)

    def eval_fn(self, params, batch):
        """`loss_fn` without dropout."""
        return self.loss_fn(params, batch, None)

    def score_batch(self, params, batch, return_intermediates: bool = False):
        """Log-likelihood of each target sequence, sum over tokens of log p(target) [B]
        (weighted by decoder_loss_weights); with `return_intermediates`, also the per-token
        log-probabilities [B, T]."""
        logits = self._logits(params, batch, None)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = targets > 0
        log_p = jax.nn.log_softmax(logits, axis=-1)
        token_scores = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
        token_scores = token_scores * weights  # [B, T]
        scores = jnp.sum(token_scores, axis=-1)  # [B]
        if return_intermediates:
            return scores, {"token_scores": token_scores}
        return scores

    def predict_batch_with_aux(self, params, batch, decoder_params: Mapping[str, Any] | None = None,
                               rng=None):
        """Decoded tokens [B, L] (0 after EOS) and {"scores": [B]}; L is the length of
        `decoder_input_tokens` (or `decoder_target_tokens`) in the batch, or
        decoder_params["max_decode_length"]."""
        kwargs = {**self.decoding, **dict(decoder_params or {})}
        if "max_decode_length" not in kwargs:
            key = "decoder_input_tokens" if "decoder_input_tokens" in batch else \
                "decoder_target_tokens"
            kwargs["max_decode_length"] = batch[key].shape[1]
        if rng is not None:
            kwargs["rng"] = rng
        tokens, scores = decoding.generate(self._unscanned, params, batch["encoder_input_tokens"],
                                           **kwargs)
        return tokens, {"scores": scores}

    def predict_batch(self, params, batch, decoder_params: Mapping[str, Any] | None = None,
                      rng=None):
        """Decoded tokens [B, L]; greedy unless `decoder_params` (arguments of
        `decoding.generate`) say otherwise."""
        return self.predict_batch_with_aux(params, batch, decoder_params, rng)[0]


@gin.configurable(module="gqa_t5x.models")
def build_model(config: config_lib.TransformerConfig | None = None, *, z_loss: float = 1e-4,
                label_smoothing: float = 0.0, loss_normalizing_factor=None,
                dropout_rate: float | None = None,
                decoding: Mapping[str, Any] | None = None) -> EncoderDecoderModel:
    """An EncoderDecoderModel for `config` (default: gin's `model_config()`), with
    `dropout_rate` replacing the config's when given."""
    config = config if config is not None else model_config()
    if dropout_rate is not None:
        config = config.replace(dropout_rate=float(dropout_rate))
    return EncoderDecoderModel(Transformer(config), z_loss=z_loss, label_smoothing=label_smoothing,
                               loss_normalizing_factor=loss_normalizing_factor, decoding=decoding)
