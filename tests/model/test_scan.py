"""Remat policies and scan over layers: same function as the plain network, t5x's layout kept."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import scan
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer
from gqa_t5x.training import partitioning

CFG = TransformerConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2)


def _batch():
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(1, 40, (2, 7)), jnp.int32).at[1, 5:].set(0)
    tgt = jnp.asarray(rng.integers(1, 40, (2, 5)), jnp.int32).at[0, 4:].set(0)
    dec = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], axis=1)
    return enc, dec, tgt


def _params(cfg=CFG):
    enc, dec, tgt = _batch()
    return Transformer(cfg).init(jax.random.PRNGKey(1), enc, dec, tgt,
                                 enable_dropout=False)["params"]


def _loss(cfg):
    enc, dec, tgt = _batch()

    def loss(params):
        logits = Transformer(cfg).apply({"params": params}, enc, dec, tgt, enable_dropout=False)
        logp = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0] * (tgt > 0))

    return loss


def test_stack_and_unstack_by_hand():
    a0, a1 = np.arange(6.0).reshape(2, 3), np.arange(6.0, 12.0).reshape(2, 3)
    tree = {"token_embedder": {"embedding": np.ones((4, 2))},
            "encoder": {"layers_1": {"mlp": {"wo": a1}}, "layers_0": {"mlp": {"wo": a0}},
                        "encoder_norm": {"scale": np.ones(3)}}}
    stacked = scan.stack_layers(tree)
    assert sorted(stacked["encoder"]) == ["encoder_norm", "layers"]
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["mlp"]["wo"],
                                  [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]])
    assert stacked["token_embedder"] is tree["token_embedder"]
    back = scan.unstack_layers(stacked)
    assert sorted(back["encoder"]) == ["encoder_norm", "layers_0", "layers_1"]
    np.testing.assert_array_equal(back["encoder"]["layers_1"]["mlp"]["wo"], a1)


def test_stack_refuses_a_gap_in_the_layers():
    with pytest.raises(ValueError, match=r"decoder has layers \[0, 2\]"):
        scan.stack_layers({"decoder": {"layers_0": {"w": np.ones(2)},
                                       "layers_2": {"w": np.ones(2)}}})


def test_scanned_params_are_the_stacked_unscanned_ones():
    """The scanned model's own parameter tree has exactly the stacked layout, with a leading
    `layers` logical axis that the partitioning rules map."""
    enc, dec, tgt = _batch()
    variables = jax.eval_shape(lambda: Transformer(CFG.replace(scan_layers=True)).init(
        jax.random.PRNGKey(1), enc, dec, tgt, enable_dropout=False))
    want = jax.tree_util.tree_map(jnp.shape, scan.stack_layers(_params()))
    assert jax.tree_util.tree_map(jnp.shape, variables["params"]) == want
    axes = variables["params_axes"]["decoder"]["layers"]["self_attention"]["key"]["kernel_axes"]
    assert axes.names == ("layers", "embed", "kv_joined")
    mesh = partitioning.create_mesh(1)
    specs = partitioning.param_specs(variables["params"], variables["params_axes"], mesh)
    assert specs[("encoder", "layers", "mlp", "wi_0", "kernel")] == jax.sharding.PartitionSpec(
        None, None, "model")


def test_scanned_logits_and_gradients_equal_the_unscanned_network():
    params = _params()
    loss, grads = jax.jit(jax.value_and_grad(_loss(CFG)))(params)
    scanned = CFG.replace(scan_layers=True)
    s_loss, s_grads = jax.jit(jax.value_and_grad(_loss(scanned)))(scan.stack_layers(params))
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    want = jax.tree_util.tree_leaves_with_path(scan.stack_layers(grads))
    got = dict(jax.tree_util.tree_leaves_with_path(s_grads))
    assert len(want) == len(got)
    for path, g in want:
        np.testing.assert_allclose(got[path], g, rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_give_the_same_loss_and_gradients(scan_layers):
    params = _params()
    if scan_layers:
        params = scan.stack_layers(params)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        _loss(CFG.replace(scan_layers=scan_layers))))(params)
    for policy in ("full", "save_projections"):
        cfg = CFG.replace(scan_layers=scan_layers, remat=policy)
        loss, grads = jax.jit(jax.value_and_grad(_loss(cfg)))(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                       atol=1e-6), grads, ref_grads)


def test_remat_policies_keep_fewer_activations(capsys):
    """What the backward pass keeps: everything > the projections' outputs > layer inputs."""
    params = _params()
    kept = {}
    for policy in ("none", "save_projections", "full"):
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(_loss(CFG.replace(remat=policy)), params)
        shapes = re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.MULTILINE)
        kept[policy] = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)
    assert kept["none"] > kept["save_projections"] > kept["full"], kept


def test_decoding_a_scanned_model_is_refused_with_the_way_out():
    from gqa_t5x.model import decoding  # noqa: PLC0415

    enc, _, _ = _batch()
    params = scan.stack_layers(_params())
    with pytest.raises(ValueError, match=r"scan_layers=True.*scan_layers=False"):
        decoding.generate(Transformer(CFG.replace(scan_layers=True)), params, enc,
                          max_decode_length=4)


def test_remat_name_is_checked():
    with pytest.raises(ValueError, match="remat='some'"):
        CFG.replace(remat="some")
