"""What a conversion keeps before any uptraining: cross-entropy and KL from the source model.

For each conversion of an MHA (or GQA) model (a method of `convert_params` and a grouping), on
the first batches of a task's validation split, teacher forced:

  cross_entropy   mean over target tokens of -log p_converted(target), in nats (no z-loss);
  kl_from_source  mean over target tokens of KL(p_source || p_converted), in nats;
  token_accuracy  share of target tokens whose argmax is the target.

The source model is reported too ("source", whose KL is 0), so a row reads as what the
conversion lost. Target tokens are those with a nonzero `decoder_loss_weights` (non-padding).
This is the alpha = 0 column of the reproduction grid.

Variants are named "<method>" for contiguous groups and "<method>/<grouping>" otherwise, e.g.
"aligned/similarity".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from gqa_t5x.checkpoints import open_checkpoint
from gqa_t5x.checkpoints.t5x import infer_config_from_shapes
from gqa_t5x.conversion.grouping import GROUPINGS
from gqa_t5x.conversion.pooling import METHODS, check_method, convert_params
from gqa_t5x.data import synthetic, tasks
from gqa_t5x.data.registry import get_mixture_or_task
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.network import Transformer

VARIANTS = ("mean", "first", "random", "aligned", "aligned/similarity")
SOURCE = "source"


def parse_variant(name: str) -> tuple[str, str]:
    """'aligned/similarity' -> ('aligned', 'similarity'); 'mean' -> ('mean', 'contiguous')."""
    method, _, grouping = name.partition("/")
    grouping = grouping or "contiguous"
    if method not in METHODS or grouping not in GROUPINGS:
        raise ValueError(f"unknown conversion {name!r}: write <method>[/<grouping>] with a method "
                         f"from {METHODS} and a grouping from {GROUPINGS}, e.g. "
                         "'aligned/similarity'")
    check_method(method, grouping)
    return method, grouping


def variant_name(method: str, grouping: str = "contiguous") -> str:
    return method if grouping == "contiguous" else f"{method}/{grouping}"


def default_feature_lengths(task: str) -> dict[str, int]:
    """The paper's lengths for its tasks, the synthetic suite's for the synthetic tasks."""
    if task in synthetic.SYNTHETIC_FEATURE_LENGTHS:
        return dict(synthetic.SYNTHETIC_FEATURE_LENGTHS[task])
    if task in tasks.TASK_FEATURE_LENGTHS:
        return tasks.feature_lengths(task)
    raise ValueError(f"task {task!r} has no default feature lengths; pass them "
                     "(--feature_lengths inputs=N,targets=M)")


def validation_batches(task: str, feature_lengths: Mapping[str, int] | None = None, *,
                       num_batches: int = 4, batch_size: int = 8, split: str = "validation"
                       ) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of `batch_size` examples of the task's `split`, in order
    (no shuffling), as model features (encoder_input_tokens, decoder_input_tokens,
    decoder_target_tokens, decoder_loss_weights)."""
    lengths = dict(feature_lengths or default_feature_lengths(task))
    source = get_mixture_or_task(task)
    ds = source.get_dataset(lengths, split=split, shuffle=False, seed=0, use_cached=False)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds.take(num_batches * batch_size), lengths)
    batches = [{k: np.asarray(v) for k, v in b.items()}
               for b in ds.batch(batch_size).as_numpy_iterator()]
    if not batches:
        raise ValueError(f"task {task!r} has no {split} examples")
    return batches


def token_sums(source_logits, logits, batch: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
    """Sums over the batch's target tokens of -log p(target), KL(p_source || p) and correct
    argmaxes, and the number of target tokens; logits [B, T, V]."""
    targets = batch["decoder_target_tokens"]  # [B, T]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else weights
    weights = jnp.asarray(weights, jnp.float32)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    log_q = jax.nn.log_softmax(source_logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [B, T]
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)  # [B, T]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"cross_entropy": jnp.sum(nll * weights), "kl_from_source": jnp.sum(kl * weights),
            "token_accuracy": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def _logits_fn(config: TransformerConfig):
    module = Transformer(config)

    @jax.jit
    def fn(params, batch):
        return module.apply({"params": params}, batch["encoder_input_tokens"],
                            batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                            enable_dropout=False)  # [B, T, V]
    return fn


def conversion_quality(params: Mapping[str, Any], source_config: TransformerConfig,
                       target_config: TransformerConfig, task: str | None = None, *,
                       variants: Sequence[str] = VARIANTS, seed: int = 0,
                       batches: Sequence[Mapping[str, np.ndarray]] | None = None,
                       num_batches: int = 4, batch_size: int = 8,
                       feature_lengths: Mapping[str, int] | None = None
                       ) -> dict[str, dict[str, float]]:
    """{"source": metrics, variant: metrics, ...} for `params` (of `source_config`) converted
    to `target_config` by each variant ("mean", "aligned/similarity", ...; see the module
    docstring), on `batches` or else `validation_batches(task, ...)`. `seed` is that of
    "random". Each converted tree is evaluated and dropped before the next is made.
    """
    parsed = [parse_variant(v) for v in variants]
    if batches is None:
        if task is None:
            raise ValueError("conversion_quality needs a task or batches")
        batches = validation_batches(task, feature_lengths, num_batches=num_batches,
                                     batch_size=batch_size)
    source_fn, target_fn = _logits_fn(source_config), _logits_fn(target_config)
    sums_fn = jax.jit(token_sums)
    source_logits = [source_fn(params, b) for b in batches]

    def metrics(fn, converted):
        totals: dict[str, float] = {}
        for batch, reference in zip(batches, source_logits):
            for k, v in jax.device_get(sums_fn(reference, fn(converted, batch), batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        tokens = totals.pop("tokens")
        return {**{k: v / tokens for k, v in totals.items()}, "tokens": int(tokens)}

    results = {SOURCE: metrics(source_fn, params)}
    for name, (method, grouping) in zip(variants, parsed):
        converted = convert_params(params, source_config, target_config, method, seed=seed,
                                   grouping=grouping)
        results[name] = metrics(target_fn, converted)
        del converted
    return results


def checkpoint_conversion_quality(input_path: str, num_kv_heads: int, task: str, *,
                                  variants: Sequence[str] = VARIANTS,
                                  grouped: Sequence[str] | None = None,
                                  input_format: str = "auto",
                                  source_config: TransformerConfig | None = None,
                                  **kwargs: Any) -> dict[str, dict[str, float]]:
    """`conversion_quality` of the checkpoint at `input_path` (any format `gqa-convert`
    reads; all of it is held in memory) converted to `num_kv_heads` kv heads in `grouped`."""
    for v in variants:
        parse_variant(v)
    reader = open_checkpoint(input_path, input_format, source_config)
    source = reader.config or infer_config_from_shapes(reader.shapes())
    params = reader.read_all()
    target = with_kv_heads(source, num_kv_heads, grouped)
    return conversion_quality(params, source, target, task, variants=variants, **kwargs)


def format_quality(results: Mapping[str, Mapping[str, float]], task: str = "") -> str:
    """A table: one row per conversion, cross-entropy, KL from the source, token accuracy."""
    name_width = max(len(n) for n in results) + 2
    tokens = next(iter(results.values()))["tokens"]
    lines = [f"what each conversion keeps{' on ' + task if task else ''} "
             f"({tokens} target tokens, teacher forced; nats per token)",
             f"  {'conversion':<{name_width}}{'cross-entropy':>14}{'KL from source':>16}"
             f"{'token acc':>11}"]
    for name, m in results.items():
        lines.append(f"  {name:<{name_width}}{m['cross_entropy']:>14.4f}"
                     f"{m['kl_from_source']:>16.4f}{m['token_accuracy']:>11.4f}")
    return "\n".join(lines)


def parse_feature_lengths(text: str) -> dict[str, int]:
    """'inputs=128,targets=32' -> {'inputs': 128, 'targets': 32}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"feature lengths {text!r}: write name=length pairs, e.g. "
                             "'inputs=128,targets=32'")
        out[key.strip()] = int(value)
    return out
