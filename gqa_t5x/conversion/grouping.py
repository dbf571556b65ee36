"""Which kv heads are pooled together: contiguous groups, or groups of heads that agree after
alignment, and the head permutation that makes any choice of groups contiguous.

The attention pools contiguous heads (query head n reads kv head n // G), so groups of other heads
are made contiguous by permuting the heads of the attention; a permutation keeps the function
when it moves query columns, out rows and key/value columns together. T5's relative position
bias is indexed by query head and shared by every layer of a stack, so each self-attention gets
one permutation for all its layers and the stack's bias rows move with it; cross-attention has no
bias and is permuted layer by layer.

`similarity` grouping (`similarity_groups`): the distance between two kv heads is the squared
Frobenius distance of their key kernels after the best rotation plus that of their value kernels
(`alignment.aligned_distances`), summed over the layers that share one permutation. Equal-size
groups are chosen to minimize the summed within-group pairwise distance: a greedy start (the
closest remaining pair seeds a group, which then takes the remaining head closest to its members
until full), then a local search that swaps two heads of different groups while a swap lowers
the total. Ties go to the lower head index, so the result is deterministic.

Groups are reported as lists of source kv head indices (for an MHA source, query heads); the
query heads of a source kv head follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gqa_t5x.conversion.alignment import aligned_distances, split_heads
from gqa_t5x.model.config import TransformerConfig

Path = tuple[str, ...]
Groups = list[list[int]]

GROUPINGS = ("contiguous", "similarity")

# Param-tree names of each attention kind: (stack, attention module name).
ATTENTION_MODULES = {
    "encoder_self": ("encoder", "attention"),
    "decoder_self": ("decoder", "self_attention"),
    "cross": ("decoder", "encoder_decoder_attention"),
}
# The relative position bias each self-attention kind reads, [N, buckets].
RELPOS_BIAS = {
    "encoder_self": ("encoder", "relpos_bias", "rel_embedding"),
    "decoder_self": ("decoder", "relpos_bias", "rel_embedding"),
}
KERNELS = ("query", "key", "value", "out")


def attention_paths(config: TransformerConfig, kind: str) -> list[Path]:
    """Param paths of the attention modules of `kind`, e.g. ('decoder', 'layers_0',
    'self_attention'), one per layer."""
    stack, module = ATTENTION_MODULES[kind]
    layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    return [(stack, f"layers_{i}", module) for i in range(layers)]


def contiguous_groups(num_heads: int, num_groups: int) -> Groups:
    """[[0, .., G-1], [G, .., 2G-1], ...] with G = num_heads // num_groups."""
    g = num_heads // num_groups
    return [list(range(i * g, (i + 1) * g)) for i in range(num_groups)]


def similarity_groups(distances: np.ndarray, num_groups: int) -> Groups:
    """Equal-size groups of the heads of a [K, K] distance matrix with a small summed
    within-group pairwise distance (greedy start, then improving swaps; see the module
    docstring). Groups come sorted, each by head index and then by their first head."""
    d = np.asarray(distances, np.float64)
    k = d.shape[0]
    if d.shape != (k, k) or k % num_groups:
        raise ValueError(f"distances of shape {d.shape} do not split into {num_groups} groups")
    size = k // num_groups
    if size == 1 or num_groups == 1:
        return contiguous_groups(k, num_groups)
    remaining = list(range(k))
    groups: Groups = []
    while remaining:
        sub = d[np.ix_(remaining, remaining)] + np.diag(np.full(len(remaining), np.inf))
        i, j = np.unravel_index(np.argmin(sub), sub.shape)  # first minimum: lowest indices
        group = sorted({remaining[i], remaining[j]})
        while len(group) < size:
            rest = [h for h in remaining if h not in group]
            cost = d[np.ix_(rest, group)].sum(axis=1)
            group.append(rest[int(np.argmin(cost))])
        groups.append(group)
        remaining = [h for h in remaining if h not in group]
    groups = _improve_by_swaps(d, groups)
    return sorted(sorted(g) for g in groups)


def _improve_by_swaps(d: np.ndarray, groups: Groups, max_rounds: int = 1000) -> Groups:
    """Apply the best improving swap of two heads between groups until none improves."""
    groups = [list(g) for g in groups]
    scale = max(float(np.abs(d).max()), 1e-300)
    for _ in range(max_rounds):
        member = np.zeros(d.shape[0], int)
        for gi, g in enumerate(groups):
            member[g] = gi
        # to_group[h, gi]: summed distance from head h to the members of group gi.
        to_group = np.stack([d[:, g].sum(axis=1) for g in groups], axis=1)  # [K, groups]
        best, best_swap = -1e-12 * scale, None
        for a in range(d.shape[0]):
            for b in range(a + 1, d.shape[0]):
                p, q = member[a], member[b]
                if p == q:
                    continue
                # a leaves p for q, b leaves q for p; d[a, b] is counted in neither new group.
                delta = (to_group[b, p] - d[b, a] - to_group[a, p]
                         + to_group[a, q] - d[a, b] - to_group[b, q])
                if delta < best:
                    best, best_swap = delta, (a, b, p, q)
        if best_swap is None:
            break
        a, b, p, q = best_swap
        groups[p][groups[p].index(a)] = b
        groups[q][groups[q].index(b)] = a
    return groups


def head_groups_of(read: Callable[[Path], np.ndarray], source: TransformerConfig,
                   target: TransformerConfig, grouping: str = "contiguous"
                   ) -> dict[str, Groups]:
    """{'decoder/layers_0/self_attention': groups, ...} for every attention that `target`
    groups, reading key and value kernels with `read(path)` (one at a time, so that a streaming
    converter holds one kernel). Groups are lists of source kv heads, one list per target kv
    head, in the order of the target's kv heads."""
    chosen = similarity_kinds(source, target, grouping)
    out: dict[str, Groups] = {}
    for kind in target.grouped:
        ks, kt = source.kv_heads(kind), target.kv_heads(kind)
        paths = attention_paths(source, kind)
        if kind not in chosen:
            out.update({"/".join(p): contiguous_groups(ks, kt) for p in paths})
            continue
        distances = [sum(aligned_distances(split_heads(read(p + (proj, "kernel")), ks))
                         for proj in ("key", "value")) for p in paths]
        if kind == "cross":
            out.update({"/".join(p): similarity_groups(dist, kt)
                        for p, dist in zip(paths, distances)})
        else:  # one permutation for the stack's shared relative position bias
            groups = similarity_groups(sum(distances), kt)
            out.update({"/".join(p): groups for p in paths})
    return out


def similarity_kinds(source: TransformerConfig, target: TransformerConfig, grouping: str
                     ) -> list[str]:
    """The grouped attention kinds whose groups `grouping` chooses by similarity (not those
    pooled into one kv head or not pooled at all); `head_groups_of` reads their key and value
    kernels, 2 per layer."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose from {GROUPINGS}")
    if grouping == "contiguous":
        return []
    return [kind for kind in target.grouped
            if target.kv_heads(kind) not in (1, source.kv_heads(kind))]


def query_order(groups: Groups, num_heads: int) -> list[int]:
    """Source query heads in their new order: those of each group's kv heads, group by group."""
    kv_order = [h for g in groups for h in g]
    per_kv = num_heads // len(kv_order)
    return [j * per_kv + i for j in kv_order for i in range(per_kv)]


def permute_attention(kernels: Mapping[str, np.ndarray], num_heads: int, groups: Groups
                      ) -> dict[str, np.ndarray]:
    """{query [D, N*H], key, value [D, K*H], out [N*H, D]} with the heads of `groups` made
    contiguous (new kv head p is source kv head concat(groups)[p]); the function is unchanged up
    to the relative position bias, which `permute_bias` moves. The identity order returns the
    kernels themselves."""
    kv_order = [h for g in groups for h in g]
    if kv_order == sorted(kv_order):
        return dict(kernels)
    h = np.shape(kernels["query"])[1] // num_heads
    q_cols = _columns(query_order(groups, num_heads), h)
    kv_cols = _columns(kv_order, h)
    return {"query": np.asarray(kernels["query"])[:, q_cols],
            "key": np.asarray(kernels["key"])[:, kv_cols],
            "value": np.asarray(kernels["value"])[:, kv_cols],
            "out": np.asarray(kernels["out"])[q_cols, :]}


def permute_bias(rel_embedding, groups: Groups):
    """rel_embedding [N, buckets] with its query-head rows in the order of `groups`
    (`query_order`); the identity order returns it unchanged."""
    order = query_order(groups, np.shape(rel_embedding)[0])
    if order == sorted(order):
        return rel_embedding
    return np.asarray(rel_embedding)[order]


def bias_groups(groups: Mapping[str, Groups], target: TransformerConfig
                ) -> dict[Path, Groups]:
    """{relpos bias path: the groups its stack's self-attention layers share} for the grouped
    self-attention kinds."""
    out = {}
    for kind, bias in RELPOS_BIAS.items():
        paths = attention_paths(target, kind)
        if kind in target.grouped and paths:
            out[bias] = groups["/".join(paths[0])]
    return out


def _columns(heads: Sequence[int], h: int) -> np.ndarray:
    return np.concatenate([np.arange(j * h, (j + 1) * h) for j in heads])
