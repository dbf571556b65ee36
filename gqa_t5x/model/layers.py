"""T5.1.1 building blocks: RMSNorm, joined dense kernels, gated-GELU MLP, embedding, relative
position bias.

Parameters are created with `param_with_axes`, so that their logical axis names land in the
`params_axes` collection exactly as in t5x; `partitioning.py` maps the names to mesh axes.

Axis letters: B batch, T query length, S key length, D model width (emb_dim), N query heads,
K kv heads, H head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.ad_checkpoint import checkpoint_name

from gqa_t5x.model import kernel_choice
from gqa_t5x.model.scan import PROJECTION

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

# Logical axis names. `kv_joined` and `kv_heads` are distinct from `joined_kv` and `heads` so that
# key/value projections and caches with fewer heads than the queries can be sharded (or
# replicated) on their own.
EMBED = "embed"
MLP = "mlp"
VOCAB = "vocab"
JOINED_KV = "joined_kv"
KV_JOINED = "kv_joined"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
RELPOS_BUCKETS = "relpos_buckets"
BATCH = "batch"
LENGTH = "length"

# T5 initializers (t5x/examples/t5): queries get an extra 1/sqrt(head_dim), which replaces the
# logit scaling that T5 does not do.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
embedding_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def query_kernel_init(head_dim: int):
    def init(key, shape, dtype=jnp.float32):
        return default_kernel_init(key, shape, dtype) / jnp.sqrt(head_dim).astype(dtype)

    return init


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.epsilon)
        scale = param_with_axes("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32,
                                axes=(EMBED,))
        return jnp.asarray(y * scale, self.dtype)


def dense(x, kernel, kernels: str = "xla"):
    """x [..., I] @ kernel [I, O] -> [..., O].

    `kernels` ("xla", "cpu" or "auto", see `kernel_choice`): with the CPU kernels, few float32
    rows (a decode step) run in `small_matmul`, which streams the kernel near memory speed, about
    twice XLA's dot at these shapes; its gradient is the XLA path's.
    """
    # Shapes first: a train step's many rows never build the kernels.
    if kernels != "xla" and kernel_choice.dense_applies(x, kernel):
        if kernel_choice.cpu_kernels(kernels) is not None:
            return _dense_by_kernel(x, kernel)
    return _xla_dense(x, kernel)


def _xla_dense(x, kernel):
    """One [tokens, I] x [I, O] matmul. Flattening the tokens first is what makes autodiff's
    kernel gradient one dot, x^T g, that reads both operands where they lie; from the einsum
    over [..., I], XLA's CPU backend materializes a transposed copy of g (of the [B, T, V]
    logits gradient, too) before it. Plain jax, so every autodiff mode applies (`jax.jvp`)."""
    y = x.reshape(-1, x.shape[-1]) @ kernel  # [tokens, O]
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


@jax.custom_vjp
def _dense_by_kernel(x, kernel):
    cpu = kernel_choice.cpu_kernels("cpu")
    y = cpu.small_matmul(x.reshape(-1, x.shape[-1]), kernel)  # [rows, O]
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _dense_by_kernel_fwd(x, kernel):
    return _dense_by_kernel(x, kernel), (x, kernel)


def _dense_by_kernel_bwd(residuals, g):
    return jax.vjp(_xla_dense, *residuals)[1](g)


_dense_by_kernel.defvjp(_dense_by_kernel_fwd, _dense_by_kernel_bwd)


class DenseJoined(nn.Module):
    """x @ kernel with a 2-D float32 kernel [in, out], the way t5x stores joined head kernels.

    `kernels` is `TransformerConfig.kernels` (see `dense`)."""

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: nn.initializers.Initializer = default_kernel_init
    dtype: jnp.dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x):
        kernel = param_with_axes("kernel", self.kernel_init, (x.shape[-1], self.features),
                                 jnp.float32, axes=self.kernel_axes)
        y = dense(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), self.kernels)
        # Named for the "save_projections" remat policy (model/scan.py).
        return checkpoint_name(y, PROJECTION)


class GatedGeluMlp(nn.Module):
    """T5.1.1 MLP: wo(gelu(wi_0 x) * wi_1 x), dropout after the product."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x, *, enable_dropout: bool = False):
        emb_dim = x.shape[-1]
        dense = functools.partial(DenseJoined, kernel_init=mlp_kernel_init, dtype=self.dtype,
                                  kernels=self.kernels)
        gate = dense(self.mlp_dim, (EMBED, MLP), name="wi_0")(x)
        lin = dense(self.mlp_dim, (EMBED, MLP), name="wi_1")(x)
        h = nn.gelu(gate, approximate=True) * lin  # [B, T, F]
        h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=not enable_dropout)
        h = with_sharding_constraint(h, (BATCH, LENGTH, MLP))
        return dense(emb_dim, (MLP, EMBED), name="wo")(h)


class Embed(nn.Module):
    """Token embedding by gather (not a one-hot matmul), table [V, D] in float32."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = param_with_axes("embedding", embedding_init,
                                         (self.num_embeddings, self.features), jnp.float32,
                                         axes=(VOCAB, EMBED))

    def __call__(self, tokens):
        # t5x initializes models with float32 dummy token ids; a gather needs integers.
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        return jnp.asarray(jnp.take(self.embedding, tokens, axis=0), self.dtype)  # [B, T, D]


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's bucketing of `memory_position - query_position` (any integer array shape).

    Half the buckets (all of them if unidirectional) hold exact small distances; the rest are
    logarithmic up to `max_distance`. Bidirectional uses the upper half for positive offsets.
    """
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
    """Per-head relative position bias shared by all layers of a stack.

    Parameter `rel_embedding` [N, num_buckets] (t5x layout). Returns a bias [1, N, T, S].
    """

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions, key_positions):
        """query_positions [T] and key_positions [S], integer arrays."""
        rel_embedding = param_with_axes("rel_embedding", relpos_init,
                                        (self.num_heads, self.num_buckets), jnp.float32,
                                        axes=(HEADS, RELPOS_BUCKETS))
        relative = key_positions[None, :] - query_positions[:, None]  # [T, S]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        bias = jnp.take(rel_embedding, buckets, axis=1)  # [N, T, S]
        return bias[None]  # [1, N, T, S]


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def shape_tree(tree) -> dict[str, Sequence[int]]:
    """{'encoder/layers_0/...': shape} for a nested dict of arrays."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = tuple(leaf.shape)
    return flat
