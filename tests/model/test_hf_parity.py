"""Our network against Hugging Face transformers' PyTorch T5 on the same weights, and the
HF <-> t5x parameter mapping (gqa_t5x/checkpoints/hf.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention

from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.model import layers
from gqa_t5x.model.config import PRESETS, TransformerConfig
from gqa_t5x.model.network import Transformer

# Two T5.1.1 shapes: A has head_dim == emb_dim / num_heads and short-range buckets (8 / 16, so
# that the lengths below reach the log buckets and the clipped last one); B has head_dim !=
# emb_dim / num_heads, the standard 32 / 128 buckets with lengths past 16 (log buckets), and
# fewer encoder than decoder layers.
HF_CONFIGS = {
    "A": dict(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16),
    "B": dict(vocab_size=56, d_model=48, d_kv=8, num_heads=3, d_ff=40, num_layers=1,
              num_decoder_layers=2, relative_attention_num_buckets=32,
              relative_attention_max_distance=128),
}
LENGTHS = {"A": (20, 18), "B": (40, 24)}  # (encoder, decoder)

# Relative errors measured, filled in by the parity test and printed with -s.
MEASURED: dict[str, float] = {}


def _hf_config(name, **kw):
    kw = {"dropout_rate": 0.0, **kw}
    return T5Config(**HF_CONFIGS[name], feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, **kw)


@functools.cache
def _hf_model(name):
    """A randomly initialized, really untied T5.1.1 (lm_head has its own weight)."""
    config = _hf_config(name, attn_implementation="eager")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    tied_count = sum(p.numel() for p in model.parameters())
    v, d = config.vocab_size, config.d_model
    with torch.no_grad():
        # transformers >= 5 always ties lm_head to the embedding; T5.1.1 does not.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(v, d) * d ** -0.5)
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:  # not all ones, so that every scale is exercised
                p.uniform_(0.5, 1.5)
    assert model.lm_head.weight is not model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == tied_count + v * d
    return model


def _tokens(name, seed):
    r = np.random.default_rng(seed)
    v = HF_CONFIGS[name]["vocab_size"]
    s, t = LENGTHS[name]
    enc = r.integers(2, v, size=(2, s))
    dec = np.concatenate([np.zeros((2, 1), int), r.integers(2, v, size=(2, t - 1))], axis=1)
    tgt = np.concatenate([dec[:, 1:], np.ones((2, 1), int)], axis=1)
    return enc, dec, tgt


@functools.cache
def _jitted_apply(config):
    return jax.jit(functools.partial(Transformer(config).apply, enable_dropout=False))


def _ours(config, params, enc, dec, tgt):
    apply = _jitted_apply(config)
    return np.asarray(apply({"params": params}, jnp.asarray(enc, jnp.int32),
                            jnp.asarray(dec, jnp.int32), jnp.asarray(tgt, jnp.int32)))


def _hf(model, enc, dec):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0).long(),
                    decoder_input_ids=torch.tensor(dec))
    return out.logits.numpy()


def _relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# ---- the activation and the position buckets ----------------------------------------------------


def test_hf_gated_gelu_is_the_tanh_approximation():
    config = _hf_config("A")
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    hf = ACT2FN[config.dense_act_fn](torch.tensor(x)).numpy()
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(hf, tanh, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.nn.gelu(x, approximate=True)), tanh, atol=1e-6)
    # The exact (erf) GELU differs by more than that, so the check can tell them apart.
    assert np.abs(torch.nn.functional.gelu(torch.tensor(x)).numpy() - tanh).max() > 1e-4


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(8, 16), (32, 128)])
def test_hf_buckets_equal_ours(bidirectional, num_buckets, max_distance):
    # HF leaves out the float32 eps that t5x adds inside the log; at these bucket settings the
    # buckets agree anyway, for every distance up to 600.
    rel = np.arange(-600, 601)[None, :]
    hf = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                               num_buckets=num_buckets,
                                               max_distance=max_distance).numpy()
    ours = layers.relative_position_bucket(jnp.asarray(rel), bidirectional, num_buckets,
                                           max_distance)
    np.testing.assert_array_equal(np.asarray(ours), hf)


# ---- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_equal_hf_t5(name):
    model = _hf_model(name)
    config = hf_mapping.config_from_hf_t5(model.config)
    assert config.head_dim == HF_CONFIGS[name]["d_kv"]
    params = hf_mapping.params_from_hf_t5(model.state_dict(), config)
    enc, dec, tgt = _tokens(name, seed=1)
    enc[1, enc.shape[1] // 2:] = 0  # the second input is padded
    ours, hf = _ours(config, params, enc, dec, tgt), _hf(model, enc, dec)
    assert ours.shape == hf.shape == (2, dec.shape[1], config.vocab_size)
    error = _relative_error(ours, hf)
    MEASURED[name] = error
    print(f"config {name}: max |ours - hf| / max |hf| = {error:.2e}")
    assert error < 1e-4


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_gradients_equal_hf_t5(name):
    """The gradient of the mean token cross-entropy with respect to every parameter, against
    torch autograd through HF's model (our dense layers write their backward pass by hand)."""
    model = _hf_model(name)
    config = hf_mapping.config_from_hf_t5(model.config)
    params = hf_mapping.params_from_hf_t5(model.state_dict(), config)
    enc, dec, tgt = _tokens(name, seed=3)
    enc[0, enc.shape[1] // 3:] = 0  # a padded input

    model.zero_grad()
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0).long(),
                decoder_input_ids=torch.tensor(dec), labels=torch.tensor(tgt))
    out.loss.backward()
    hf_grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)  # the model is shared with the other tests
    hf_grads = hf_mapping.params_from_hf_t5(hf_grads, config)

    module = Transformer(config)

    def loss(p):
        logits = module.apply({"params": p}, jnp.asarray(enc), jnp.asarray(dec),
                              jnp.asarray(tgt), enable_dropout=False)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    flat_hf = dict(jax.tree_util.tree_flatten_with_path(hf_grads)[0])
    assert flat_ours.keys() == flat_hf.keys()
    for path, reference in flat_hf.items():
        assert np.abs(reference).max() > 0, path  # every parameter gets a gradient
        error = _relative_error(np.asarray(flat_ours[path]), reference)
        assert error < 1e-4, (jax.tree_util.keystr(path), error)


def test_written_hf_state_dict_loads_into_hf():
    """params -> HF state dict -> a fresh HF model gives the logits of our model."""
    name = "B"
    config = hf_mapping.config_from_hf_t5(_hf_config(name))
    init = jax.jit(functools.partial(Transformer(config).init, enable_dropout=False))
    tokens = jnp.ones((1, 4), jnp.int32)
    params = jax.tree_util.tree_map(np.asarray,
                                    init(jax.random.PRNGKey(3), tokens, tokens, tokens)["params"])
    state = hf_mapping.params_to_hf_t5(params, config)
    model = T5ForConditionalGeneration(_hf_config(name, attn_implementation="eager")).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(config.vocab_size, config.emb_dim))
    result = model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    assert set(result.missing_keys) <= {"encoder.embed_tokens.weight",
                                        "decoder.embed_tokens.weight"}
    assert not result.unexpected_keys
    enc, dec, tgt = _tokens(name, seed=2)
    assert _relative_error(_ours(config, params, enc, dec, tgt), _hf(model, enc, dec)) < 1e-4


# ---- config mapping -----------------------------------------------------------------------------


def test_config_from_hf_t5_fields():
    config = hf_mapping.config_from_hf_t5(_hf_config("B", layer_norm_epsilon=1e-5,
                                                     dropout_rate=0.1))
    assert config == TransformerConfig(
        vocab_size=56, emb_dim=48, num_heads=3, num_kv_heads=3, head_dim=8, mlp_dim=40,
        num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.1,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-5)
    # A transformers-5 dict (tie_word_embeddings forced True, scale_decoder_outputs False).
    d = _hf_config("A").to_dict()
    assert d["tie_word_embeddings"] is True and d["scale_decoder_outputs"] is False
    assert hf_mapping.config_from_hf_t5(d).num_heads == 4
    # A dict written by transformers 4 (google/t5-v1_1-*): no scale_decoder_outputs.
    old = {**HF_CONFIGS["A"], "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
           "num_decoder_layers": None}
    config = hf_mapping.config_from_hf_t5(old)
    assert config.num_decoder_layers == 2 and config.dropout_rate == 0.1
    grouped = hf_mapping.config_from_hf_t5({**old, "num_key_value_heads": 2},
                                           grouped=("cross",))
    assert (grouped.num_kv_heads, grouped.grouped) == (2, ("cross",))


def test_config_from_hf_t5_rejects_other_t5s():
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        hf_mapping.config_from_hf_t5(T5Config(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="rescales decoder outputs"):
        hf_mapping.config_from_hf_t5(T5Config(feed_forward_proj="gated-gelu"))
    old_tied = {**HF_CONFIGS["A"], "feed_forward_proj": "gated-gelu"}  # tie defaults to True
    with pytest.raises(ValueError, match="rescales decoder outputs"):
        hf_mapping.config_from_hf_t5(old_tied)
    with pytest.raises(ValueError, match="d_ff"):
        hf_mapping.config_from_hf_t5({"feed_forward_proj": "gated-gelu",
                                      "tie_word_embeddings": False, "vocab_size": 8,
                                      "d_model": 8, "d_kv": 4, "num_layers": 1, "num_heads": 2})


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("t5_1_1")])
def test_presets_match_hf_t5_v1_1(preset):
    """Each preset, built as an HF model on the meta device (no memory), maps to the same config
    and has our parameter count (HF ties lm_head, so it counts V*D less)."""
    ours = PRESETS[preset]
    hf_config = T5Config(vocab_size=ours.vocab_size, d_model=ours.emb_dim, d_kv=ours.head_dim,
                         d_ff=ours.mlp_dim, num_layers=ours.num_encoder_layers,
                         num_heads=ours.num_heads, feed_forward_proj="gated-gelu",
                         tie_word_embeddings=False, dropout_rate=0.0)
    assert hf_mapping.config_from_hf_t5(hf_config) == ours
    with torch.device("meta"):
        model = T5ForConditionalGeneration(hf_config)
    hf_count = sum(p.numel() for p in model.parameters())
    if model.lm_head.weight is model.shared.weight:
        hf_count += ours.vocab_size * ours.emb_dim
    table_count = sum(int(np.prod(row[3])) for row in hf_mapping.parameter_table(ours))
    assert hf_count == table_count


# ---- params mapping -----------------------------------------------------------------------------


def _state(name):
    return {k: v.numpy().copy() for k, v in _hf_model(name).state_dict().items()}


def test_params_from_hf_t5_layouts():
    state = _state("B")
    config = hf_mapping.config_from_hf_t5(_hf_model("B").config)
    params = hf_mapping.params_from_hf_t5(state, config)
    q = state["decoder.block.1.layer.1.EncDecAttention.q.weight"]  # [N*H, D]
    np.testing.assert_array_equal(
        params["decoder"]["layers_1"]["encoder_decoder_attention"]["query"]["kernel"], q.T)
    rel = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert rel.shape == (32, 3)
    np.testing.assert_array_equal(params["encoder"]["relpos_bias"]["rel_embedding"], rel.T)
    np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                  state["lm_head.weight"].T)
    np.testing.assert_array_equal(params["token_embedder"]["embedding"], state["shared.weight"])
    np.testing.assert_array_equal(params["encoder"]["encoder_norm"]["scale"],
                                  state["encoder.final_layer_norm.weight"])
    # The tree is exactly the one our model creates.
    init = functools.partial(Transformer(config).init, enable_dropout=False)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    expected = jax.eval_shape(init, jax.random.PRNGKey(0), tokens, tokens, tokens)["params"]
    assert (jax.tree_util.tree_structure(params)
            == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, expected)))
    assert (jax.tree_util.tree_map(lambda x: x.shape, params)
            == jax.tree_util.tree_map(lambda x: x.shape, expected))


def test_round_trip_with_grouped_kv_heads():
    config = hf_mapping.config_from_hf_t5(_hf_config("A")).replace(num_kv_heads=2)
    r = np.random.default_rng(0)
    state = {name: r.normal(size=hf_mapping._hf_shape(row)).astype(np.float32)
             for row in hf_mapping.parameter_table(config) for name in [row[0]]}
    assert state["decoder.block.0.layer.1.EncDecAttention.k.weight"].shape == (16, 32)
    assert state["encoder.block.0.layer.0.SelfAttention.k.weight"].shape == (32, 32)
    params = hf_mapping.params_from_hf_t5(state, config)
    assert params["decoder"]["layers_0"]["self_attention"]["value"]["kernel"].shape == (32, 16)
    back = hf_mapping.params_to_hf_t5(params, config)
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_params_from_hf_t5_tied_checkpoint_and_torch_values():
    model = _hf_model("A")
    config = hf_mapping.config_from_hf_t5(model.config)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    params = hf_mapping.params_from_hf_t5(state, config)
    kernel = params["decoder"]["logits_dense"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, state["shared.weight"].float().numpy().T)


def test_params_from_hf_t5_errors_name_the_key():
    config = hf_mapping.config_from_hf_t5(_hf_model("A").config)
    state = _state("A")
    missing = dict(state)
    del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 .*decoder\.block\.1\.layer\.2\.DenseReluDense"):
        hf_mapping.params_from_hf_t5(missing, config)
    bad = dict(state)
    bad["encoder.block.0.layer.0.SelfAttention.k.weight"] = np.zeros((16, 32), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight "
                                         r"has shape \(16, 32\), expected \(32, 32\)"):
        hf_mapping.params_from_hf_t5(bad, config)
    with pytest.raises(ValueError, match=r"no place for: \['decoder\.block\.1\."):
        hf_mapping.params_from_hf_t5(state, config.replace(num_decoder_layers=1))
    params = hf_mapping.params_from_hf_t5(state, config)
    params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wo/kernel has shape \(3, 3\), "
                                         r"expected \(48, 32\)"):
        hf_mapping.params_to_hf_t5(params, config)
