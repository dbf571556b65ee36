"""T5.1.1 encoder-decoder with grouped-query attention, with t5x's module interface.

Parameter tree (t5x names, joined 2-D kernels; K = config.kv_heads(kind)):
  token_embedder/embedding                                   [V, D]
  encoder/relpos_bias/rel_embedding                          [N, buckets]
  encoder/layers_i/pre_attention_layer_norm/scale            [D]
  encoder/layers_i/attention/{query,out}/kernel              [D, N*H], [N*H, D]
  encoder/layers_i/attention/{key,value}/kernel              [D, K*H]
  encoder/layers_i/pre_mlp_layer_norm/scale                  [D]
  encoder/layers_i/mlp/{wi_0,wi_1}/kernel, mlp/wo/kernel     [D, F], [F, D]
  encoder/encoder_norm/scale                                 [D]
  decoder/relpos_bias/rel_embedding                          [N, buckets]
  decoder/layers_i/pre_self_attention_layer_norm/scale       [D]
  decoder/layers_i/self_attention/...                        as above
  decoder/layers_i/pre_cross_attention_layer_norm/scale      [D]
  decoder/layers_i/encoder_decoder_attention/...             as above
  decoder/layers_i/pre_mlp_layer_norm/scale, mlp/...         as above
  decoder/decoder_norm/scale                                 [D]
  decoder/logits_dense/kernel                                [D, V]

With `config.scan_layers` the layers are one `nn.scan` module, `{encoder,decoder}/layers/...`,
each parameter with a leading [L] axis (model/scan.py converts to and from the layout above).

Decode cache: `decoder/cache_index` (scalar, the position the next step writes) and, per layer,
the attention caches documented in `attention.py`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from gqa_t5x.model import layers, scan
from gqa_t5x.model.attention import (
    GroupedQueryAttention,
    make_attention_mask,
    make_causal_mask,
    make_decoder_mask,
    mask_to_bias,
)
from gqa_t5x.model.config import TransformerConfig


def _dropout(config: TransformerConfig, x, enable_dropout: bool):
    return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(x,
                                                                 deterministic=not enable_dropout)


def _attention(config: TransformerConfig, kind: str, name: str, **kw) -> GroupedQueryAttention:
    return GroupedQueryAttention(
        num_heads=config.num_heads,
        num_kv_heads=config.kv_heads(kind),
        head_dim=config.head_dim,
        dropout_rate=config.dropout_rate,
        dtype=config.activation_dtype,
        kernels=config.kernels,
        name=name,
        **kw,
    )


def _relpos(config: TransformerConfig, bidirectional: bool) -> layers.RelativePositionBias:
    return layers.RelativePositionBias(
        num_heads=config.num_heads,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        bidirectional=bidirectional,
        name="relpos_bias",
    )


def _norm(config: TransformerConfig, name: str) -> layers.RMSNorm:
    return layers.RMSNorm(config.layer_norm_epsilon, config.activation_dtype, name=name)


def _mlp_block(config: TransformerConfig, x, enable_dropout: bool):
    """x + dropout(mlp(norm(x))), the last sublayer of every encoder and decoder layer."""
    h = _norm(config, "pre_mlp_layer_norm")(x)
    h = layers.GatedGeluMlp(config.mlp_dim, config.dropout_rate, config.activation_dtype,
                            config.kernels, name="mlp")(h, enable_dropout=enable_dropout)
    x = x + _dropout(config, h, enable_dropout)
    return layers.with_sharding_constraint(x, (layers.BATCH, layers.LENGTH, layers.EMBED))


class EncoderLayer(nn.Module):
    config: TransformerConfig
    enable_dropout: bool = False

    @nn.compact
    def __call__(self, x, bias):
        cfg, drop = self.config, self.enable_dropout
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = _attention(cfg, "encoder_self", "attention")(h, h, bias, enable_dropout=drop)
        x = x + _dropout(cfg, h, drop)
        x = _mlp_block(cfg, x, drop)
        return (x, None) if cfg.scan_layers else x  # nn.scan's (carry, output)


class DecoderLayer(nn.Module):
    config: TransformerConfig
    recompute_cross_kv: bool = False
    enable_dropout: bool = False
    decode: bool = False
    max_decode_length: int | None = None

    @nn.compact
    def __call__(self, x, encoded, self_bias, cross_bias, cache_index=None):
        cfg, drop, decode = self.config, self.enable_dropout, self.decode
        h = _norm(cfg, "pre_self_attention_layer_norm")(x)
        h = _attention(cfg, "decoder_self", "self_attention")(
            h, h, self_bias, decode=decode, cache_index=cache_index,
            max_decode_length=self.max_decode_length, enable_dropout=drop)
        x = x + _dropout(cfg, h, drop)
        h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
        h = _attention(cfg, "cross", "encoder_decoder_attention", cross=True,
                       recompute_cross_kv=self.recompute_cross_kv)(
            h, encoded, cross_bias, decode=decode, cache_index=cache_index,
            enable_dropout=drop)
        x = x + _dropout(cfg, h, drop)
        x = _mlp_block(cfg, x, drop)
        return (x, None) if cfg.scan_layers else x  # nn.scan's (carry, output)


class Encoder(nn.Module):
    config: TransformerConfig
    token_embedder: nn.Module

    @nn.compact
    def __call__(self, tokens, mask_bias, *, enable_dropout: bool = False):
        """tokens [B, S], mask_bias [B, 1, S, S] -> encoded [B, S, D]."""
        cfg = self.config
        s = tokens.shape[-1]
        positions = jnp.arange(s)
        # The mask [B, 1, S, S] and the relative position bias [1, N, S, S] stay apart: each
        # attention adds them to its logits, and no [B, N, S, S] array lives across the layers.
        bias = (mask_bias, _relpos(cfg, bidirectional=True)(positions, positions))
        x = _dropout(cfg, self.token_embedder(tokens), enable_dropout)  # [B, S, D]
        layer = scan.layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, num_broadcast=1)
        if cfg.scan_layers and cfg.num_encoder_layers:
            x, _ = layer(cfg, enable_dropout, name=scan.LAYERS)(x, bias)
        else:
            for i in range(cfg.num_encoder_layers):
                x = layer(cfg, enable_dropout, name=f"layers_{i}")(x, bias)
        x = _norm(cfg, "encoder_norm")(x)
        return _dropout(cfg, x, enable_dropout)


class Decoder(nn.Module):
    config: TransformerConfig
    token_embedder: nn.Module
    recompute_cross_kv: bool = False

    @nn.compact
    def __call__(self, encoded, tokens, self_mask, cross_bias, *, enable_dropout: bool = False,
                 decode: bool = False, max_decode_length=None):
        """tokens [B, T]; self_mask [B, 1, T, T] bool (unused in decode steps);
        cross_bias [B, 1, T, S] (in decode, [B', 1, 1, S] with B' the batch of `encoded`).
        Returns logits [B, T, V] in float32."""
        cfg = self.config
        if decode and cfg.scan_layers:
            raise ValueError(
                "decode=True with scan_layers=True: decode with the unscanned model, "
                "Transformer(config.replace(scan_layers=False)), and unscanned params "
                "(gqa_t5x.model.scan.unstack_layers); EncoderDecoderModel.predict_batch does so")
        t = tokens.shape[-1]
        relpos = _relpos(cfg, bidirectional=False)
        cache_index = None
        if decode and self.has_variable("cache", "cache_index"):
            # A step: one token at `cache_index`, attending to cache positions <= cache_index.
            if max_decode_length is None:
                raise ValueError("decode=True needs max_decode_length")
            index_var = self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
            cache_index = index_var.value
            index_var.value = cache_index + 1
            key_positions = jnp.arange(max_decode_length)
            visible = (key_positions <= cache_index)[None, None, None, :]  # [1, 1, 1, L]
            self_bias = (mask_to_bias(visible), relpos(cache_index[None], key_positions))
        else:
            if decode:  # creating the cache; this call's logits are not used
                self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
                self_mask = make_causal_mask(t)
            positions = jnp.arange(t)
            # [B, 1, T, T] and [1, N, T, T], added inside each attention
            self_bias = (mask_to_bias(self_mask), relpos(positions, positions))

        x = _dropout(cfg, self.token_embedder(tokens), enable_dropout)  # [B, T, D]
        if decode:  # no backward pass, so no remat; never scanned (refused above)
            for i in range(cfg.num_decoder_layers):
                x = DecoderLayer(cfg, self.recompute_cross_kv, enable_dropout, decode,
                                 max_decode_length, name=f"layers_{i}")(
                    x, encoded, self_bias, cross_bias, cache_index)
        else:
            layer = scan.layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, num_broadcast=3)
            make = functools.partial(layer, cfg, self.recompute_cross_kv, enable_dropout)
            if cfg.scan_layers and cfg.num_decoder_layers:
                x, _ = make(name=scan.LAYERS)(x, encoded, self_bias, cross_bias)
            else:
                for i in range(cfg.num_decoder_layers):
                    x = make(name=f"layers_{i}")(x, encoded, self_bias, cross_bias)
        x = _norm(cfg, "decoder_norm")(x)
        x = _dropout(cfg, x, enable_dropout)
        logits = layers.DenseJoined(cfg.vocab_size, (layers.EMBED, layers.VOCAB),
                                    layers.mlp_kernel_init, cfg.activation_dtype, cfg.kernels,
                                    name="logits_dense")(x)  # [B, T, V]
        return jnp.asarray(logits, jnp.float32)


class Transformer(nn.Module):
    """T5.1.1 encoder-decoder; `config.num_kv_heads` kv heads in the `config.grouped` attentions.

    `recompute_cross_kv=True` re-projects cross-attention keys/values at every decode step
    instead of reading them from the cache (for benchmarks only; results are identical).
    Token ids may come in any numeric dtype (t5x initializes with float32 dummies); they are
    cast to int32.
    """

    config: TransformerConfig
    recompute_cross_kv: bool = False

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder, self.recompute_cross_kv)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, *,
               enable_dropout: bool = True):
        """encoder_input_tokens [B, S] (0 = padding) -> encoded [B, S, D].

        Relative positions come from the token index, as in t5x; within a packed segment they
        equal the differences of `encoder_positions`, and the segment mask keeps segments apart.
        """
        del encoder_positions
        mask = make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0)
        if encoder_segment_ids is not None:
            mask = mask & make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal)
        return self.encoder(encoder_input_tokens, mask_to_bias(mask),
                            enable_dropout=enable_dropout)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
               enable_dropout: bool = True, decode: bool = False,
               max_decode_length: int | None = None):
        """Logits [B, T, V] for decoder_input_tokens [B, T] given encoded [B, S, D].

        decode=True (with mutable=['cache']): the first call creates the cache (self-attention
        caches of length max_decode_length, zeroed cross-attention keys/values); each later
        call takes one token per sequence, decoder_input_tokens [B, 1], and the one at
        cache_index 0 fills the cross-attention caches from `encoded`. In decode, `encoded`
        [B / W, S, D] and encoder_input_tokens [B / W, S] may hold each example once for W
        adjacent decoder rows (beams), which then share its cross-attention keys/values.
        """
        del decoder_positions
        if decode:
            self_mask = None
            # Every decode query is a real token: only the encoder's padding is masked, with
            # the encoder's batch, which beams may share.
            cross_mask = (encoder_input_tokens > 0)[:, None, None, :]  # [B', 1, 1, S]
        else:
            self_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
            cross_mask = make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0)
            if encoder_segment_ids is not None and decoder_segment_ids is not None:
                cross_mask = cross_mask & make_attention_mask(
                    decoder_segment_ids, encoder_segment_ids, jnp.equal)
        return self.decoder(encoded, decoder_input_tokens, self_mask, mask_to_bias(cross_mask),
                            enable_dropout=enable_dropout, decode=decode,
                            max_decode_length=max_decode_length)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False,
                 max_decode_length: int | None = None):
        """Teacher-forced logits [B, T, V] (float32)."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              enable_dropout=enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                           decoder_positions, enable_dropout=enable_dropout, decode=decode,
                           max_decode_length=max_decode_length)
