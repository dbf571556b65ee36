"""Aligning attention heads before pooling them: orthogonal Procrustes on head kernels.

A head's query and key kernels Wq, Wk [D, H] enter attention only through Wq Wk^T, its value and
out kernels only through Wv Wo ([D, H] @ [H, D]). For any orthogonal R, P [H, H],
(Wq R)(Wk R)^T = Wq Wk^T and (Wv P)(P^T Wo) = Wv Wo, so rotating heads changes no output; T5 has
no rotary embeddings and adds its relative position bias after the product, so a full H x H
rotation is exact. Two heads that compute the same attention in different bases average to
nothing useful; rotated into a common basis first, their mean keeps what they share
(Jin et al. 2024, "Align attention heads before merging them").

Each group's kv heads are aligned by generalized Procrustes analysis: the reference starts as the
group's first head, every head is rotated onto it (the orthogonal Procrustes solution U V^T of
the SVD of A^T M), the reference becomes the mean of the rotated heads, and this repeats until
the mean stops moving. Keys and values are aligned separately; each key rotation is applied to
the query heads that read that kv head, each value rotation to their rows of the out kernel.
Everything is numpy in float64 and deterministic; no data is needed.

Axis letters: D model width, N query heads, K kv heads of the kernel being aligned, G kv heads
per group, H head width.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 30
# Relative decrease of the group's spread (sum of squared distances of the rotated heads to
# their mean) at which the iteration stops. Rotated copies of one head converge in one round;
# for unrelated random heads the spread is then within about 0.2% of where 1000 rounds take it.
TOLERANCE = 1e-5


def procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The orthogonal R [H, H] minimizing ||a @ R - b||_F for a, b [D, H]."""
    return _polar(a.T @ b)


def _polar(m: np.ndarray) -> np.ndarray:
    """U V^T of the SVD U S V^T of m [..., H, H]: the orthogonal R maximizing tr(R^T m)."""
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def align_heads(heads: np.ndarray, max_iterations: int = MAX_ITERATIONS,
                tolerance: float = TOLERANCE) -> np.ndarray:
    """Orthogonal rotations [G, H, H] that bring heads [G, D, H] toward their common mean.

    Generalized Procrustes: the reference starts at heads[0]; each round rotates every head onto
    the reference and makes the reference the mean of the rotated heads, until the spread
    sum_i ||heads[i] @ R_i - mean||^2 = sum_i ||heads[i]||^2 - G ||mean||^2 decreases by less
    than `tolerance` relative to it. (The spread, not the mean: the mean may keep turning as a
    whole, which changes nothing.) A single head gets the identity.

    The rounds work on the heads' cross products C_ij = heads[i]^T heads[j] [H, H] only
    (heads[i]^T mean = sum_j C_ij R_j / G), so after one pass over the kernels a round costs
    nothing in D.
    """
    heads = np.asarray(heads, np.float64)
    g, _, h = heads.shape
    if g == 1:
        return np.eye(h)[None]
    cross = np.matmul(np.swapaxes(heads, 1, 2)[:, None], heads[None])  # [G, G, H, H]
    total = float(np.trace(cross, axis1=2, axis2=3).trace())
    rotations = _polar(cross[:, 0])  # onto heads[0]
    spread = np.inf
    for _ in range(max_iterations):
        # toward[i] = heads[i]^T (G * mean) = sum_j C_ij R_j
        toward = np.matmul(cross, rotations[None]).sum(axis=1)  # [G, H, H]
        # G^2 ||mean||^2 = sum_i tr(R_i^T toward[i])
        mean_sq = float(np.einsum("GHI,GHI->", rotations, toward)) / g**2
        previous, spread = spread, max(total - g * mean_sq, 0.0)
        if previous - spread <= tolerance * max(spread, 1e-300 * total):
            break
        rotations = _polar(toward)
    return rotations


def aligned_distances(heads: np.ndarray) -> np.ndarray:
    """[K, K] squared Frobenius distances between heads [K, D, H] after the best rotation:
    min_R ||A_i R - A_j||^2 = ||A_i||^2 + ||A_j||^2 - 2 ||A_i^T A_j||_* (nuclear norm)."""
    heads = np.asarray(heads, np.float64)
    sq = np.einsum("KDH,KDH->K", heads, heads)  # [K]
    # One row at a time: [K, K, H, H] at once would be half a GiB for 64 heads of width 128.
    nuclear = np.stack([np.linalg.svd(np.matmul(a.T[None], heads), compute_uv=False).sum(-1)
                        for a in heads])  # [K, K]
    dist = sq[:, None] + sq[None, :] - 2.0 * nuclear
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)


def split_heads(kernel, num_heads: int) -> np.ndarray:
    """[D, N*H] joined kernel -> [N, D, H] (head n from columns n*H:(n+1)*H)."""
    d, nh = kernel.shape
    return np.asarray(kernel).reshape(d, num_heads, nh // num_heads).transpose(1, 0, 2)


def join_heads(heads: np.ndarray) -> np.ndarray:
    """[N, D, H] -> [D, N*H], the inverse of split_heads."""
    n, d, h = heads.shape
    return heads.transpose(1, 0, 2).reshape(d, n * h)


def rotate_attention(query, key, value, out, num_heads: int, group_size: int):
    """One attention's kernels with each group of `group_size` contiguous kv heads aligned.

    Args:
      query: [D, N*H]; key, value: [D, K*H]; out: [N*H, D] (t5x's joined layouts). Query head n
        reads kv head n // (N // K).
      group_size: kv heads per group, dividing K (the heads the converter will pool together).
    Returns:
      (query, key, value, out) of the same shapes and dtypes, computing the same function: kv
      head j's key columns and the columns of its query heads are multiplied by R_j, its value
      columns by P_j and its query heads' out rows by P_j^T. With group_size 1 the inputs are
      returned unchanged.
    """
    dtype = np.asarray(key).dtype
    d, kh = np.shape(key)
    k = kh // (np.shape(query)[1] // num_heads)
    if group_size == 1:
        return query, key, value, out
    if k % group_size:
        raise ValueError(f"{k} kv heads do not split into groups of {group_size}")
    per_kv = num_heads // k  # query heads reading each kv head
    keys, values = split_heads(key, k), split_heads(value, k)  # [K, D, H]
    h = keys.shape[2]
    queries = split_heads(query, num_heads).reshape(k, per_kv, d, h)  # [K, N/K, D, H]
    outs = np.asarray(out, np.float64).reshape(k, per_kv, h, -1)  # [K, N/K, H, D]
    key_rot = np.concatenate([align_heads(keys[j:j + group_size])
                              for j in range(0, k, group_size)])  # [K, H, H]
    value_rot = np.concatenate([align_heads(values[j:j + group_size])
                                for j in range(0, k, group_size)])  # [K, H, H]
    keys = np.matmul(keys, key_rot)  # [K, D, H]
    queries = np.matmul(queries, key_rot[:, None])  # [K, N/K, D, H]
    values = np.matmul(values, value_rot)
    outs = np.matmul(np.swapaxes(value_rot, 1, 2)[:, None], outs)  # P^T @ out rows
    return (join_heads(queries.reshape(num_heads, d, h)).astype(dtype),
            join_heads(keys).astype(dtype), join_heads(values).astype(dtype),
            outs.reshape(num_heads * h, -1).astype(dtype))
