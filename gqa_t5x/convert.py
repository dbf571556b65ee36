"""Multi-head to grouped-query conversion: key/value head pooling as pure numpy functions.

The paper (Ainslie et al. 2023, section 2.1) converts a multi-head checkpoint by mean-pooling the
key and value projections of the heads in each group; its ablation compares keeping the first head
of each group and a fresh random initialization. Queries, outputs and everything else are kept.

Groups are contiguous: source kv head n belongs to target kv head n // (N // K), the same mapping
`attention.py` uses for query heads, so query head q keeps attending through the pooled version of
the heads it used before. Converting an existing GQA-K checkpoint to GQA-K' (K' dividing K) pools
the K kv heads in the same way; pooling means of equal-size groups again gives the mean of the
original heads.

Everything here works on numpy arrays (jax arrays are accepted and returned as numpy), so the
streaming converter can pool one array at a time without jax.

Axis letters: D model width, N heads of the kernel being pooled, K target kv heads, G = N // K
heads per group, H head width, V vocabulary, F MLP width.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.config import ATTENTION_KINDS, TransformerConfig

METHODS = ("mean", "first", "random")

# Param-tree names of each attention kind: (stack, attention module name).
_ATTENTION_MODULES = {
    "encoder_self": ("encoder", "attention"),
    "decoder_self": ("decoder", "self_attention"),
    "cross": ("decoder", "encoder_decoder_attention"),
}

Path = tuple[str, ...]


def pool_kv_heads(kernel, num_heads: int, num_kv_heads: int, method: str,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Pool a joined key or value kernel [D, N*H] into [D, K*H] with K = num_kv_heads.

    Args:
      kernel: [D, N*H], head n in columns n*H:(n+1)*H (t5x's joined layout).
      num_heads: N, the heads the kernel holds (the source kv heads).
      num_kv_heads: K, dividing N; head n goes to group n // (N // K).
      method: "mean" averages the heads of each group; "first" keeps head g * (N // K) of group
        g; "random" draws a fresh [D, K*H] kernel from the T5 initializer, normal with standard
        deviation 1 / sqrt(D) (variance_scaling(1.0, "fan_in", "normal")).
      rng: numpy Generator, required for "random".
    Returns:
      [D, K*H] in the kernel's dtype. With K == N, "mean" and "first" return `kernel` itself.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose from {METHODS}")
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"expected a joined 2-D kernel [D, N*H], got shape {kernel.shape}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    d, nh = kernel.shape
    if nh % num_heads:
        raise ValueError(f"kernel shape {kernel.shape}: {nh} columns are not divisible by "
                         f"num_heads={num_heads}")
    h = nh // num_heads
    k, g = num_kv_heads, num_heads // num_kv_heads
    if method == "random":
        if rng is None:
            raise ValueError("method 'random' needs a numpy Generator `rng`")
        std = 1.0 / np.sqrt(d)
        return (rng.standard_normal((d, k * h)) * std).astype(kernel.dtype)
    if k == num_heads:
        return kernel
    heads = kernel.reshape(d, k, g, h)  # [D, K, G, H]
    if method == "first":
        return np.ascontiguousarray(heads[:, :, 0, :]).reshape(d, k * h)
    pooled = heads.mean(axis=2, dtype=np.float64)  # [D, K, H]
    return pooled.astype(kernel.dtype).reshape(d, k * h)


# ---- which arrays change ------------------------------------------------------------------------


def kv_kernel_kind(path: Path) -> str | None:
    """The attention kind of a key/value kernel path, or None for any other parameter.

    ('decoder', 'layers_3', 'self_attention', 'key', 'kernel') -> 'decoder_self'.
    """
    if len(path) != 5 or path[3] not in ("key", "value") or path[4] != "kernel":
        return None
    if not path[1].startswith("layers_"):
        return None
    for kind, (stack, module) in _ATTENTION_MODULES.items():
        if path[0] == stack and path[2] == module:
            return kind
    return None


def check_conversion(source: TransformerConfig, target: TransformerConfig) -> None:
    """Raise ValueError unless `target` is reachable from `source` by pooling kv heads."""
    differing = [name for name, value in source.to_dict().items()
                 if name not in ("num_kv_heads", "grouped") and target.to_dict()[name] != value]
    if differing:
        details = ", ".join(f"{n}: {getattr(source, n)!r} -> {getattr(target, n)!r}"
                            for n in differing)
        raise ValueError(f"conversion only changes kv heads; the configs also differ in {details}")
    for kind in ATTENTION_KINDS:
        ks, kt = source.kv_heads(kind), target.kv_heads(kind)
        if kt > ks:
            raise ValueError(f"{kind} attention: the target has more kv heads ({kt}) than the "
                             f"source ({ks}); pooling can only reduce them")
        if ks % kt:
            raise ValueError(f"{kind} attention: target num_kv_heads={kt} does not divide the "
                             f"source's {ks} kv heads")


def array_rng(seed: int, path: Path) -> np.random.Generator:
    """A Generator for one array, from the seed and the array's path (not the visit order), so
    that converting a whole tree and streaming arrays one by one draw the same numbers."""
    name = "/".join(path).encode()
    return np.random.default_rng([seed, zlib.crc32(name)])


def convert_array(path: Path, array, source: TransformerConfig, target: TransformerConfig,
                  method: str, seed: int = 0):
    """One parameter of `source` as a parameter of `target`.

    Key/value kernels of the attentions in `target.grouped` go through `pool_kv_heads`; every
    other array is returned as is (the same object). Call `check_conversion` first.
    """
    kind = kv_kernel_kind(path)
    if kind is None or kind not in target.grouped:
        return array
    rng = array_rng(seed, path) if method == "random" else None
    return pool_kv_heads(array, source.kv_heads(kind), target.kv_heads(kind), method, rng)


def convert_params(params: Mapping[str, Any], source_config: TransformerConfig,
                   target_config: TransformerConfig, method: str = "mean",
                   seed: int = 0) -> dict[str, Any]:
    """Convert a whole (unboxed) param tree from `source_config` to `target_config`.

    Only the key/value kernels of the attentions that `target_config` groups change (decoder
    self- and cross-attention by default); every other leaf is passed through untouched, the very
    same array object. "random" draws each kernel from `array_rng(seed, path)`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose from {METHODS}")
    check_conversion(source_config, target_config)
    expected = param_shapes(source_config)
    got = tree_shapes(params)
    check_shapes(got, expected, where="params")

    def convert(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = prefix + (key,)
            if isinstance(value, Mapping):
                out[key] = convert(value, path)
            else:
                out[key] = convert_array(path, value, source_config, target_config, method, seed)
        return out

    return convert(params, ())


# ---- the param tree as paths --------------------------------------------------------------------


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
