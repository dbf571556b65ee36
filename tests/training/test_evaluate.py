"""Evaluation and inference on a checkpoint; the end-to-end pretrain -> convert -> uptrain ->
fine-tune -> eval -> infer path through the console-script functions on the synthetic suite."""

import dataclasses
import functools
import json
import os

import gin
import jax
import numpy as np
import pytest
import seqio
import toy_tasks

from gqa_t5x import checkpoints
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.cli import run as run_cli
from gqa_t5x.conversion import pooling as convert
from gqa_t5x.model.config import get_config
from gqa_t5x.progress import Progress
from gqa_t5x.training import evaluate, models, optim, run_log, train, train_state

TASK = toy_tasks.register()
toy_tasks.enable_compilation_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("toy")
    config = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1,
                        num_decoder_layers=1)
    train.train(str(model_dir), mixture_or_task_name=TASK, task_feature_lengths=toy_tasks.LENGTHS,
                batch_size=8, train_steps=20, model=models.build_model(config),
                schedule=optim.constant_schedule(1e-2), checkpoint_every=20, log_every=20)
    return model_dir


def _validation_features():
    ds = seqio.get_dataset(TASK, toy_tasks.LENGTHS, seqio.EncDecFeatureConverter(pack=False),
                           dataset_split="validation", shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


def _until_eos(ids) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(1)] if 1 in ids else ids


def _greedy_predictions(module, params) -> list[list[int]]:
    """Greedy continuations of the validation examples up to EOS, grown one token at a time with
    full teacher-forced forwards (no decode cache, no `generate`)."""
    feats = _validation_features()
    enc = np.stack([ex["encoder_input_tokens"] for ex in feats])  # [B, S]
    length = toy_tasks.LENGTHS["targets"]
    dec = np.zeros((len(feats), length), np.int32)  # [B, T]; position 0 holds BOS (0)
    out = np.zeros_like(dec)
    for t in range(length):
        logits = module.apply({"params": params}, enc, dec, np.ones_like(dec),
                              enable_dropout=False)  # [B, T, V]
        out[:, t] = np.argmax(np.asarray(logits)[:, t], -1)
        if t + 1 < length:
            dec[:, t + 1] = out[:, t]
    return [_until_eos(o) for o in out]


def test_evaluate_writes_metrics_and_loss_matches_numpy(trained):
    metrics = evaluate.evaluate(str(trained), settings=evaluate.EvalSettings(
        mixture_or_task_name=TASK, feature_lengths=toy_tasks.LENGTHS, batch_size=4))
    record = [r for r in run_log.read_metrics(trained) if r["split"] == "validation"][-1]
    assert record["step"] == 20 and record["checkpoint_step"] == 20
    assert record[f"{TASK}/loss"] == pytest.approx(metrics[f"{TASK}/loss"])
    # Independent: per-token cross-entropy (+ z-loss) from the module's logits, in numpy.
    params, config, _ = train_state.read_train_checkpoint(str(trained / "checkpoint_20"))
    module = models.build_model(config).module
    hits = [p == _until_eos(ex["decoder_target_tokens"])
            for p, ex in zip(_greedy_predictions(module, params), _validation_features())]
    assert metrics[f"{TASK}/sequence_accuracy"] == pytest.approx(100.0 * np.mean(hits))
    loss, _ = _numpy_loss_and_token_accuracy(module, params)
    assert metrics[f"{TASK}/loss"] == pytest.approx(loss, rel=1e-4)


def _numpy_loss_and_token_accuracy(module, params, num_examples=None):
    """Per-token cross-entropy (+ z-loss) and argmax accuracy from the module's logits, in
    numpy, over the validation examples."""
    total, tokens, hits = 0.0, 0, 0
    for ex in _validation_features()[:num_examples]:
        logits = np.asarray(module.apply(
            {"params": params}, ex["encoder_input_tokens"][None], ex["decoder_input_tokens"][None],
            ex["decoder_target_tokens"][None], enable_dropout=False), np.float64)[0]
        log_z = np.log(np.exp(logits).sum(-1))
        for t, target in enumerate(ex["decoder_target_tokens"]):
            if ex["decoder_loss_weights"][t]:
                total += log_z[t] - logits[t, target] + 1e-4 * log_z[t] ** 2
                hits += int(np.argmax(logits[t]) == target)
                tokens += 1
    return total / tokens, hits / tokens


def test_task_without_metric_functions_gets_loss_token_accuracy_and_predictions(trained,
                                                                               tmp_path):
    # The toy task's data with no metric functions, as span corruption has none.
    name = toy_tasks.register("toy_reverse_no_metrics", metric_fns=())
    settings = evaluate.EvalSettings(mixture_or_task_name=name,
                                     feature_lengths=toy_tasks.LENGTHS, batch_size=4)
    metrics = evaluate.evaluate(str(trained), settings=settings)
    assert sorted(metrics) == [f"{name}/loss", f"{name}/token_accuracy"]
    params, config, _ = train_state.read_train_checkpoint(str(trained / "checkpoint_20"))
    module = models.build_model(config).module
    loss, accuracy = _numpy_loss_and_token_accuracy(module, params)
    assert metrics[f"{name}/loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics[f"{name}/token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    out = tmp_path / "preds.jsonl"
    evaluate.infer(str(out), checkpoint_path=str(trained / "checkpoint_20"),
                   settings=dataclasses.replace(settings, num_examples=6))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["prediction"] for r in records] == _greedy_predictions(module, params)[:6]


def test_infer_writes_one_record_per_example(trained, tmp_path):
    out = tmp_path / "preds.jsonl"
    evaluate.infer(str(out), checkpoint_path=str(trained / "checkpoint_20"),
                   settings=evaluate.EvalSettings(mixture_or_task_name=TASK,
                                                  feature_lengths=toy_tasks.LENGTHS,
                                                  batch_size=4, num_examples=6))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    feats = _validation_features()[:6]
    assert [r["index"] for r in records] == list(range(6))
    params, config, _ = train_state.read_train_checkpoint(str(trained / "checkpoint_20"))
    greedy = _greedy_predictions(models.build_model(config).module, params)
    for r, ex, want in zip(records, feats, greedy):
        want_inputs = [int(i) for i in ex["encoder_input_tokens"] if i > 1]
        assert r["inputs"] == want_inputs and r["task"] == TASK
        assert r["prediction"] == want and isinstance(r["score"], float)
    with pytest.raises(FileExistsError, match="preds.jsonl exists .*FORCE=True"):
        evaluate.infer(str(out), checkpoint_path=str(trained / "checkpoint_20"),
                       settings=evaluate.EvalSettings(mixture_or_task_name=TASK,
                                                      feature_lengths=toy_tasks.LENGTHS))


def test_eval_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        evaluate.evaluate(str(tmp_path), settings=evaluate.EvalSettings(
            mixture_or_task_name=TASK, feature_lengths=toy_tasks.LENGTHS))
    with pytest.raises(ValueError, match="unknown task or mixture 'nope'"):
        evaluate.evaluate(str(trained), settings=evaluate.EvalSettings(
            mixture_or_task_name="nope", feature_lengths=toy_tasks.LENGTHS))


# ---- end to end through the command-line functions ----------------------------------------------

LENGTHS = "{'inputs': 64, 'targets': 16}"
QA_LENGTHS = "{'inputs': 96, 'targets': 8}"
VOCAB = "gqa_t5x.models.model_config.vocab_size=2100"


def _cli(main, files, bindings):
    gin.clear_config()
    try:
        argv = [f"--gin_file={f}" for f in files] + [f"--gin.{b}" for b in bindings]
        assert main(argv) == 0
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_pretrain_convert_uptrain_finetune_eval_infer(tmp_path):
    pre, up, ft = tmp_path / "pretrain", tmp_path / "uptrain", tmp_path / "finetune"
    _cli(run_cli.train_main, ["models/tiny.gin", "attention/mha.gin", "runs/pretrain.gin"],
         [f"MODEL_DIR='{pre}'", "MIXTURE_OR_TASK_NAME='synthetic_span_corruption'",
          f"TASK_FEATURE_LENGTHS={LENGTHS}", "TRAIN_STEPS=300", "BATCH_SIZE=16",
          "WARMUP_STEPS=100", "LOG_EVERY=50", "CHECKPOINT_EVERY=300", VOCAB])
    losses = [r["loss"] for r in run_log.read_metrics(pre) if r["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert "TRAIN_STEPS = 300" in (pre / "config.gin").read_text()

    # Convert the run's newest checkpoint MHA -> MQA with gqa-convert; the step (300) and the
    # config travel with it, and the pooled params equal converting the restored params.
    assert convert_cli.main(["--input", str(pre), "--output", str(tmp_path / "mqa"),
                             "--num_kv_heads", "1", "--method", "mean"]) == 0
    params, config, step = train_state.read_train_checkpoint(str(pre / "checkpoint_300"))
    mqa = config.replace(num_kv_heads=1)
    pooled = convert.convert_params(jax.tree_util.tree_map(np.asarray, params), config, mqa,
                                    "mean", 0)
    written, written_config = checkpoints.load_checkpoint(str(tmp_path / "mqa"))
    assert written_config == mqa and step == 300
    jax.tree_util.tree_map(np.testing.assert_array_equal, written, pooled)

    _cli(run_cli.train_main, ["models/tiny.gin", "attention/mqa.gin", "runs/uptrain.gin"],
         [f"MODEL_DIR='{up}'", "MIXTURE_OR_TASK_NAME='synthetic_span_corruption'",
          f"TASK_FEATURE_LENGTHS={LENGTHS}", "BATCH_SIZE=16", "WARMUP_STEPS=100",
          f"INITIAL_CHECKPOINT_PATH='{tmp_path / 'mqa'}'",
          "UPTRAIN_FRACTION=0.1", "LOG_EVERY=10", VOCAB])
    up_records = [r for r in run_log.read_metrics(up) if r["split"] == "train"]
    assert up_records[-1]["step"] == 330  # 300 continued + 10% of 300
    assert up_records[-1]["learning_rate"] == pytest.approx(1 / np.sqrt(329), rel=1e-5)
    assert train_state.read_config(str(up / "checkpoint_330")).num_kv_heads == 1

    _cli(run_cli.train_main, ["models/tiny.gin", "attention/mqa.gin", "runs/finetune.gin"],
         [f"MODEL_DIR='{ft}'", f"INITIAL_CHECKPOINT_PATH='{up}'",
          "MIXTURE_OR_TASK_NAME='synthetic_qa'", f"TASK_FEATURE_LENGTHS={QA_LENGTHS}",
          "TRAIN_STEPS=40", "BATCH_SIZE=16", "EVAL_EVERY=20", "EVAL_BATCH_SIZE=16",
          "EVAL_NUM_EXAMPLES=32", "BEST_METRIC='synthetic_qa/f1'", "LOG_EVERY=20", VOCAB])
    evals = [r for r in run_log.read_metrics(ft) if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"synthetic_qa/f1", "synthetic_qa/loss"} <= set(evals[-1])

    _cli(run_cli.eval_main, ["runs/eval.gin"],
         [f"MODEL_DIR='{ft}'", "MIXTURE_OR_TASK_NAME='synthetic_qa'",
          f"TASK_FEATURE_LENGTHS={QA_LENGTHS}", "EVAL_BATCH_SIZE=16", "EVAL_NUM_EXAMPLES=32"])
    last = run_log.read_metrics(ft)[-1]
    assert last["split"] == "validation" and last["step"] == 40
    assert last["synthetic_qa/f1"] == pytest.approx(evals[-1]["synthetic_qa/f1"])

    out = tmp_path / "preds.jsonl"
    _cli(run_cli.infer_main, ["runs/infer.gin"],
         [f"CHECKPOINT_PATH='{ft / 'checkpoint_40'}'", "MIXTURE_OR_TASK_NAME='synthetic_qa'",
          f"TASK_FEATURE_LENGTHS={QA_LENGTHS}", "EVAL_BATCH_SIZE=16", "EVAL_NUM_EXAMPLES=8",
          f"INFER_OUTPUT_PATH='{out}'"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    assert all(r["inputs"].startswith("question: ") and isinstance(r["prediction"], str)
               for r in records)
    assert os.path.exists(ft / "config.gin")


def test_decoding_reports_batches_done(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "Progress", functools.partial(Progress, every=0.0))
    evaluate.infer(str(tmp_path / "preds.jsonl"), checkpoint_path=str(trained / "checkpoint_20"),
                   settings=evaluate.EvalSettings(mixture_or_task_name=TASK,
                                                  feature_lengths=toy_tasks.LENGTHS,
                                                  batch_size=4))
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("decoding:")]
    assert [line.split(",")[0] for line in lines] == [
        f"decoding: {i}/4 batches" for i in range(1, 5)]  # 16 validation examples
    assert lines[-1].endswith("ETA 0s")
