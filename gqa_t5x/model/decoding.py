"""Autoregressive decoding over the cache: greedy, temperature / top-k sampling and beam search.

The encoder runs once; the decode cache is created once (K/V zeros); then the whole loop runs
inside one jitted `lax.while_loop` whose cache buffers are donated, so every step writes its K/V
in place with `dynamic_update_slice`. The first step projects the encoder output into the
cross-attention K/V, once per input, the same path t5x's own decoding drives. The loop stops when
every sequence has ended, unless `force_steps` asks for exactly `max_decode_length` steps (for
timing).

Beam search follows t5x's `beam_search`: 2 x beams candidates per step, a live and a finished set
per example, finished scores divided by the brevity penalty ((5 + length) / 6) ** alpha, where
length counts the generated tokens including EOS, and the search stops once no live beam can
beat the worst finished one. The W beams of one example share its cross-attention K/V: the
cross cache is [B, K, S, H], one copy per example, which the beams' queries read as W*G
queries per kv head; only the self-attention caches [B*W, K, L, H] are per beam and reordered
between steps.

Axis letters: B batch, S input length, L max_decode_length, D model width, V vocabulary,
W beams.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gqa_t5x.model.attention import NEG_INF
from gqa_t5x.model.network import Transformer

METHODS = ("greedy", "sample", "beam")
_CROSS_CACHE = "encoder_decoder_attention"


class LoopResult(NamedTuple):
    """Output of a decode loop."""

    tokens: jax.Array  # [B, L] int32, or [B, W, L] for beam search (best beam last)
    scores: jax.Array  # [B] float32, or [B, W]
    steps: jax.Array  # scalar int32: decoder steps actually run
    cache: Any  # the final cache; returned so that the donated input cache is updated in place


# ---- building blocks ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("module",))
def encode(module: Transformer, params, encoder_input_tokens):
    """encoder_input_tokens [B, S] -> encoded [B, S, D]."""
    return module.apply({"params": params}, encoder_input_tokens, enable_dropout=False,
                        method=Transformer.encode)


@functools.partial(jax.jit, static_argnames=("module", "max_decode_length", "num_beams"))
def init_cache(module: Transformer, params, encoded, encoder_input_tokens, *,
               max_decode_length: int, num_beams: int = 1):
    """The decode cache for encoded [B, S, D] and W = num_beams decoder rows per example:
    self-attention K/V zeros [B*W, K, L, H], cross-attention K/V zeros [B, K, S, H] (the first
    step fills them from `encoded`), cache_index 0."""
    dummy = jnp.zeros((encoded.shape[0] * num_beams, 1), jnp.int32)
    _, variables = module.apply({"params": params}, encoded, encoder_input_tokens, dummy, dummy,
                                decode=True, max_decode_length=max_decode_length,
                                enable_dropout=False, mutable=["cache"],
                                method=Transformer.decode)
    return variables["cache"]


def decode_step(module: Transformer, params, cache, encoded, encoder_input_tokens, tokens, *,
                max_decode_length: int):
    """One step: tokens [B*W] at the cache's `cache_index` -> (logits [B*W, V] float32, new
    cache).

    `encoded` [B, S, D] (W = 1) or [B / W, S, D] (beams sharing it) is projected into the
    cross-attention cache at cache_index 0 and not read at later steps (unless
    `recompute_cross_kv`).
    """
    tok = tokens[:, None]  # [B, 1]
    logits, variables = module.apply({"params": params, "cache": cache}, encoded,
                                     encoder_input_tokens, tok, tok, decode=True,
                                     max_decode_length=max_decode_length, enable_dropout=False,
                                     mutable=["cache"], method=Transformer.decode)
    return logits[:, 0], variables["cache"]


def _names(path) -> list[str]:
    return [str(getattr(p, "key", p)) for p in path]


def _argmax(logits):
    """jnp.argmax over the last axis (first index of the maximum), as two plain reductions:
    XLA's CPU backend runs the (value, index) reduction of jnp.argmax several times slower."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1]), axis=-1)


def _select(logits, rng, step, method: str, temperature: float, top_k: int):
    """Next token [B] from logits [B, V]."""
    if method == "greedy" or temperature == 0.0:
        return _argmax(logits)
    scaled = logits / temperature
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(jax.random.fold_in(rng, step), scaled).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("module", "max_decode_length", "method", "temperature", "top_k",
                     "force_steps", "decoder_start_token"),
    donate_argnames=("cache",),
)
def decode_loop(module: Transformer, params, cache, encoded, encoder_input_tokens, rng=None, *,
                max_decode_length: int, method: str = "greedy", temperature: float = 1.0,
                top_k: int = 0, eos_id: int = 1, force_steps: bool = False,
                decoder_start_token: int = 0) -> LoopResult:
    """Greedy or sampled decoding from a fresh cache (donated: do not reuse it afterwards).

    Returns tokens [B, L] (0 after each sequence's EOS), scores [B] (the sum of the log
    probabilities of the emitted tokens, before temperature), and the number of steps run.
    """
    b = encoder_input_tokens.shape[0]
    if rng is None:
        rng = jax.random.PRNGKey(0)

    def cond(state):
        i, _, _, _, ended, _ = state
        running = i < max_decode_length
        return running if force_steps else running & ~jnp.all(ended)

    def body(state):
        i, cache, out, last, ended, scores = state
        logits, cache = decode_step(module, params, cache, encoded, encoder_input_tokens, last,
                                    max_decode_length=max_decode_length)  # [B, V]
        nxt = _select(logits, rng, i, method, temperature, top_k)  # [B]
        log_z = jax.nn.logsumexp(logits, axis=-1)  # [B]
        logp = jnp.take_along_axis(logits, nxt[:, None], axis=-1)[:, 0] - log_z
        scores = scores + jnp.where(ended, 0.0, logp)
        nxt = jnp.where(ended, 0, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        ended = ended | (nxt == eos_id)
        return i + 1, cache, out, nxt, ended, scores

    state = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.zeros((b, max_decode_length), jnp.int32),
        jnp.full((b,), decoder_start_token, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.float32),
    )
    steps, cache, out, _, _, scores = jax.lax.while_loop(cond, body, state)
    return LoopResult(out, scores, steps, cache)


def brevity_penalty(alpha: float, length):
    """t5x's length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _is_self_cache(path) -> bool:
    names = _names(path)
    return _CROSS_CACHE not in names and names[-1] != "cache_index"


def _self_cache_rows(cache) -> int:
    """The batch of the self-attention caches: decoder rows, B * W under beam search."""
    rows = {x.shape[0] for p, x in jax.tree_util.tree_leaves_with_path(cache)
            if _is_self_cache(p)}
    if len(rows) != 1:
        raise ValueError(f"decode cache: self-attention caches have batches {sorted(rows)}")
    return rows.pop()


def _gather_beams(x, idx):
    """x [B, W2, ...], idx [B, W] -> [B, W, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(
    jax.jit,
    static_argnames=("module", "max_decode_length", "num_beams", "force_steps",
                     "decoder_start_token"),
    donate_argnames=("cache",),
)
def beam_search(module: Transformer, params, cache, encoded, encoder_input_tokens, *,
                max_decode_length: int, num_beams: int = 4, alpha: float = 0.6, eos_id: int = 1,
                force_steps: bool = False, decoder_start_token: int = 0) -> LoopResult:
    """t5x beam search from a fresh cache of `init_cache(..., num_beams=W)`: B examples, beams
    of one example adjacent. `encoded` [B, S, D] and `encoder_input_tokens` [B, S] hold each
    example once (its beams share the cross-attention cache); each example repeated W times
    ([B*W, ...], with a cache made from them) also works, with W copies of every cross cache.

    Returns tokens [B, W, L] and scores [B, W] sorted ascending (best beam last): finished
    sequences with length-penalized scores, or, for an example with none finished, the live ones
    with their raw log probabilities.
    """
    w = num_beams
    bw = _self_cache_rows(cache)
    if bw % w:
        raise ValueError(f"beam_search: the cache's self-attention batch {bw} is not a multiple "
                         f"of num_beams={w}: create it with init_cache(..., num_beams={w})")
    b = bw // w
    length = max_decode_length + 1  # position 0 holds the start token
    max_penalty = brevity_penalty(alpha, length)

    def cond(state):
        i, live_logp, fin_scores, _, _, fin_flags, _ = state
        running = i < length - 1
        if force_steps:
            return running
        best_live = live_logp[:, -1:] / max_penalty  # [B, 1]
        worst_fin = jnp.min(fin_scores, axis=1, keepdims=True)
        worst_fin = jnp.where(fin_flags, worst_fin, NEG_INF)  # [B, W]
        return running & ~jnp.all(worst_fin > best_live)

    def body(state):
        i, live_logp, fin_scores, live_seqs, fin_seqs, fin_flags, cache = state
        last = jax.lax.dynamic_slice(live_seqs, (0, 0, i), (b, w, 1)).reshape(bw)
        logits, cache = decode_step(module, params, cache, encoded, encoder_input_tokens, last,
                                    max_decode_length=max_decode_length)  # [B*W, V]
        v = logits.shape[-1]
        logp = jax.nn.log_softmax(logits).reshape(b, w, v) + live_logp[:, :, None]
        top_logp, top_idx = jax.lax.top_k(logp.reshape(b, w * v), 2 * w)  # [B, 2W]
        top_ids = (top_idx % v).astype(jnp.int32)
        top_beams = top_idx // v  # [B, 2W]
        top_seqs = _gather_beams(live_seqs, top_beams)  # [B, 2W, L+1]
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_ids[:, :, None], (0, 0, i + 1))
        new_fin = top_ids == eos_id  # [B, 2W]

        alive_logp = top_logp + new_fin * NEG_INF
        keep = jnp.flip(jax.lax.top_k(alive_logp, w)[1], axis=1)  # [B, W] ascending
        live_seqs = _gather_beams(top_seqs, keep)
        live_logp = _gather_beams(alive_logp, keep)
        src = _gather_beams(top_beams, keep)  # [B, W] beam each new live beam extends
        flat_src = (jnp.arange(b)[:, None] * w + src).reshape(bw)
        cache = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.take(x, flat_src, axis=0) if _is_self_cache(p) else x, cache)

        scores = top_logp / brevity_penalty(alpha, (i + 1).astype(jnp.float32))
        scores = scores + (~new_fin) * NEG_INF
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)  # [B, 3W, L+1]
        all_scores = jnp.concatenate([fin_scores, scores], axis=1)
        all_flags = jnp.concatenate([fin_flags, new_fin], axis=1)
        best = jnp.flip(jax.lax.top_k(all_scores, w)[1], axis=1)
        fin_seqs = _gather_beams(all_seqs, best)
        fin_scores = _gather_beams(all_scores, best)
        fin_flags = _gather_beams(all_flags, best)
        return i + 1, live_logp, fin_scores, live_seqs, fin_seqs, fin_flags, cache

    live_logp = jnp.tile(jnp.array([[0.0] + [NEG_INF] * (w - 1)], jnp.float32), (b, 1))
    seqs = jnp.zeros((b, w, length), jnp.int32).at[:, :, 0].set(decoder_start_token)
    state = (jnp.array(0, jnp.int32), live_logp, jnp.full((b, w), NEG_INF, jnp.float32), seqs,
             seqs, jnp.zeros((b, w), bool), cache)
    steps, live_logp, fin_scores, live_seqs, fin_seqs, fin_flags, cache = jax.lax.while_loop(
        cond, body, state)
    any_fin = jnp.any(fin_flags, axis=1)  # [B]
    seqs = jnp.where(any_fin[:, None, None], fin_seqs, live_seqs)[:, :, 1:]
    scores = jnp.where(any_fin[:, None], fin_scores, live_logp)
    return LoopResult(seqs, scores, steps, cache)


@jax.jit
def _pad_after_eos(tokens, eos_id):
    """Zero every token after a row's first EOS (live beams returned unfinished may hold one)."""
    seen = jnp.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id)  # EOS strictly before
    return jnp.where(seen > 0, 0, tokens)


# ---- the entry point ----------------------------------------------------------------------------


def generate(module: Transformer, params, encoder_input_tokens, *, max_decode_length: int,
             method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
             num_beams: int = 4, alpha: float = 0.6, eos_id: int = 1, rng=None,
             force_steps: bool = False, decoder_start_token: int = 0) -> tuple[Any, Any]:
    """Decode `max_decode_length` tokens (fewer steps when every sequence ends early).

    Args:
      module: a `gqa_t5x.network.Transformer`; params: its 'params' collection.
      encoder_input_tokens: [B, S] int (0 = padding).
      method: "greedy", "sample" (temperature / top-k; temperature 0 is greedy) or "beam".
      rng: PRNG key for sampling (default PRNGKey(0)).
    Returns:
      tokens [B, max_decode_length] int32, 0 after EOS; scores [B] float32: the summed log
      probability for greedy/sampling, the length-penalized beam score (t5x) for the best beam.
    """
    if method not in METHODS:
        raise ValueError(f"generate: method={method!r} is not one of {METHODS}")
    if max_decode_length < 1:
        raise ValueError(f"generate: max_decode_length={max_decode_length} must be >= 1")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0")
    vocab = module.config.vocab_size
    if not 0 <= top_k <= vocab:
        raise ValueError(f"generate: top_k={top_k} must be in [0, vocab_size={vocab}]")
    encoder_input_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    if encoder_input_tokens.ndim != 2:
        raise ValueError(f"generate: encoder_input_tokens has shape {encoder_input_tokens.shape},"
                         " expected [batch, length]")
    encoded = encode(module, params, encoder_input_tokens)
    if method == "beam":
        if num_beams < 1:
            raise ValueError(f"generate: num_beams={num_beams} must be >= 1")
        cache = init_cache(module, params, encoded, encoder_input_tokens,
                           max_decode_length=max_decode_length, num_beams=num_beams)
        result = beam_search(module, params, cache, encoded, encoder_input_tokens,
                             max_decode_length=max_decode_length, num_beams=num_beams,
                             alpha=jnp.float32(alpha), eos_id=jnp.int32(eos_id),
                             force_steps=force_steps, decoder_start_token=decoder_start_token)
        return _pad_after_eos(result.tokens[:, -1], eos_id), result.scores[:, -1]
    cache = init_cache(module, params, encoded, encoder_input_tokens,
                       max_decode_length=max_decode_length)
    result = decode_loop(module, params, cache, encoded, encoder_input_tokens, rng,
                         max_decode_length=max_decode_length, method=method,
                         temperature=float(temperature), top_k=int(top_k),
                         eos_id=jnp.int32(eos_id),
                         force_steps=force_steps, decoder_start_token=decoder_start_token)
    return result.tokens, result.scores
