"""Key/value head pooling (conversion.pooling) on hand-made arrays and on whole tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.conversion import pooling as convert
from gqa_t5x.model import layers
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.network import Transformer

CONFIG = TransformerConfig(vocab_size=50, emb_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                           mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16)

GROUPED_KV = {"decoder_self": "self_attention", "cross": "encoder_decoder_attention"}


def init_params(config, seed=0):
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens, tokens,
                                         enable_dropout=False)
    return jax.tree_util.tree_map(np.asarray, variables["params"])


def batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(1, 50, (2, 7)).astype(np.int32)
    enc[1, 5:] = 0
    dec_tgt = rng.integers(1, 50, (2, 5)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((2, 1), np.int32), dec_tgt[:, :-1]], axis=1)
    return enc, dec_in, dec_tgt


def logits(params, config):
    enc, dec_in, dec_tgt = batch()
    return np.asarray(Transformer(config).apply({"params": params}, enc, dec_in, dec_tgt,
                                                enable_dropout=False))


def leaves(tree):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- pool_kv_heads on hand-made arrays ----------------------------------------------------------


def test_mean_equals_hand_computed_group_means():
    d, n, h = 3, 4, 2
    kernel = np.arange(d * n * h, dtype=np.float32).reshape(d, n * h) ** 1.5
    pooled = convert.pool_kv_heads(kernel, n, 2, "mean")
    # head j of row i: kernel[i, j*h:(j+1)*h]; groups {0, 1} and {2, 3}
    expected = np.zeros((d, 2 * h), np.float32)
    for i in range(d):
        for g, (a, b) in enumerate([(0, 1), (2, 3)]):
            for c in range(h):
                expected[i, g * h + c] = (kernel[i, a * h + c] + kernel[i, b * h + c]) / 2
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    mqa = convert.pool_kv_heads(kernel, n, 1, "mean")
    for c in range(h):
        np.testing.assert_allclose(mqa[:, c], kernel[:, c::h].mean(axis=1), rtol=1e-6)


def test_first_keeps_the_first_head_of_each_group():
    kernel = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 18)  # N=6, H=3
    pooled = convert.pool_kv_heads(kernel, 6, 3, "first")  # groups {0,1} {2,3} {4,5}
    np.testing.assert_array_equal(pooled, kernel[:, [0, 1, 2, 6, 7, 8, 12, 13, 14]])


def test_pooling_gqa_again_equals_pooling_mha_directly():
    kernel = np.random.default_rng(1).standard_normal((5, 8 * 4)).astype(np.float32)
    direct = convert.pool_kv_heads(kernel, 8, 2, "mean")
    via_gqa4 = convert.pool_kv_heads(convert.pool_kv_heads(kernel, 8, 4, "mean"), 4, 2, "mean")
    np.testing.assert_allclose(via_gqa4, direct, rtol=1e-6, atol=1e-7)


def test_k_equal_n_returns_the_kernel_itself():
    kernel = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    for method in ("mean", "first"):
        assert convert.pool_kv_heads(kernel, 4, 4, method) is kernel


def test_random_is_seeded_and_has_the_t5_scale():
    kernel = np.zeros((512, 8 * 64), np.float32)
    a = convert.pool_kv_heads(kernel, 8, 2, "random", np.random.default_rng(3))
    b = convert.pool_kv_heads(kernel, 8, 2, "random", np.random.default_rng(3))
    c = convert.pool_kv_heads(kernel, 8, 2, "random", np.random.default_rng(4))
    assert a.shape == (512, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # variance_scaling(1.0, fan_in, normal): std 1/sqrt(fan_in) = 1/sqrt(512)
    assert abs(a.std() * np.sqrt(512) - 1.0) < 0.02
    assert abs(a.mean()) < 0.01 / np.sqrt(512) * 10


def test_pool_errors_name_the_problem():
    kernel = np.zeros((4, 12), np.float32)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        convert.pool_kv_heads(kernel, 4, 3, "mean")
    with pytest.raises(ValueError, match="12 columns are not divisible by num_heads=5"):
        convert.pool_kv_heads(kernel, 5, 1, "mean")
    with pytest.raises(ValueError, match="unknown pooling method 'median'"):
        convert.pool_kv_heads(kernel, 4, 2, "median")
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        convert.pool_kv_heads(kernel, 4, 2, "random")


# ---- whole param trees --------------------------------------------------------------------------


def test_param_shapes_match_the_model():
    for config in (CONFIG, with_kv_heads(CONFIG, 2),
                   with_kv_heads(CONFIG, 1, ("encoder_self", "decoder_self", "cross"))):
        tokens = jnp.ones((1, 3), jnp.int32)
        abstract = jax.eval_shape(lambda c=config, t=tokens: Transformer(c).init(
            jax.random.PRNGKey(0), t, t, t, enable_dropout=False))
        expected = layers.shape_tree(abstract["params"])
        got = {"/".join(p): s for p, s in convert.param_shapes(config).items()}
        assert got == expected
        assert convert.count_params(config) == layers.count_params(abstract["params"])


def test_same_kv_heads_with_mean_is_bit_identical():
    params = init_params(CONFIG)
    out = convert.convert_params(params, CONFIG, with_kv_heads(CONFIG, 4), "mean")
    for name, leaf in leaves(params).items():
        assert leaves(out)[name] is leaf
    np.testing.assert_array_equal(logits(out, CONFIG), logits(params, CONFIG))


def _equalize_heads_within_groups(params, config, k):
    """MHA params whose key/value heads of the grouped attentions equal the first head of their
    group (groups of N // k contiguous heads)."""
    n, h, g = config.num_heads, config.head_dim, config.num_heads // k
    params = jax.tree_util.tree_map(np.array, params)  # copies
    for i in range(config.num_decoder_layers):
        for module in GROUPED_KV.values():
            for proj in ("key", "value"):
                kernel = params["decoder"][f"layers_{i}"][module][proj]["kernel"]
                for head in range(n):
                    src = (head // g) * g
                    kernel[:, head * h:(head + 1) * h] = kernel[:, src * h:(src + 1) * h]
    return params


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("k", [2, 1])
def test_equal_heads_convert_without_changing_logits(k, method):
    params = _equalize_heads_within_groups(init_params(CONFIG, seed=1), CONFIG, k)
    target = with_kv_heads(CONFIG, k)
    converted = convert.convert_params(params, CONFIG, target, method)
    kv = converted["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
    assert kv.shape == (32, k * 8)
    np.testing.assert_allclose(logits(converted, target), logits(params, CONFIG),
                               rtol=1e-5, atol=1e-5)  # float32 rounding over two layers


def test_unequal_heads_do_change_logits():
    # The invariance above is not vacuous: without equal heads, pooling changes the outputs.
    params = init_params(CONFIG, seed=1)
    target = with_kv_heads(CONFIG, 1)
    converted = convert.convert_params(params, CONFIG, target, "mean")
    assert np.abs(logits(converted, target) - logits(params, CONFIG)).max() > 1e-3


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_only_grouped_kv_kernels_change(method):
    params = init_params(CONFIG)
    target = with_kv_heads(CONFIG, 2)
    out = leaves(convert.convert_params(params, CONFIG, target, method, seed=5))
    for name, leaf in leaves(params).items():
        parts = name.split("/")
        grouped = (parts[0] == "decoder" and len(parts) == 5 and parts[2] in GROUPED_KV.values()
                   and parts[3] in ("key", "value"))
        if grouped:
            assert out[name].shape == (32, 16)
        else:
            assert out[name] is leaf, name
            np.testing.assert_array_equal(out[name], leaf)


def test_encoder_self_attention_is_pooled_when_grouped():
    params = init_params(CONFIG)
    target = with_kv_heads(CONFIG, 2, ("encoder_self", "decoder_self", "cross"))
    out = convert.convert_params(params, CONFIG, target, "first")
    kernel = params["encoder"]["layers_1"]["attention"]["value"]["kernel"]
    np.testing.assert_array_equal(out["encoder"]["layers_1"]["attention"]["value"]["kernel"],
                                  np.concatenate([kernel[:, 0:8], kernel[:, 16:24]], axis=1))


def test_random_conversion_is_reproducible():
    params = init_params(CONFIG)
    target = with_kv_heads(CONFIG, 1)
    a = leaves(convert.convert_params(params, CONFIG, target, "random", seed=7))
    b = leaves(convert.convert_params(params, CONFIG, target, "random", seed=7))
    c = leaves(convert.convert_params(params, CONFIG, target, "random", seed=8))
    name = "decoder/layers_1/encoder_decoder_attention/value/kernel"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])
    # different arrays draw different numbers
    assert not np.array_equal(a[name], a["decoder/layers_1/encoder_decoder_attention/key/kernel"])


def test_gqa_to_fewer_groups():
    source = with_kv_heads(CONFIG, 2)
    params = init_params(source)
    out = convert.convert_params(params, source, with_kv_heads(CONFIG, 1), "mean")
    kernel = params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]  # [32, 2*8]
    np.testing.assert_allclose(out["decoder"]["layers_0"]["self_attention"]["key"]["kernel"],
                               (kernel[:, :8] + kernel[:, 8:]) / 2, rtol=1e-6)


def test_convert_params_errors_name_the_problem():
    gqa2 = with_kv_heads(CONFIG, 2)
    with pytest.raises(ValueError, match=r"more kv heads \(4\) than the source \(2\)"):
        convert.convert_params(init_params(gqa2), gqa2, CONFIG, "mean")
    n12 = CONFIG.replace(num_heads=12, num_kv_heads=4)
    with pytest.raises(ValueError, match="target num_kv_heads=3 does not divide the source's 4"):
        convert.check_conversion(n12, n12.replace(num_kv_heads=3))
    with pytest.raises(ValueError, match=r"emb_dim: 32 -> 64"):
        convert.check_conversion(CONFIG, with_kv_heads(CONFIG, 2).replace(emb_dim=64))
    params = init_params(CONFIG)
    params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError,
                       match=r"decoder/layers_1/mlp/wo/kernel has shape \(3, 3\), expected"):
        convert.convert_params(params, CONFIG, with_kv_heads(CONFIG, 2), "mean")
    del params["decoder"]["decoder_norm"]
    with pytest.raises(ValueError, match="missing arrays: decoder/decoder_norm/scale"):
        convert.convert_params(params, CONFIG, with_kv_heads(CONFIG, 2), "mean")
