"""TransformerConfig validation, serialization, and the parameter shapes of every preset."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model.config import PRESETS, TransformerConfig, get_config, with_kv_heads
from gqa_t5x.model.network import Transformer

# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    ({"num_heads": 12, "num_kv_heads": 5}, "num_heads=12 is not divisible by num_kv_heads=5"),
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 is not divisible by num_kv_heads=4"),
    ({"num_kv_heads": 0}, "num_kv_heads=0"),
    ({"num_kv_heads": -2}, "num_kv_heads=-2"),
    ({"num_heads": 4, "num_kv_heads": 8}, "num_kv_heads=8 is larger than num_heads=4"),
    ({"grouped": ("decoder_self", "encoder")}, "'encoder'"),
    ({"grouped": ("cross", "cross")}, "repeats"),
    ({"dtype": "float64"}, "dtype='float64'"),
    ({"dtype": "fp32"}, "dtype='fp32'"),
    ({"emb_dim": 0}, "emb_dim=0"),
    ({"head_dim": 2.5}, "head_dim=2.5"),
    ({"num_encoder_layers": -1}, "num_encoder_layers=-1"),
    ({"dropout_rate": 1.0}, "dropout_rate=1.0"),
])
def test_bad_configs_raise_naming_the_values(changes, message):
    base = dict(num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TransformerConfig(**{**base, **changes})


def test_grouped_given_as_a_string_is_rejected():
    with pytest.raises(ValueError, match="grouped='cross' must be a sequence"):
        TransformerConfig(grouped="cross")


def test_kv_heads_per_attention_kind():
    config = TransformerConfig(num_heads=8, num_kv_heads=2)
    assert config.grouped == ("decoder_self", "cross")
    assert [config.kv_heads(k) for k in ("encoder_self", "decoder_self", "cross")] == [8, 2, 2]
    everywhere = with_kv_heads(config, 1, ("cross", "encoder_self", "decoder_self"))
    assert everywhere.grouped == ("encoder_self", "decoder_self", "cross")  # normalized order
    assert [everywhere.kv_heads(k) for k in ("encoder_self", "decoder_self", "cross")] == [1] * 3
    with pytest.raises(ValueError, match="'decoder'"):
        config.kv_heads("decoder")


def test_json_round_trip_and_unknown_fields():
    config = get_config("tiny", num_kv_heads=2, grouped=("cross",), dtype="bfloat16")
    assert TransformerConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="num_kv_head"):
        TransformerConfig.from_dict({"num_kv_head": 2})
    with pytest.raises(ValueError, match="'t5_1_1_huge'"):
        get_config("t5_1_1_huge")


def test_decode_cache_bytes_hand_computed():
    config = get_config("t5_1_1_xxl", num_kv_heads=8)
    # 24 layers x 2 (K and V) x 8 heads x 64 x 4 bytes, plus the same per input token for cross.
    per_token = 24 * 2 * 8 * 64 * 4
    assert config.decode_cache_bytes_per_token() == per_token
    assert config.decode_cache_bytes_per_token(input_length=10) == per_token * 11
    assert config.replace(num_kv_heads=64).decode_cache_bytes_per_token() == per_token * 8


# ---- presets: golden shapes and counts ----------------------------------------------------------

# Written from the T5.1.1 architecture: (emb_dim, num_heads, mlp_dim, layers); head_dim 64,
# vocabulary 32128, 32 relative-position buckets everywhere.
GOLDEN = {
    "t5_1_1_small": (512, 6, 1024, 8),
    "t5_1_1_base": (768, 12, 2048, 12),
    "t5_1_1_large": (1024, 16, 2816, 24),
    "t5_1_1_xl": (2048, 32, 5120, 24),
    "t5_1_1_xxl": (4096, 64, 10240, 24),
}
# Parameter counts of the public T5.1.1 checkpoints (google/t5-v1_1-*), untied logits included.
PUBLISHED_COUNTS = {
    "t5_1_1_small": 76_961_152,
    "t5_1_1_base": 247_577_856,
    "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184,
    "t5_1_1_xxl": 11_135_332_352,
}


def _count(emb, heads, mlp, layers, kv_self, kv_cross, kv_enc, vocab=32128, buckets=32, h=64):
    """Independent count: embeddings + logits, two relative biases, two final norms, layers."""
    attn = lambda kv: 2 * emb * heads * h + 2 * emb * kv * h  # noqa: E731
    encoder_layer = 2 * emb + attn(kv_enc) + 3 * emb * mlp
    decoder_layer = 3 * emb + attn(kv_self) + attn(kv_cross) + 3 * emb * mlp
    return (2 * vocab * emb + 2 * heads * buckets + 2 * emb
            + layers * (encoder_layer + decoder_layer))


@functools.cache
def _shapes(config):
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    init = functools.partial(Transformer(config).init, enable_dropout=False)
    variables = jax.eval_shape(init, jax.random.PRNGKey(0), tokens, tokens, tokens)
    return variables["params"]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = tuple(v.shape)
    return out


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("kv", ["mha", 8])
def test_preset_shapes_and_counts(name, kv):
    emb, heads, mlp, layers = GOLDEN[name]
    if kv != "mha" and heads % kv:
        # GQA-8 does not exist for 6 (small) or 12 (base) heads.
        message = f"num_heads={heads} is not divisible|num_kv_heads=8 is larger than"
        with pytest.raises(ValueError, match=message):
            get_config(name, num_kv_heads=kv)
        return
    k = heads if kv == "mha" else kv
    config = get_config(name, num_kv_heads=k)
    shapes = _flat(_shapes(config))
    v, nh = 32128, heads * 64
    expected = {
        "token_embedder/embedding": (v, emb),
        "encoder/relpos_bias/rel_embedding": (heads, 32),
        "decoder/relpos_bias/rel_embedding": (heads, 32),
        "encoder/encoder_norm/scale": (emb,),
        "decoder/decoder_norm/scale": (emb,),
        "decoder/logits_dense/kernel": (emb, v),
    }
    for i in range(layers):
        e, d = f"encoder/layers_{i}/", f"decoder/layers_{i}/"
        expected.update({
            e + "pre_attention_layer_norm/scale": (emb,),
            e + "attention/query/kernel": (emb, nh),
            e + "attention/key/kernel": (emb, nh),  # the encoder stays multi-head
            e + "attention/value/kernel": (emb, nh),
            e + "attention/out/kernel": (nh, emb),
            e + "pre_mlp_layer_norm/scale": (emb,),
            e + "mlp/wi_0/kernel": (emb, mlp),
            e + "mlp/wi_1/kernel": (emb, mlp),
            e + "mlp/wo/kernel": (mlp, emb),
            d + "pre_self_attention_layer_norm/scale": (emb,),
            d + "pre_cross_attention_layer_norm/scale": (emb,),
            d + "pre_mlp_layer_norm/scale": (emb,),
            d + "mlp/wi_0/kernel": (emb, mlp),
            d + "mlp/wi_1/kernel": (emb, mlp),
            d + "mlp/wo/kernel": (mlp, emb),
        })
        for attn in ("self_attention", "encoder_decoder_attention"):
            expected.update({
                f"{d}{attn}/query/kernel": (emb, nh),
                f"{d}{attn}/key/kernel": (emb, k * 64),
                f"{d}{attn}/value/kernel": (emb, k * 64),
                f"{d}{attn}/out/kernel": (nh, emb),
            })
    assert shapes == expected
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert total == _count(emb, heads, mlp, layers, kv_self=k, kv_cross=k, kv_enc=heads)
    if kv == "mha":
        assert total == PUBLISHED_COUNTS[name]


def test_xxl_gqa8_kv_kernels():
    shapes = _flat(_shapes(get_config("t5_1_1_xxl", num_kv_heads=8)))
    assert shapes["decoder/layers_23/self_attention/key/kernel"] == (4096, 512)
    assert shapes["decoder/layers_0/encoder_decoder_attention/value/kernel"] == (4096, 512)
    assert shapes["decoder/layers_0/self_attention/query/kernel"] == (4096, 4096)
    assert shapes["encoder/layers_0/attention/key/kernel"] == (4096, 4096)
    assert shapes["decoder/layers_0/mlp/wi_0/kernel"] == (4096, 10240)
    assert shapes["token_embedder/embedding"] == (32128, 4096)
    assert shapes["encoder/relpos_bias/rel_embedding"] == (64, 32)


def test_mqa_count_and_tiny_preset():
    # MQA in decoder self- and cross-attention of large, against the formula.
    total = sum(int(np.prod(s)) for s in
                _flat(_shapes(get_config("t5_1_1_large", num_kv_heads=1))).values())
    assert total == _count(1024, 16, 2816, 24, kv_self=1, kv_cross=1, kv_enc=16)
    tiny = PRESETS["tiny"]
    assert tiny.head_dim * tiny.num_heads != tiny.emb_dim
