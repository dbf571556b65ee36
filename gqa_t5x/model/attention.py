"""Grouped-query attention, written once for MHA (K == N), GQA (1 < K < N) and MQA (K == 1).

Query head n attends with key/value head n // G, where G = N // K: groups are contiguous heads,
the same groups `convert.pool_kv_heads` pools. Queries are reshaped to [B, T, K, G, H] and
contracted against [B, K, S, H] keys, so no key/value head is ever copied.

Axis letters: B batch, T query length, S key length, D model width, N query heads, K kv heads,
G query heads per kv head (N // K), H head width.

Decode cache (collection `cache`, batch first, only K heads):
  self-attention   cached_key, cached_value  [B, K, L, H]  L = max_decode_length; step t writes
                   position t (the decoder's `cache_index`), later positions are masked.
  cross-attention  cached_key, cached_value  [B, K, S, H]  zeros when the cache is created;
                   the step at cache_index 0 projects the encoder output it is given into them,
                   every later step only reads them.
The cross cache is filled by the first step, not by the call that creates the cache, because
t5x creates the cache from dummy inputs and passes the real encoder output only to the steps.
[B, K, S, H] is the layout the step reads: the contraction over H with batch axes (B, K) needs
no transpose.

Shared keys/values: queries may have W times the batch of the keys/values ([B*W, T, N, H]
against [B, K, S, H], rows b*W .. b*W+W-1 using key row b), as beam search's W beams of one
example share its cross-attention keys/values. The W rows then become W*T queries of one row,
so each kv head serves W*G queries and its keys/values are stored and read once per example.

Keys, values and caches carry the logical axes of `kv_axes` (batch, kv heads, length, head_dim),
so under a mesh they are sharded by whole kv heads or replicated, never split inside a head. A
grouped attention's kv heads have their own names (`kv_heads`, `kv_joined`); one with as many kv
heads as query heads uses the queries' (`heads`, `joined_kv`) and is sharded like them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_t5x.model import kernel_choice, layers

# Added to masked logits, and to beam-search scores of dropped candidates (decoding.py). exp()
# of it is 0; beside it float32 drops any logit (its spacing at 1e10 is 1024), so a row with
# every key masked (a padding query) is uniform, as in t5x; sums of it over a whole decode stay
# far from float32's overflow.
NEG_INF = -1e10


def kv_axes(num_heads: int, num_kv_heads: int) -> tuple[tuple[str, str], tuple[str, ...]]:
    """Logical axes of the key/value kernels [D, K*H] and of keys, values and caches
    [B, K, S, H]."""
    if num_kv_heads == num_heads:
        return (layers.EMBED, layers.JOINED_KV), (layers.BATCH, layers.HEADS, layers.LENGTH,
                                                  layers.HEAD_DIM)
    return (layers.EMBED, layers.KV_JOINED), (layers.BATCH, layers.KV_HEADS, layers.LENGTH,
                                              layers.HEAD_DIM)


# ---- masks (pure) -------------------------------------------------------------------------------


def make_attention_mask(query_input, key_input, pairwise_fn=jnp.multiply):
    """[B, T] x [B, S] -> bool mask [B, 1, T, S] where pairwise_fn(query, key) is nonzero."""
    mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
    return mask[:, None].astype(bool)


def make_causal_mask(length: int):
    """[1, 1, T, T] bool: query t sees keys <= t."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def make_decoder_mask(decoder_target_tokens, decoder_segment_ids=None):
    """Causal and padding (target token 0) mask, within segments when packed: [B, 1, T, T]."""
    mask = make_causal_mask(decoder_target_tokens.shape[-1])
    mask = mask & make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0)
    if decoder_segment_ids is not None:
        mask = mask & make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal)
    return mask


def mask_to_bias(mask, dtype=jnp.float32):
    """bool mask -> additive bias (0 where allowed, NEG_INF where masked), same shape."""
    return jnp.where(mask, 0.0, NEG_INF).astype(dtype)


# ---- attention (pure) ---------------------------------------------------------------------------


def dot_product_attention(query, key, value, bias=None, *, dropout_rng=None, dropout_rate=0.0,
                          dtype=jnp.float32, kernels: str = "xla"):
    """Grouped dot-product attention without logit scaling (T5 folds it into the query init).

    Args:
      query: [B*W, T, N, H], W >= 1: rows b*W .. b*W+W-1 attend to key/value row b.
      key, value: [B, K, S, H] with N % K == 0.
      bias: additive, 4-D, broadcastable to [B*W, N, T, S] or to [B, N, T, S], or a tuple of such
        terms (the mask [B, 1, T, S] and the relative position bias [1, N, T, S]), each added to
        the logits here, so that their [B, N, T, S] sum is never built outside the attention.
      kernels: "xla", "cpu" or "auto" (see `kernel_choice`).
    Returns:
      [B*W, T, N, H].

    With the CPU kernels, a decode step (T == 1, no dropout, float32) runs in the compiled
    `decode_attention`, which reads each kv head's keys and values once for its W*G queries; its
    gradient is this function's XLA path.
    """
    bw, t, n, h = query.shape
    b, k = key.shape[:2]
    if key.shape != value.shape or bw % b or key.shape[3] != h:
        raise ValueError(f"key {key.shape} / value {value.shape} do not fit query {query.shape}")
    if n % k:
        raise ValueError(f"{n} query heads are not divisible by {k} kv heads")
    terms = () if bias is None else tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
    for term in terms:
        if term.ndim != 4:
            raise ValueError(f"bias {term.shape} is not 4-D [batch, heads, queries, keys]")
    w = bw // b
    dropout = dropout_rng is not None and dropout_rate > 0.0
    step = (kernels != "xla" and t == 1 and not dropout and jnp.dtype(dtype) == jnp.float32
            and all(a.dtype == jnp.float32 for a in (query, key, value))
            and kernel_choice.cpu_kernels(kernels) is not None)
    if w > 1:  # the W rows of one key/value row as W*T queries of that row
        query = query.reshape(b, w * t, n, h)
        terms = tuple(_fold_rows(term, b, w, t) for term in terms)
    if step:
        out = _kernel_queries(query, key, value, terms)
    else:
        out = _attention(query, key, value, terms, dropout_rng if dropout else None,
                         dropout_rate, dtype)
    return out.reshape(bw, t, n, h)


def _fold_rows(bias, b, w, t):
    """A bias for queries [B*W, T] -> one for the same queries as [B, W*T] (W outer, T inner):
    [B*W, N', T', S] is regrouped, [B, N', T', S] and [1, N', T', S] repeat over the W rows."""
    rows, heads, tb, s = bias.shape
    if rows == b * w:
        bias = jnp.broadcast_to(bias, (rows, heads, t, s)).reshape(b, w, heads, t, s)
        return bias.transpose(0, 2, 1, 3, 4).reshape(b, heads, w * t, s)
    if rows not in (1, b):
        raise ValueError(f"bias {bias.shape} fits neither {b * w} query rows nor {b} key rows")
    return bias if tb == 1 else jnp.tile(bias, (1, 1, w, 1))


def _kernel_queries(query, key, value, terms):
    """dot_product_attention by the compiled kernel: query [B, T, N, H] (a decode step, or the W
    beams of one step folded into T) -> [B, T, N, H]."""
    b, t, n, h = query.shape
    k, s = key.shape[1], key.shape[2]
    g = n // k
    # A kv head's queries side by side, as `_attention` lays them out: [B, K, G*T, H].
    q = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    bias = sum((term.astype(jnp.float32) for term in terms), jnp.zeros((), jnp.float32))
    bias = jnp.broadcast_to(bias, (b, n, t, s)).reshape(b, k, g * t, s)  # [B, K, G*T, S]
    out = _kernel_step(q, key, value, bias)  # [B, K, G*T, H]
    return out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _attention(query, key, value, terms, dropout_rng, dropout_rate, dtype):
    """dot_product_attention in XLA ops; `terms` the additive biases, each [B or 1, N or 1,
    T or 1, S]."""
    b, t, n, h = query.shape
    k = key.shape[1]
    g = n // k
    s = key.shape[2]
    # Queries of a group side by side, [B, K, G*T, H]: both contractions are then plain batched
    # matmuls over (B, K) in the layout XLA's CPU and GPU dot kernels want.
    q = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    logits = jnp.einsum("BKQH,BKSH->BKQS", q, key,
                        preferred_element_type=jnp.float32)  # [B, K, G*T, S]
    logits = logits.reshape(b, k, g, t, s)  # [B, K, G, T, S]
    for term in terms:
        if term.shape[1] == 1:  # the same for every head: [B or 1, 1, 1, T, S]
            term = term[:, :, None]
        else:  # [B or 1, K, G, T, S]
            term = term.reshape(term.shape[0], k, g, *term.shape[2:])
        logits = logits + term.astype(jnp.float32)
    # Softmax with the normalization applied after the value contraction: one pass fewer over
    # the [B, N, T, S] weights, dividing the [B, N, T, H] output instead.
    logits_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalized = jnp.exp(logits - logits_max)  # [B, K, G, T, S]
    denominator = jnp.sum(unnormalized, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    if dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, unnormalized.shape)
        unnormalized = jnp.where(keep, unnormalized / (1.0 - dropout_rate), 0.0)
    weights = unnormalized.astype(dtype).reshape(b, k, g * t, s)
    out = jnp.einsum("BKQS,BKSH->BKQH", weights, value,
                     preferred_element_type=jnp.float32)  # [B, K, G*T, H]
    out = out.reshape(b, k, g, t, h) / denominator  # [B, K, G, T, H]
    return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@jax.custom_vjp
def _kernel_step(q, key, value, bias):
    """q [B, K, G, H], key/value [B, K, S, H], bias [B, K, G, S] -> [B, K, G, H] by the kernel."""
    return kernel_choice.cpu_kernels("cpu").decode_attention(q, key, value, bias)


def _kernel_step_fwd(q, key, value, bias):
    return _kernel_step(q, key, value, bias), (q, key, value, bias)


def _kernel_step_bwd(residuals, g):
    def xla_step(q, key, value, bias):  # the same step in XLA ops: [B, K, G, H]
        b, k, gs, h = q.shape
        out = _attention(q.reshape(b, 1, k * gs, h), key, value,
                         (bias.reshape(b, k * gs, 1, -1),), None, 0.0, jnp.float32)
        return out.reshape(b, k, gs, h)

    return jax.vjp(xla_step, *residuals)[1](g)


_kernel_step.defvjp(_kernel_step_fwd, _kernel_step_bwd)


def _project_into(cache, inputs_kv, kernel, dtype):
    """cache [B, K, S, H] overwritten with inputs_kv [B, S, D] @ kernel [D, K*H], head-major.

    Written head by head, in two halves of S, into the cache rather than built as one product
    and transposed: XLA's CPU layout assignment otherwise gives the decode loop's cross cache
    the layout of that product (or, at K == 1, of its reshape) and converts it back for the
    attention at every step, a copy of the whole cross cache per step. Writes that each cover
    part of the cache keep the cache's own layout (checked on the compiled loop's HLO).
    """
    k, h = cache.shape[1], cache.shape[3]
    s = inputs_kv.shape[1]
    x = jnp.asarray(inputs_kv, dtype)
    kernel = jnp.asarray(kernel, dtype).reshape(-1, k, h)  # [D, K, H]
    for j in range(k):
        for lo, hi in ((0, s // 2), (s // 2, s)):
            part = jnp.einsum("BSD,DH->BSH", x[:, lo:hi], kernel[:, j])  # [B, hi - lo, H]
            cache = cache.at[:, j, lo:hi].set(part.astype(cache.dtype))
    return cache


# ---- the module ---------------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    """Attention with `num_heads` query heads and `num_kv_heads` key/value heads.

    Kernels, t5x names and joined layouts: query [D, N*H], key and value [D, K*H], out [N*H, D].
    `cross=True` makes it encoder-decoder attention, whose decode cache the first step fills
    from the encoder output; with `recompute_cross_kv` keys/values are re-projected at every
    step instead (the t5x and flaxformer behaviour, kept for benchmarks). `kernels` is
    `TransformerConfig.kernels`: which implementation runs the projections and a decode step's
    attention (see `kernel_choice`).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    cross: bool = False
    recompute_cross_kv: bool = False
    kernels: str = "xla"

    def _dense(self, features, axes, kernel_init=layers.default_kernel_init, *, name):
        return layers.DenseJoined(features, axes, kernel_init, self.dtype, self.kernels, name=name)

    def _project_kv(self, inputs_kv):
        """[B, S, D] -> key, value [B, K, S, H], with the `key` and `value` kernels."""
        b, s, _ = inputs_kv.shape
        k, h = self.num_kv_heads, self.head_dim
        kernel_axes, axes = kv_axes(self.num_heads, k)
        key = self._dense(k * h, kernel_axes, name="key")(inputs_kv)
        value = self._dense(k * h, kernel_axes, name="value")(inputs_kv)
        key = key.reshape(b, s, k, h).transpose(0, 2, 1, 3)  # [B, K, S, H]
        value = value.reshape(b, s, k, h).transpose(0, 2, 1, 3)  # [B, K, S, H]
        return (layers.with_sharding_constraint(key, axes),
                layers.with_sharding_constraint(value, axes))

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, bias=None, *, decode: bool = False,
                 cache_index=None, max_decode_length: int | None = None,
                 enable_dropout: bool = False):
        """inputs_q [B, T, D], inputs_kv [B, S, D], bias 4-D, broadcastable to [B, N, T, S], or a
        tuple of such terms (see `dot_product_attention`).

        With decode=True the first call creates the cache (zeros: for self-attention of length
        max_decode_length, or of the input's length T when it is None; for cross-attention
        [B', K, S, H] with B' the batch of inputs_kv, which may be B / W for W beams sharing
        it); later calls take one token (T == 1) at `cache_index`; cross-attention projects
        inputs_kv into its cache at cache_index 0 and reads the cache at every later step.
        """
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        b, t, d = inputs_q.shape
        query = self._dense(self.num_heads * self.head_dim, (layers.EMBED, layers.JOINED_KV),
                            layers.query_kernel_init(self.head_dim), name="query")(inputs_q)
        query = query.reshape(b, t, self.num_heads, self.head_dim)  # [B,T,N,H]
        query = layers.with_sharding_constraint(query, (layers.BATCH, layers.LENGTH,
                                                        layers.HEADS, None))
        if not decode:
            key, value = self._project_kv(inputs_kv)
        elif self.cross:
            key, value = self._cross_cache(inputs_kv, cache_index)
        else:
            key, value = self._self_cache(inputs_kv, cache_index, max_decode_length)

        dropout_rng = None
        if enable_dropout and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(query, key, value, bias, dropout_rng=dropout_rng,
                                    dropout_rate=self.dropout_rate, dtype=self.dtype,
                                    kernels=self.kernels)
        out = out.reshape(b, t, self.num_heads * self.head_dim)  # [B, T, N*H]
        return self._dense(d, (layers.JOINED_KV, layers.EMBED), name="out")(out)

    def _cross_cache(self, inputs_kv, cache_index):
        if not self.has_variable("cache", "cached_key"):  # creating the cache
            key, value = self._project_kv(inputs_kv)  # [B, K, S, H]; this call's output is unused
            axes = kv_axes(self.num_heads, self.num_kv_heads)[1]
            self.put_variable("cache", "cached_key",
                              layers.with_sharding_constraint(jnp.zeros_like(key), axes))
            self.put_variable("cache", "cached_value",
                              layers.with_sharding_constraint(jnp.zeros_like(value), axes))
            return key, value
        if self.recompute_cross_kv:
            return self._project_kv(inputs_kv)
        cached_key = self.get_variable("cache", "cached_key")  # [B, K, S, H]
        cached_value = self.get_variable("cache", "cached_value")
        if cached_key.shape[0] != inputs_kv.shape[0] or cached_key.shape[2] != inputs_kv.shape[1]:
            raise ValueError(
                f"cross-attention cache {cached_key.shape} was created for {cached_key.shape[0]} "
                f"inputs of length {cached_key.shape[2]}, but this step got encoder output "
                f"{inputs_kv.shape}: create the cache with the encoder output the steps get")
        if cache_index is None:
            raise ValueError("a cross-attention decode step needs the decoder's cache_index")

        def fill(module, encoded, cached_key, cached_value):
            kernels = module.variables["params"]
            return (_project_into(cached_key, encoded, kernels["key"]["kernel"], module.dtype),
                    _project_into(cached_value, encoded, kernels["value"]["kernel"],
                                  module.dtype))

        def keep(module, encoded, cached_key, cached_value):
            return cached_key, cached_value

        # A conditional, not a select: later steps neither project nor depend on XLA hoisting
        # the projection out of the decode loop.
        key, value = nn.cond(cache_index == 0, fill, keep, self, inputs_kv, cached_key,
                             cached_value)
        axes = kv_axes(self.num_heads, self.num_kv_heads)[1]
        key = layers.with_sharding_constraint(key, axes)
        value = layers.with_sharding_constraint(value, axes)
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
        return key, value

    def _self_cache(self, inputs_kv, cache_index, max_decode_length):
        b, t, _ = inputs_kv.shape
        initialized = self.has_variable("cache", "cached_key")
        key, value = self._project_kv(inputs_kv)  # [B, K, T, H]
        if not initialized:
            # Without max_decode_length the cache is as long as this call's input: t5x creates
            # the cache from full-length dummy targets.
            length = t if max_decode_length is None else max_decode_length
            shape = (b, self.num_kv_heads, length, self.head_dim)
            zeros = layers.with_sharding_constraint(jnp.zeros(shape, key.dtype),
                                                    kv_axes(self.num_heads, self.num_kv_heads)[1])
            self.put_variable("cache", "cached_key", zeros)
            self.put_variable("cache", "cached_value", zeros)
            return key, value  # the creating call's output is not used
        if t != 1:
            raise ValueError(f"a decode step takes one token per sequence, got length {t}")
        cached_key = self.get_variable("cache", "cached_key")
        cached_value = self.get_variable("cache", "cached_value")
        cached_key = jax.lax.dynamic_update_slice(cached_key, key.astype(cached_key.dtype),
                                                  (0, 0, cache_index, 0))
        cached_value = jax.lax.dynamic_update_slice(cached_value,
                                                    value.astype(cached_value.dtype),
                                                    (0, 0, cache_index, 0))
        axes = kv_axes(self.num_heads, self.num_kv_heads)[1]
        cached_key = layers.with_sharding_constraint(cached_key, axes)
        cached_value = layers.with_sharding_constraint(cached_value, axes)
        self.put_variable("cache", "cached_key", cached_key)
        self.put_variable("cache", "cached_value", cached_value)
        return cached_key, cached_value  # [B, K, L, H]
