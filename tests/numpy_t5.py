"""An independent plain-numpy T5.1.1 (float64) for tests.

Written from the T5 / T5.1.1 descriptions (Raffel et al. 2020; mesh-tensorflow's
`_relative_position_bucket`), not from gqa_t5x: loops over heads, each query head n reading kv
head n // (N // K), explicit masks. It reads parameters in the t5x layout (the names are the
contract under test, not the math), all [in, out] kernels.
"""

from __future__ import annotations

import math

import numpy as np

MASKED = -1e10  # logit given to a masked position (a fully masked row becomes uniform)


def relative_position_bucket(relative_position: int, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> int:
    """Bucket of memory_position - query_position, one integer at a time.

    Bidirectional: the first half of the buckets is for keys at or before the query, the second
    half for keys after it. Within a half, distances below half of it are exact, the rest
    logarithmic up to `max_distance`, beyond which everything shares the last bucket. The log
    is taken in float64 with a tiny slack so exact powers land in their own bucket.
    """
    distance = -relative_position  # how far back the key is
    offset = 0
    if bidirectional:
        num_buckets //= 2
        if distance < 0:
            offset = num_buckets
        distance = abs(distance)
    else:
        distance = max(distance, 0)
    exact = num_buckets // 2
    if distance < exact:
        return offset + distance
    log_ratio = math.log(distance / exact) / math.log(max_distance / exact)
    bucket = exact + int(math.floor(log_ratio * (num_buckets - exact) + 1e-9))
    return offset + min(bucket, num_buckets - 1)


def relative_bias(rel_embedding: np.ndarray, query_positions, key_positions,
                  bidirectional: bool, max_distance: int) -> np.ndarray:
    """rel_embedding [N, buckets] -> bias [N, T, S]."""
    num_heads, num_buckets = rel_embedding.shape
    out = np.zeros((num_heads, len(query_positions), len(key_positions)))
    for t, qp in enumerate(query_positions):
        for s, kp in enumerate(key_positions):
            b = relative_position_bucket(int(kp) - int(qp), bidirectional, num_buckets,
                                         max_distance)
            out[:, t, s] = rel_embedding[:, b]
    return out


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    scale = np.asarray(scale, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(x_q: np.ndarray, x_kv: np.ndarray, p: dict, num_heads: int, num_kv_heads: int,
              head_dim: int, mask: np.ndarray | None = None,
              bias: np.ndarray | None = None) -> np.ndarray:
    """x_q [B, T, D], x_kv [B, S, D]; mask [B, T, S] bool (True = may attend); bias [N, T, S].

    Query head n uses key/value head n // (num_heads // num_kv_heads). No 1/sqrt(H) scaling.
    """
    x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
    wq, wk, wv, wo = (np.asarray(p[n]["kernel"], np.float64)
                      for n in ("query", "key", "value", "out"))
    group = num_heads // num_kv_heads
    heads = []
    for n in range(num_heads):
        kv = n // group
        q = x_q @ wq[:, n * head_dim:(n + 1) * head_dim]  # [B, T, H]
        k = x_kv @ wk[:, kv * head_dim:(kv + 1) * head_dim]  # [B, S, H]
        v = x_kv @ wv[:, kv * head_dim:(kv + 1) * head_dim]  # [B, S, H]
        logits = np.einsum("bth,bsh->bts", q, k)
        if bias is not None:
            logits = logits + bias[n]
        if mask is not None:
            logits = np.where(mask, logits, MASKED)
        heads.append(softmax(logits) @ v)  # [B, T, H]
    return np.concatenate(heads, axis=-1) @ wo


def mlp(x: np.ndarray, p: dict) -> np.ndarray:
    w0, w1, wo = (np.asarray(p[n]["kernel"], np.float64) for n in ("wi_0", "wi_1", "wo"))
    return (gelu_tanh(x @ w0) * (x @ w1)) @ wo


def _pair_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[B, T] and [B, S] -> [B, T, S]: both nonzero."""
    return (a[:, :, None] != 0) & (b[:, None, :] != 0)


def _same_segment(a, b) -> np.ndarray:
    return a[:, :, None] == b[:, None, :]


def encode(params: dict, cfg, tokens: np.ndarray, segment_ids=None) -> np.ndarray:
    """tokens [B, S] (0 = padding) -> [B, S, D]."""
    tokens = np.asarray(tokens)
    p = params["encoder"]
    s = tokens.shape[1]
    mask = _pair_mask(tokens, tokens)
    if segment_ids is not None:
        mask &= _same_segment(np.asarray(segment_ids), np.asarray(segment_ids))
    bias = relative_bias(np.asarray(p["relpos_bias"]["rel_embedding"], np.float64),
                         range(s), range(s), True, cfg.relative_attention_max_distance)
    x = np.asarray(params["token_embedder"]["embedding"], np.float64)[tokens]
    kv_heads = cfg.num_kv_heads if "encoder_self" in cfg.grouped else cfg.num_heads
    for i in range(cfg.num_encoder_layers):
        lp = p[f"layers_{i}"]
        h = rms_norm(x, lp["pre_attention_layer_norm"]["scale"], cfg.layer_norm_epsilon)
        x = x + attention(h, h, lp["attention"], cfg.num_heads, kv_heads, cfg.head_dim, mask,
                          bias)
        h = rms_norm(x, lp["pre_mlp_layer_norm"]["scale"], cfg.layer_norm_epsilon)
        x = x + mlp(h, lp["mlp"])
    return rms_norm(x, p["encoder_norm"]["scale"], cfg.layer_norm_epsilon)


def decode(params: dict, cfg, encoded: np.ndarray, encoder_tokens: np.ndarray,
           decoder_input_tokens: np.ndarray, decoder_target_tokens: np.ndarray,
           encoder_segment_ids=None, decoder_segment_ids=None) -> np.ndarray:
    """Teacher-forced logits [B, T, V]."""
    enc_tok = np.asarray(encoder_tokens)
    dec_in = np.asarray(decoder_input_tokens)
    dec_tgt = np.asarray(decoder_target_tokens)
    p = params["decoder"]
    t = dec_in.shape[1]
    causal = np.tril(np.ones((t, t), bool))[None]
    self_mask = causal & _pair_mask(dec_tgt, dec_tgt)
    cross_mask = _pair_mask(dec_tgt, enc_tok)
    if decoder_segment_ids is not None:
        dseg = np.asarray(decoder_segment_ids)
        self_mask &= _same_segment(dseg, dseg)
        if encoder_segment_ids is not None:
            cross_mask &= _same_segment(dseg, np.asarray(encoder_segment_ids))
    bias = relative_bias(np.asarray(p["relpos_bias"]["rel_embedding"], np.float64),
                         range(t), range(t), False, cfg.relative_attention_max_distance)
    self_kv = cfg.num_kv_heads if "decoder_self" in cfg.grouped else cfg.num_heads
    cross_kv = cfg.num_kv_heads if "cross" in cfg.grouped else cfg.num_heads
    x = np.asarray(params["token_embedder"]["embedding"], np.float64)[dec_in]
    eps = cfg.layer_norm_epsilon
    for i in range(cfg.num_decoder_layers):
        lp = p[f"layers_{i}"]
        h = rms_norm(x, lp["pre_self_attention_layer_norm"]["scale"], eps)
        x = x + attention(h, h, lp["self_attention"], cfg.num_heads, self_kv, cfg.head_dim,
                          self_mask, bias)
        h = rms_norm(x, lp["pre_cross_attention_layer_norm"]["scale"], eps)
        x = x + attention(h, encoded, lp["encoder_decoder_attention"], cfg.num_heads, cross_kv,
                          cfg.head_dim, cross_mask)
        h = rms_norm(x, lp["pre_mlp_layer_norm"]["scale"], eps)
        x = x + mlp(h, lp["mlp"])
    x = rms_norm(x, p["decoder_norm"]["scale"], eps)
    return x @ np.asarray(p["logits_dense"]["kernel"], np.float64)


def forward(params: dict, cfg, encoder_tokens, decoder_input_tokens, decoder_target_tokens,
            encoder_segment_ids=None, decoder_segment_ids=None) -> np.ndarray:
    """Full teacher-forced T5.1.1 forward: logits [B, T, V] in float64."""
    encoded = encode(params, cfg, encoder_tokens, encoder_segment_ids)
    return decode(params, cfg, encoded, encoder_tokens, decoder_input_tokens,
                  decoder_target_tokens, encoder_segment_ids, decoder_segment_ids)
