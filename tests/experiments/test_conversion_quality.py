"""The measure of what a conversion keeps (experiments.conversion_quality) against numpy, and
`gqa-convert --evaluate_on`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_tasks

from gqa_t5x.checkpoints import save_checkpoint
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.conversion import convert_params
from gqa_t5x.experiments import conversion_quality as quality
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.network import Transformer

TASK = toy_tasks.register()
CONFIG = TransformerConfig(vocab_size=toy_tasks.VOCAB_SIZE, emb_dim=16, num_heads=4,
                           num_kv_heads=4, head_dim=4, mlp_dim=24, num_encoder_layers=1,
                           num_decoder_layers=1, relative_attention_num_buckets=8)
LENGTHS = toy_tasks.LENGTHS


def init_params(seed=0):
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = Transformer(CONFIG).init(jax.random.PRNGKey(seed), tokens, tokens, tokens,
                                         enable_dropout=False)
    return jax.tree_util.tree_map(np.asarray, variables["params"])


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_metrics(source_logits, logits, batch):
    """Per-token means over non-padding targets, written out in numpy."""
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"] > 0
    lp, lq = log_softmax(logits), log_softmax(source_logits)
    ce, kl, acc = [], [], []
    for b, t in zip(*np.nonzero(weights)):
        ce.append(-lp[b, t, targets[b, t]])
        kl.append(sum(np.exp(lq[b, t, v]) * (lq[b, t, v] - lp[b, t, v])
                      for v in range(logits.shape[-1])))
        acc.append(float(np.argmax(logits[b, t]) == targets[b, t]))
    return {"cross_entropy": np.mean(ce), "kl_from_source": np.mean(kl),
            "token_accuracy": np.mean(acc), "tokens": len(ce)}


def model_logits(params, config, batch):
    return np.asarray(Transformer(config).apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], enable_dropout=False))


def test_validation_batches_are_the_first_examples_in_order():
    batches = quality.validation_batches(TASK, LENGTHS, num_batches=2, batch_size=4)
    assert len(batches) == 2
    assert batches[0]["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])
    # toy_reverse: targets are the inputs reversed, then EOS (1)
    for row in range(4):
        inputs = batches[0]["encoder_input_tokens"][row]
        ids = inputs[:np.argmax(inputs == 1)]
        targets = batches[0]["decoder_target_tokens"][row]
        np.testing.assert_array_equal(targets[:len(ids) + 1], list(ids[::-1]) + [1])
    again = quality.validation_batches(TASK, LENGTHS, num_batches=2, batch_size=4)
    np.testing.assert_array_equal(again[1]["decoder_target_tokens"],
                                  batches[1]["decoder_target_tokens"])


@pytest.mark.slow
def test_quality_matches_numpy_on_the_task():
    params = init_params()
    target = with_kv_heads(CONFIG, 1)
    batches = quality.validation_batches(TASK, LENGTHS, num_batches=2, batch_size=4)
    results = quality.conversion_quality(params, CONFIG, target, batches=batches,
                                         variants=("mean", "aligned/similarity"))
    assert list(results) == ["source", "mean", "aligned/similarity"]
    assert results["source"]["kl_from_source"] == pytest.approx(0.0, abs=1e-6)
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    source_logits = model_logits(params, CONFIG, merged)
    for name, (method, grouping) in (("mean", ("mean", "contiguous")),
                                     ("aligned/similarity", ("aligned", "similarity"))):
        converted = convert_params(params, CONFIG, target, method, grouping=grouping)
        expected = numpy_metrics(source_logits, model_logits(converted, target, merged), merged)
        assert results[name]["tokens"] == expected["tokens"]
        for key in ("cross_entropy", "kl_from_source", "token_accuracy"):
            assert results[name][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert results["mean"]["kl_from_source"] > 1e-4


def test_bad_variants_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown conversion 'median'.*'aligned/similarity'"):
        quality.parse_variant("median")
    with pytest.raises(ValueError, match="needs method 'aligned', not 'mean'"):
        quality.parse_variant("mean/similarity")
    with pytest.raises(ValueError, match=r"has no default feature lengths.*--feature_lengths"):
        quality.default_feature_lengths(TASK)
    with pytest.raises(ValueError, match="name=length pairs"):
        quality.parse_feature_lengths("inputs:10")
    assert quality.parse_feature_lengths("inputs=10, targets=12") == {"inputs": 10,
                                                                     "targets": 12}


@pytest.mark.slow
def test_cli_evaluate_on_reports_every_method(tmp_path, capsys):
    save_checkpoint(str(tmp_path / "src"), init_params(1), CONFIG)
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "2", "--method", "aligned", "--evaluate_on", TASK,
                           "--evaluate_methods", "mean,aligned,aligned/similarity",
                           "--evaluate_batches", "1", "--evaluate_batch_size", "4",
                           "--feature_lengths", "inputs=10,targets=10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"what each conversion keeps on {TASK}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith("  ") and line.split()[0] in quality.VARIANTS + ("source",)}
    assert set(rows) == {"source", "mean", "aligned", "aligned/similarity"}
    assert float(rows["source"][1]) == 0.0
    # a bad method is refused before anything is converted
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "o2"),
                           "--num_kv_heads", "2", "--evaluate_on", TASK,
                           "--evaluate_methods", "mean,median"])
    assert rc == 1
    assert "unknown conversion 'median'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
