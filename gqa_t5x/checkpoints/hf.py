"""Hugging Face T5.1.1 <-> t5x parameter names, as pure functions on configs and name->array maps.

`config_from_hf_t5` reads a transformers `T5Config` (or its dict), `params_from_hf_t5` turns a
PyTorch-style state dict into our nested t5x parameter tree, and `params_to_hf_t5` goes back.
One table (`parameter_table`) drives both directions and the shape checks; the streaming
reader in `checkpoints.py` walks it row by row.

Layouts: HF `nn.Linear` weights are [out, in], t5x kernels are [in, out], so every projection is
transposed; HF's relative attention bias is an embedding [buckets, N], t5x's is [N, buckets]; the
HF lm_head [V, D] is t5x's logits_dense kernel [D, V]. Key/value kernels have K = kv heads of
their attention (`config.kv_heads(kind)`), so a grouped checkpoint in HF naming maps too.

Only numpy is imported here. Values may be numpy arrays or torch tensors (detected by their
`detach` method, so torch is never imported by this module); everything becomes float32 numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.model.config import TransformerConfig

# Keys HF checkpoints may carry that hold nothing of their own: the token embeddings tied to
# `shared.weight`, and a cross-attention relative bias some old checkpoints stored but T5 never
# uses.
IGNORED_HF_KEYS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


# ---- configuration ------------------------------------------------------------------------------


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def hf_t5_config_dict(config: TransformerConfig) -> dict[str, Any]:
    """The keyword arguments of a transformers `T5Config` for `config` (multi-head, untied,
    gated-GELU, no dropout), the inverse of `config_from_hf_t5` for K == N."""
    return dict(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def config_from_hf_t5(hf_config: Any, **overrides: Any) -> TransformerConfig:
    """`TransformerConfig` of a Hugging Face T5.1.1 model (a `T5Config` or its dict).

    Only T5.1.1-style models load: gated-GELU MLP and untied, unscaled logits. Transformers >= 5
    records the latter as `scale_decoder_outputs=False` (it always ties the embedding itself);
    older configs record it as `tie_word_embeddings=False`. HF T5 is multi-head, so
    `num_kv_heads = num_heads` unless the config has a `num_key_value_heads` field.
    `overrides` replace fields afterwards (e.g. `grouped=...`, `dtype="bfloat16"`).
    """
    proj = _get(hf_config, "feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ValueError(
            f"Hugging Face T5 config has feed_forward_proj={proj!r}; only T5.1.1 models "
            "(feed_forward_proj='gated-gelu') can be loaded")
    scale = _get(hf_config, "scale_decoder_outputs")
    if scale is None:  # configs written before transformers 5
        scale = _get(hf_config, "tie_word_embeddings", True) is not False
    if scale:
        raise ValueError(
            "Hugging Face T5 config ties the logits to the embedding and rescales decoder outputs "
            "by d_model**-0.5 (scale_decoder_outputs=True / tie_word_embeddings=True, the "
            "original T5); T5.1.1 has untied, unscaled logits")
    missing = [n for n in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if _get(hf_config, n) is None]
    if missing:
        raise ValueError(f"Hugging Face T5 config lacks {missing}")
    num_heads = int(_get(hf_config, "num_heads"))
    num_layers = int(_get(hf_config, "num_layers"))
    num_decoder_layers = _get(hf_config, "num_decoder_layers")
    config = TransformerConfig(
        vocab_size=int(_get(hf_config, "vocab_size")),
        emb_dim=int(_get(hf_config, "d_model")),
        num_heads=num_heads,
        num_kv_heads=int(_get(hf_config, "num_key_value_heads") or num_heads),
        head_dim=int(_get(hf_config, "d_kv")),
        mlp_dim=int(_get(hf_config, "d_ff")),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(num_layers if num_decoder_layers is None else num_decoder_layers),
        dropout_rate=float(_get(hf_config, "dropout_rate", 0.1)),
        relative_attention_num_buckets=int(_get(hf_config, "relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(
            _get(hf_config, "relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(_get(hf_config, "layer_norm_epsilon", 1e-6)),
    )
    return config.replace(**overrides) if overrides else config


# ---- the name table -----------------------------------------------------------------------------

# (hf name, t5x path, transpose, t5x shape)
_Row = tuple[str, tuple[str, ...], bool, tuple[int, ...]]


def _attention_rows(config: TransformerConfig, hf: str, t5x: tuple[str, ...],
                    kind: str) -> list[_Row]:
    d, h = config.emb_dim, config.head_dim
    n, k = config.num_heads, config.kv_heads(kind)
    return [
        (f"{hf}.q.weight", t5x + ("query", "kernel"), True, (d, n * h)),
        (f"{hf}.k.weight", t5x + ("key", "kernel"), True, (d, k * h)),
        (f"{hf}.v.weight", t5x + ("value", "kernel"), True, (d, k * h)),
        (f"{hf}.o.weight", t5x + ("out", "kernel"), True, (n * h, d)),
    ]


def _mlp_rows(config: TransformerConfig, hf: str, t5x: tuple[str, ...]) -> list[_Row]:
    d, f = config.emb_dim, config.mlp_dim
    return [
        (f"{hf}.wi_0.weight", t5x + ("wi_0", "kernel"), True, (d, f)),
        (f"{hf}.wi_1.weight", t5x + ("wi_1", "kernel"), True, (d, f)),
        (f"{hf}.wo.weight", t5x + ("wo", "kernel"), True, (f, d)),
    ]


def parameter_table(config: TransformerConfig) -> list[_Row]:
    """Every parameter of the model: HF name, t5x path, whether to transpose, t5x shape."""
    d, v = config.emb_dim, config.vocab_size
    relpos = (config.num_heads, config.relative_attention_num_buckets)
    rows: list[_Row] = [("shared.weight", ("token_embedder", "embedding"), False, (v, d))]
    rows.append(("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 ("encoder", "relpos_bias", "rel_embedding"), True, relpos))
    for i in range(config.num_encoder_layers):
        hf, t5x = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
        rows.append((f"{hf}.0.layer_norm.weight", t5x + ("pre_attention_layer_norm", "scale"),
                     False, (d,)))
        rows += _attention_rows(config, f"{hf}.0.SelfAttention", t5x + ("attention",),
                                "encoder_self")
        rows.append((f"{hf}.1.layer_norm.weight", t5x + ("pre_mlp_layer_norm", "scale"),
                     False, (d,)))
        rows += _mlp_rows(config, f"{hf}.1.DenseReluDense", t5x + ("mlp",))
    rows.append(("encoder.final_layer_norm.weight", ("encoder", "encoder_norm", "scale"),
                 False, (d,)))
    rows.append(("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 ("decoder", "relpos_bias", "rel_embedding"), True, relpos))
    for i in range(config.num_decoder_layers):
        hf, t5x = f"decoder.block.{i}.layer", ("decoder", f"layers_{i}")
        rows.append((f"{hf}.0.layer_norm.weight", t5x + ("pre_self_attention_layer_norm", "scale"),
                     False, (d,)))
        rows += _attention_rows(config, f"{hf}.0.SelfAttention", t5x + ("self_attention",),
                                "decoder_self")
        rows.append((f"{hf}.1.layer_norm.weight",
                     t5x + ("pre_cross_attention_layer_norm", "scale"), False, (d,)))
        rows += _attention_rows(config, f"{hf}.1.EncDecAttention",
                                t5x + ("encoder_decoder_attention",), "cross")
        rows.append((f"{hf}.2.layer_norm.weight", t5x + ("pre_mlp_layer_norm", "scale"),
                     False, (d,)))
        rows += _mlp_rows(config, f"{hf}.2.DenseReluDense", t5x + ("mlp",))
    rows.append(("decoder.final_layer_norm.weight", ("decoder", "decoder_norm", "scale"),
                 False, (d,)))
    rows.append(("lm_head.weight", ("decoder", "logits_dense", "kernel"), True, (d, v)))
    return rows


def _hf_shape(row: _Row) -> tuple[int, ...]:
    _, _, transpose, shape = row
    return tuple(reversed(shape)) if transpose else shape


def _to_numpy(value: Any) -> np.ndarray:
    """numpy array or torch tensor (duck-typed, bfloat16 included) -> float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize < 4:
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


# ---- state dict -> params -----------------------------------------------------------------------


def params_from_hf_t5(state_dict: Mapping[str, Any],
                      config: TransformerConfig) -> dict[str, Any]:
    """Nested t5x parameter dict (float32 numpy) from a Hugging Face T5.1.1 state dict.

    `state_dict` maps HF names to numpy arrays or torch tensors. A checkpoint that stored only
    `shared.weight` (tied) gets the logits kernel from it. Missing keys, wrong shapes and keys
    that the config has no place for (e.g. more layers than the config) raise ValueError.
    """
    keys = set(state_dict)
    rows = parameter_table(config)
    missing = []
    params: dict[str, Any] = {}
    for row in rows:
        name, path, transpose, shape = row
        source = name
        if name == "lm_head.weight" and name not in keys:
            source = "shared.weight"
        if (name.endswith("relative_attention_bias.weight") and name not in keys
                and _stack_has_no_layers(config, name)):
            value = np.zeros(shape, np.float32)  # a stack without layers never reads it
        elif source not in keys:
            missing.append(name)
            continue
        else:
            value = _to_numpy(state_dict[source])
            if value.shape != _hf_shape(row):
                raise ValueError(f"{source} has shape {value.shape}, expected {_hf_shape(row)} "
                                 f"(for {'/'.join(path)} {shape})")
            if transpose:
                value = np.ascontiguousarray(value.T)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if missing:
        raise ValueError(f"Hugging Face T5 state dict lacks {len(missing)} parameters the config "
                         f"needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    known = {row[0] for row in rows} | set(IGNORED_HF_KEYS)
    unexpected = sorted(keys - known)
    if unexpected:
        raise ValueError(f"Hugging Face T5 state dict has {len(unexpected)} parameters the config "
                         f"has no place for: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return params


def _stack_has_no_layers(config: TransformerConfig, name: str) -> bool:
    if name.startswith("encoder."):
        return config.num_encoder_layers == 0
    return config.num_decoder_layers == 0


# ---- params -> state dict -----------------------------------------------------------------------


def params_to_hf_t5(params: Mapping[str, Any], config: TransformerConfig) -> dict[str, np.ndarray]:
    """Hugging Face T5.1.1 state dict (float32 numpy, [out, in] weights) from t5x params.

    The tied aliases `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` are left out
    (transformers ties them to `shared.weight` on load); `lm_head.weight` is always written.
    """
    out: dict[str, np.ndarray] = {}
    for row in parameter_table(config):
        name, path, transpose, shape = row
        if (name.endswith("relative_attention_bias.weight")
                and _stack_has_no_layers(config, name)):
            continue
        node: Any = params
        for depth, part in enumerate(path):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"params lack {'/'.join(path[:depth + 1])}")
            node = node[part]
        value = _to_numpy(node)
        if value.shape != shape:
            raise ValueError(f"{'/'.join(path)} has shape {value.shape}, expected {shape}")
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    return out
