"""Sanity check of the synthetic suite: a tiny model trained briefly beats trivial baselines.

For each task of `gqa_t5x.synthetic`, `run_task` trains a small encoder-decoder with the library's
`train.train` (no second training loop), then evaluates the final checkpoint with the library's
`evaluate.TaskEvaluator` (greedy decoding) on the first N validation examples, and scores the
suite's trivial strategies (`synthetic.baseline_predictions`) on the same examples with the same
metric functions:

| task            | model metric                           | trivial baselines                 |
| --------------- | -------------------------------------- | --------------------------------- |
| summarize       | ROUGE-1                                | copy, lead (and title_subject, a  |
|                 |                                        | heuristic that knows the format)  |
| translate       | BLEU                                   | copy                              |
| qa              | EM (and F1)                            | entity: the first fact's value    |
|                 |                                        | (and attribute, the answer by a   |
|                 |                                        | heuristic that knows the format)  |
| span_corruption | teacher-forced token accuracy and loss | unigram distribution of train     |
|                 |                                        | targets (its argmax, its entropy) |

`sanity_table` formats the results; `scripts/synthetic_sanity.py` is the command line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import seqio

from gqa_t5x.data import metrics
from gqa_t5x.data import synthetic as syn
from gqa_t5x.experiments import configs
from gqa_t5x.training import evaluate, models, optim, partitioning, train

CONFIG = "sanity"  # configs/sanity.toml: the model and each task's steps

# (metric key in the evaluator's output, trivial strategies, strategies that know the format)
_TASK_METRICS = {
    "summarize": ("rouge1", ("copy", "lead"), ("title_subject",)),
    "translate": ("bleu", ("copy",), ()),
    "qa": ("em", ("entity",), ("attribute",)),
    "span_corruption": ("token_accuracy", ("unigram",), ()),
}


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The tiny model of the check (T5.1.1 layout; `num_kv_heads` < `num_heads` is GQA); the
    shape of the shipped check is `configs/sanity.toml`'s [model] (`ModelSize.from_config()`)."""

    emb_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_layers: int
    num_kv_heads: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    @classmethod
    def from_config(cls, name: str = CONFIG, **overrides) -> ModelSize:
        """The [model] table of `configs/<name>.toml`, with `overrides` (None: keep)."""
        fields = dict(configs.load(name)["model"])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def build(self, vocab_size: int) -> models.EncoderDecoderModel:
        """The model for a vocabulary of `vocab_size` ids (rounded up to a multiple of 128)."""
        return models.build_model(models.model_config(
            "tiny", vocab_size=-(-vocab_size // 128) * 128, emb_dim=self.emb_dim,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.head_dim, mlp_dim=self.mlp_dim, num_encoder_layers=self.num_layers,
            num_decoder_layers=self.num_layers,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            dropout_rate=0.0))


def task_settings(task: str, name: str = CONFIG) -> dict[str, float]:
    """{"steps", "batch_size", "learning_rate"} of `task` in `configs/<name>.toml`."""
    tasks = configs.load(name)["tasks"]
    if task not in tasks:
        raise ValueError(f"configs/{name}.toml has no [tasks.{task}]; it has "
                         f"{', '.join(sorted(tasks))}")
    return dict(tasks[task])


@dataclasses.dataclass
class SanityResult:
    """One task's outcome. Metric values are in the metric's own units (x100 for ROUGE/BLEU/EM,
    a fraction for token accuracy)."""

    task: str
    steps: int
    train_seconds: float
    metric: str
    model: float
    baselines: dict[str, float]
    heuristics: dict[str, float]
    details: dict[str, float]

    @property
    def best_baseline(self) -> tuple[str, float]:
        return max(self.baselines.items(), key=lambda kv: kv[1])

    @property
    def beats_baseline(self) -> bool:
        return self.model > self.best_baseline[1]


# ---- baselines ----------------------------------------------------------------------------------


def _metric_fn(task: str):
    return {"summarize": metrics.rouge, "translate": metrics.bleu,
            "qa": metrics.trivia_qa}[task]


def text_baselines(task: str, num_examples: int, config: syn.SuiteConfig = syn.DEFAULT_CONFIG,
                   split: str = "validation") -> dict[str, float]:
    """{strategy: metric} of every baseline strategy of `task` (summarize, translate, qa) on the
    first `num_examples` examples of `split`."""
    metric, trivial, heuristic = _TASK_METRICS[task]
    examples = syn.generate_examples(task, split, num_examples, config=config)
    inputs = [ex["inputs"] for ex in examples]
    targets = [ex["answers"] if task == "qa" else ex["targets"] for ex in examples]
    return {s: _metric_fn(task)(targets, syn.baseline_predictions(task, inputs, s))[metric]
            for s in trivial + heuristic}


def unigram_baseline(task_name: str, feature_lengths: Mapping[str, int], *,
                     num_train: int = 2000, num_eval: int = 100) -> dict[str, float]:
    """The unigram model of the task's (preprocessed, truncated) train targets, scored on the
    first `num_eval` validation targets: token_accuracy of always predicting its most frequent
    id, and loss = cross-entropy in nats (add-one smoothing over the vocabulary)."""
    task = train.get_mixture_or_task(task_name)
    vocab_size = task.output_features["targets"].vocabulary.vocab_size

    def targets(split, n):
        ds = task.get_dataset(dict(feature_lengths), split=split, shuffle=False, seed=0,
                              use_cached=False).take(n)
        return [np.asarray(ex["targets"]) for ex in ds.as_numpy_iterator()]

    counts = collections.Counter()
    for t in targets("train", num_train):
        counts.update(t.tolist())
    total = sum(counts.values())
    top = counts.most_common(1)[0][0]
    val = np.concatenate(targets("validation", num_eval))
    log_p = [math.log((counts[int(i)] + 1) / (total + vocab_size)) for i in val]
    return {"token_accuracy": float(np.mean(val == top)), "loss": -float(np.mean(log_p))}


def teacher_forced_metrics(model: models.EncoderDecoderModel, params, task_name: str,
                           feature_lengths: Mapping[str, int], *, num_examples: int = 100,
                           batch_size: int = 50, mesh=None) -> dict[str, float]:
    """{"loss", "token_accuracy"} of `model` on the first `num_examples` validation examples of
    `task_name` (preprocessed like `unigram_baseline`'s, seed 0), per target token; "loss" is the
    cross-entropy in nats (no z-loss), comparable with `unigram_baseline`'s.

    For tasks without metric functions (span corruption), which `seqio.Evaluator` skips.
    """
    task = train.get_mixture_or_task(task_name)
    lengths = dict(feature_lengths)
    ds = task.get_dataset(lengths, split="validation", shuffle=False, seed=0,
                          use_cached=False).take(num_examples)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths).batch(batch_size)
    mesh = mesh or partitioning.create_mesh(1)
    eval_fn = jax.jit(lambda p, b: model.eval_fn(p, b)[1])
    totals: dict[str, float] = collections.Counter()
    for batch in ds.as_numpy_iterator():
        sums = jax.device_get(eval_fn(params, partitioning.full_batch_to_global(batch, mesh)))
        totals.update({k: float(v) for k, v in sums.items()})
    summary = models.summarize_metrics(totals)
    return {"loss": summary["cross_ent_loss"], "token_accuracy": summary["accuracy"]}


# ---- one task -----------------------------------------------------------------------------------


def _first_and_last_train_loss(model_dir: str) -> tuple[float, float]:
    losses = []
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "train" and "loss" in record:
                losses.append(record["loss"])
    return (losses[0], losses[-1]) if losses else (math.nan, math.nan)


def run_task(task: str, model_dir: str, *, steps: int | None = None,
             batch_size: int | None = None, learning_rate: float | None = None,
             size: ModelSize | None = None,
             num_eval: int = 100, eval_batch_size: int = 50,
             feature_lengths: Mapping[str, int] | None = None,
             config: syn.SuiteConfig = syn.DEFAULT_CONFIG, prefix: str = "synthetic",
             seed: int = 0, stream=None) -> SanityResult:
    """Trains a `size` model on task `task` ("qa", ...) for `steps` steps in `model_dir` (which
    should be empty: an existing checkpoint is resumed), evaluates it and scores the baselines.

    Args:
      steps, batch_size, learning_rate: default the task's in `configs/sanity.toml`; the
        learning rate is constant (Adafactor direction scale).
      size: default `ModelSize.from_config()`.
      num_eval: validation examples decoded (greedy) and scored.
      feature_lengths: default `synthetic.SYNTHETIC_FEATURE_LENGTHS`.
      config, prefix: the suite; a config other than the default is registered as
        `{prefix}_<task>` tasks (prefix must then differ from "synthetic").
    """
    if task not in _TASK_METRICS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {tuple(_TASK_METRICS)}")
    if config != syn.DEFAULT_CONFIG:
        if prefix == "synthetic":
            raise ValueError("a non-default SuiteConfig needs its own task prefix, not "
                             "'synthetic'")
        syn.register_synthetic_tasks(config, prefix=prefix)
    defaults = task_settings(task)
    steps = steps or int(defaults["steps"])
    batch_size = batch_size or int(defaults["batch_size"])
    learning_rate = learning_rate or float(defaults["learning_rate"])
    size = size or ModelSize.from_config()
    name = f"{prefix}_{task}"
    lengths = dict(feature_lengths or syn.SYNTHETIC_FEATURE_LENGTHS[f"synthetic_{task}"])
    vocabulary = train.get_mixture_or_task(name).output_features["targets"].vocabulary
    model = size.build(vocabulary.vocab_size)

    start = time.time()
    result = train.train(
        model_dir, mixture_or_task_name=name, task_feature_lengths=lengths,
        batch_size=batch_size, train_steps=steps, model=model,
        schedule=optim.constant_schedule(learning_rate), seed=seed,
        checkpoint_every=steps, keep_checkpoints=1, log_every=max(1, min(50, steps // 4)),
        stream=stream)
    train_seconds = time.time() - start

    mesh = partitioning.create_mesh(1)
    model, params, _ = evaluate.load_model(result.checkpoint, mesh, model)
    settings = evaluate.EvalSettings(mixture_or_task_name=name, feature_lengths=lengths,
                                     batch_size=eval_batch_size, num_examples=num_eval)
    if task == "span_corruption":  # no metric functions: seqio.Evaluator would skip it
        scores = teacher_forced_metrics(model, params, name, lengths, num_examples=num_eval,
                                        batch_size=eval_batch_size, mesh=mesh)
    else:
        evaluator = evaluate.TaskEvaluator(model, mesh, settings)
        try:
            scores = {k.split("/", 1)[1]: v
                      for k, v in evaluator.evaluate(params, steps).items()}
        finally:
            evaluator.close()
    first, last = _first_and_last_train_loss(model_dir)
    details = dict(scores, first_train_loss=first, last_train_loss=last)

    metric, _, heuristic = _TASK_METRICS[task]
    heuristics: dict[str, float] = {}
    if task == "span_corruption":
        unigram = unigram_baseline(name, lengths, num_eval=num_eval)
        baselines = {"unigram": unigram["token_accuracy"]}
        details["unigram_loss"] = unigram["loss"]
    else:
        all_baselines = text_baselines(task, num_eval, config)
        baselines = {k: v for k, v in all_baselines.items() if k not in heuristic}
        heuristics = {k: v for k, v in all_baselines.items() if k in heuristic}
    return SanityResult(task=task, steps=steps, train_seconds=train_seconds, metric=metric,
                        model=scores[metric], baselines=baselines,
                        heuristics=heuristics,
                        details=details)


# ---- the table ----------------------------------------------------------------------------------


def sanity_table(results: Sequence[SanityResult], num_eval: int) -> str:
    """A Markdown table: task, steps, train time, model metric, best trivial baseline, and the
    rest (heuristics, losses)."""
    lines = [f"| task | steps | train time | metric (N={num_eval}, greedy) | model | "
             "trivial baseline | beats | notes |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- |"]
    for r in results:
        name, value = r.best_baseline
        notes = [f"{k} {v:.1f}" for k, v in r.heuristics.items()]
        d = r.details
        if r.task == "span_corruption":
            notes.append(f"loss {d['first_train_loss']:.2f} -> {d['last_train_loss']:.2f} "
                         f"(train), {d['loss']:.2f} (val) vs unigram {d['unigram_loss']:.2f}")
        elif r.task == "qa":
            notes.append(f"f1 {d['f1']:.1f}")
        lines.append(f"| {r.task} | {r.steps} | {r.train_seconds:.0f} s | {r.metric} | "
                     f"{r.model:.3g} | {name} {value:.3g} | "
                     f"{'yes' if r.beats_baseline else 'NO'} | {'; '.join(notes)} |")
    return "\n".join(lines)
