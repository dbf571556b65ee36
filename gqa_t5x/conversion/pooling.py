"""Multi-head to grouped-query conversion: key/value head pooling as pure numpy functions.

The paper (Ainslie et al. 2023, section 2.1) converts a multi-head checkpoint by mean-pooling the
key and value projections of the heads in each group; its ablation compares keeping the first head
of each group and a fresh random initialization. Queries, outputs and everything else are kept.
"aligned" first rotates the heads of each group into a common basis (alignment.py), rotating the
query and out kernels with them, and then mean-pools; it works on a whole attention at a time
(`convert_attention`) and may group similar heads instead of contiguous ones (grouping.py).

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

from gqa_t5x.conversion.alignment import rotate_attention
from gqa_t5x.conversion.grouping import (
    ATTENTION_MODULES,
    GROUPINGS,
    KERNELS,
    Groups,
    bias_groups,
    head_groups_of,
    permute_attention,
    permute_bias,
)
from gqa_t5x.model.config import ATTENTION_KINDS, TransformerConfig
from gqa_t5x.model.shapes import (  # noqa: F401 - re-exported for converters
    Path,
    check_shapes,
    count_params,
    param_shapes,
    tree_shapes,
)

# Methods that pool each key/value kernel on its own (pool_kv_heads).
POOL_METHODS = ("mean", "first", "random")
METHODS = POOL_METHODS + ("aligned",)


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
    if method not in POOL_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose from {POOL_METHODS}")
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
    for kind, (stack, module) in ATTENTION_MODULES.items():
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
    if method not in POOL_METHODS:
        raise ValueError(f"method {method!r} converts whole attentions (convert_attention), "
                         f"not {'/'.join(path)} alone")
    rng = array_rng(seed, path) if method == "random" else None
    return pool_kv_heads(array, source.kv_heads(kind), target.kv_heads(kind), method, rng)


def check_method(method: str, grouping: str = "contiguous") -> None:
    """Raise ValueError for an unknown method or grouping, or a grouping the method cannot use."""
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose from {METHODS}")
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose from {GROUPINGS}")
    if grouping != "contiguous" and method != "aligned":
        raise ValueError(f"grouping {grouping!r} chooses groups of heads that agree after "
                         f"alignment; it needs method 'aligned', not {method!r}")


def convert_attention(kernels: Mapping[str, Any], kind: str, source: TransformerConfig,
                      target: TransformerConfig, groups: Groups) -> dict[str, np.ndarray]:
    """One attention's {query, key, value, out} kernels converted by "aligned": heads permuted
    so that `groups` (lists of source kv heads) are contiguous, each group's heads rotated into
    a common basis with their query columns and out rows, then keys and values mean-pooled."""
    ks, kt = source.kv_heads(kind), target.kv_heads(kind)
    n = source.num_heads
    kernels = permute_attention(kernels, n, groups)
    query, key, value, out = rotate_attention(*(kernels[k] for k in KERNELS), n, ks // kt)
    return {"query": query, "key": pool_kv_heads(key, ks, kt, "mean"),
            "value": pool_kv_heads(value, ks, kt, "mean"), "out": out}


def head_groups(params: Mapping[str, Any], source_config: TransformerConfig,
                target_config: TransformerConfig, grouping: str = "contiguous"
                ) -> dict[str, Groups]:
    """The kv head groups a conversion pools: {'decoder/layers_0/self_attention': [[0, 3],
    [1, 2]], ...}, one list of source kv heads per target kv head, for every grouped attention
    (grouping.py says how `similarity` chooses them)."""
    check_conversion(source_config, target_config)
    return head_groups_of(lambda path: _get(params, path), source_config, target_config,
                          grouping)


def convert_params(params: Mapping[str, Any], source_config: TransformerConfig,
                   target_config: TransformerConfig, method: str = "mean",
                   seed: int = 0, grouping: str = "contiguous") -> dict[str, Any]:
    """Convert a whole (unboxed) param tree from `source_config` to `target_config`.

    With "mean", "first" and "random" only the key/value kernels of the attentions that
    `target_config` groups change (decoder self- and cross-attention by default); every other
    leaf is passed through untouched, the very same array object. "random" draws each kernel
    from `array_rng(seed, path)`. "aligned" also rotates (and, with grouping "similarity",
    permutes) the query and out kernels of those attentions, and permutes the relative position
    bias of a grouped self-attention with its heads; `head_groups` gives the groups.
    """
    check_method(method, grouping)
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

    if method != "aligned":
        return convert(params, ())
    groups = head_groups(params, source_config, target_config, grouping)
    out = _copy_structure(params)
    for name, module_groups in groups.items():
        path = tuple(name.split("/"))
        kind = kv_kernel_kind(path + ("key", "kernel"))
        module = _get(params, path)
        kernels = {k: module[k]["kernel"] for k in KERNELS}
        converted = convert_attention(kernels, kind, source_config, target_config, module_groups)
        for k, array in converted.items():
            _get(out, path + (k,))["kernel"] = array
    for path, bias_group in bias_groups(groups, target_config).items():
        _get(out, path[:-1])[path[-1]] = permute_bias(_get(params, path), bias_group)
    return out


def _copy_structure(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested dict's structure as plain dicts, sharing the leaves."""
    return {k: _copy_structure(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _get(tree: Mapping[str, Any], path: Path):
    for key in path:
        tree = tree[key]
    return tree
