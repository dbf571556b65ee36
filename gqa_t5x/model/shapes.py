"""The network's parameter table: every parameter path of `Transformer(config)` with its shape.

Used to check checkpoints before reading them (which array is missing or mis-shaped) and to count
parameters without building the model. `tests/test_network.py` checks it against `Transformer.init`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.model.config import TransformerConfig

Path = tuple[str, ...]


def param_shapes(config: TransformerConfig) -> dict[Path, tuple[int, ...]]:
    """Every parameter path of `Transformer(config)` with its shape (see network.py)."""
    d, v, f, n, h = (config.emb_dim, config.vocab_size, config.mlp_dim, config.num_heads,
                     config.head_dim)
    b = config.relative_attention_num_buckets

    def attention(kind):
        k = config.kv_heads(kind)
        return {("query", "kernel"): (d, n * h), ("key", "kernel"): (d, k * h),
                ("value", "kernel"): (d, k * h), ("out", "kernel"): (n * h, d)}

    mlp = {("wi_0", "kernel"): (d, f), ("wi_1", "kernel"): (d, f), ("wo", "kernel"): (f, d)}
    shapes: dict[Path, tuple[int, ...]] = {("token_embedder", "embedding"): (v, d)}
    shapes[("encoder", "relpos_bias", "rel_embedding")] = (n, b)
    for i in range(config.num_encoder_layers):
        layer = ("encoder", f"layers_{i}")
        shapes[layer + ("pre_attention_layer_norm", "scale")] = (d,)
        shapes.update({layer + ("attention",) + k: s for k, s in attention("encoder_self").items()})
        shapes[layer + ("pre_mlp_layer_norm", "scale")] = (d,)
        shapes.update({layer + ("mlp",) + k: s for k, s in mlp.items()})
    shapes[("encoder", "encoder_norm", "scale")] = (d,)
    shapes[("decoder", "relpos_bias", "rel_embedding")] = (n, b)
    for i in range(config.num_decoder_layers):
        layer = ("decoder", f"layers_{i}")
        shapes[layer + ("pre_self_attention_layer_norm", "scale")] = (d,)
        shapes.update({layer + ("self_attention",) + k: s
                       for k, s in attention("decoder_self").items()})
        shapes[layer + ("pre_cross_attention_layer_norm", "scale")] = (d,)
        shapes.update({layer + ("encoder_decoder_attention",) + k: s
                       for k, s in attention("cross").items()})
        shapes[layer + ("pre_mlp_layer_norm", "scale")] = (d,)
        shapes.update({layer + ("mlp",) + k: s for k, s in mlp.items()})
    shapes[("decoder", "decoder_norm", "scale")] = (d,)
    shapes[("decoder", "logits_dense", "kernel")] = (d, v)
    return shapes


def check_shapes(got: Mapping[Path, tuple[int, ...]], expected: Mapping[Path, tuple[int, ...]],
                 where: str) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped arrays of `where`."""
    missing = [p for p in expected if p not in got]
    unexpected = [p for p in got if p not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing arrays: " + _list_paths(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected arrays: " + _list_paths(unexpected))
    for p, shape in expected.items():
        if p in got and tuple(got[p]) != tuple(shape):
            problems.append(f"{'/'.join(p)} has shape {tuple(got[p])}, expected {tuple(shape)}")
    if problems:
        raise ValueError(f"{where} does not match the config: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _list_paths(paths, limit: int = 6) -> str:
    names = ["/".join(p) for p in paths[:limit]]
    return ", ".join(names) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def tree_shapes(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of the array leaves of a nested dict."""
    out: dict[Path, tuple[int, ...]] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(tree_shapes(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = tuple(np.shape(value))
    return out


def count_params(config: TransformerConfig) -> int:
    """Number of parameters of `Transformer(config)`."""
    return int(sum(np.prod(s) for s in param_shapes(config).values()))
