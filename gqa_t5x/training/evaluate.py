"""Evaluation and inference: `evaluate` (`gqa-eval`) and `infer` (`gqa-infer`), and the
`TaskEvaluator` that training runs every N steps.

Evaluation follows the paper: greedy decoding (unless `decoder_params` says otherwise) on the
validation split, the task's seqio metric functions (ROUGE, BLEU, F1/EM) on the decoded text, plus
the teacher-forced per-token loss and accuracy of the split (the only metrics of a task without
metric functions, such as span corruption; `infer` decodes those too). Metrics are named
"<task>/<metric>", e.g. "synthetic_qa/f1", the names `best_metric` refers to. For a mixture each
of its tasks is evaluated.

Every process holds the whole evaluation set; a batch is split over the mesh's `data` axis and
the predictions come back to every process; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import gin
import jax
import numpy as np
import seqio

from gqa_t5x.data import mixtures
from gqa_t5x.data.registry import get_mixture_or_task
from gqa_t5x.model import shapes
from gqa_t5x.model.network import Transformer
from gqa_t5x.progress import Progress
from gqa_t5x.training import models, partitioning, run_log, train_state


@gin.configurable(module="gqa_t5x.evaluate")
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how.

    Attributes:
      mixture_or_task_name, feature_lengths: default to the training run's.
      split: seqio split ("validation": the dev set, as the paper).
      batch_size: global, a multiple of the mesh's data axis.
      num_examples: the first N examples of the split (None: all).
      every_steps: evaluate during training every N steps (0: never).
      best_metric, best_mode: keep the best checkpoint by this metric ("max" or "min").
      decoder_params: arguments of `decoding.generate` (default greedy).
      loss: also compute the teacher-forced loss and token accuracy.
    """

    mixture_or_task_name: str | None = None
    feature_lengths: Mapping[str, int] | None = None
    split: str = "validation"
    batch_size: int = 8
    num_examples: int | None = None
    every_steps: int = 0
    best_metric: str | None = None
    best_mode: str = "max"
    decoder_params: Mapping[str, Any] | None = None
    loss: bool = True

    def with_defaults(self, mixture_or_task_name: str, feature_lengths: Mapping[str, int]
                      ) -> EvalSettings:
        return dataclasses.replace(
            self, mixture_or_task_name=self.mixture_or_task_name or mixture_or_task_name,
            feature_lengths=dict(self.feature_lengths or feature_lengths))


def _pad_rows(features: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads every [n, ...] array with zero rows to [rows, ...] (zeros are padding tokens)."""
    out = {}
    for k, v in features.items():
        v = np.asarray(v)
        pad = np.zeros((rows - v.shape[0],) + v.shape[1:], v.dtype)
        out[k] = np.concatenate([v, pad]) if len(pad) else v
    return out


class TaskEvaluator:
    """seqio.Evaluator over one task or mixture, with jitted greedy prediction and scoring."""

    def __init__(self, model: models.EncoderDecoderModel, mesh, settings: EvalSettings):
        if settings.mixture_or_task_name is None or settings.feature_lengths is None:
            raise ValueError("EvalSettings needs mixture_or_task_name and feature_lengths")
        get_mixture_or_task(settings.mixture_or_task_name)
        if settings.batch_size % mesh.shape[partitioning.DATA]:
            raise ValueError(f"eval batch_size={settings.batch_size} is not divisible by the "
                             f"mesh's data axis ({mesh.shape[partitioning.DATA]}); choose a "
                             "multiple of it")
        self.model, self.mesh, self.settings = model, mesh, settings
        self.evaluator = seqio.Evaluator(
            settings.mixture_or_task_name,
            feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split=settings.split, use_cached=False,
            sequence_length=dict(settings.feature_lengths), num_examples=settings.num_examples,
            shuffle=False, logger_cls=())
        decoder_params = dict(settings.decoder_params or {})
        decoder_params.setdefault("max_decode_length", settings.feature_lengths["targets"])
        replicated = partitioning.replicated(mesh)
        self._predict = jax.jit(
            lambda params, batch: model.predict_batch_with_aux(params, batch, decoder_params),
            out_shardings=replicated)
        self._eval = jax.jit(lambda params, batch: model.eval_fn(params, batch)[1],
                             out_shardings=replicated)
        self._params = None
        self.progress: TextIO | None = None  # where decoding progress lines go (None: nowhere)
        # seqio's Evaluator drops tasks without metric functions (span corruption); they are
        # evaluated here by teacher-forced loss and token accuracy, and decoded by `predictions`.
        with_metrics = {t.name for t in self.evaluator.eval_tasks}
        self._unscored = {}
        for task in seqio.get_subtasks(get_mixture_or_task(settings.mixture_or_task_name)):
            if task.name in with_metrics or settings.split not in task.splits:
                continue
            task_ds = task.get_dataset(dict(settings.feature_lengths), split=settings.split,
                                       shuffle=False, num_epochs=1, use_cached=False)
            if settings.num_examples is not None:
                task_ds = task_ds.take(settings.num_examples)
            model_ds = seqio.EncDecFeatureConverter(pack=False)(
                task_ds, dict(settings.feature_lengths)).enumerate()
            self._unscored[task.name] = (task, task_ds, model_ds)

    def _tasks(self):
        """(task, its examples, their enumerated model features) of every evaluated task."""
        for task in self.evaluator.eval_tasks:
            yield (task, self.evaluator.cached_task_datasets[task.name],
                   self.evaluator.cached_model_datasets[task.name])
        yield from self._unscored.values()

    def _batches(self, ds, label: str | None = None):
        """(indices, padded features) of `batch_size` rows from an enumerated dataset; with a
        `label`, a progress line (batches done / total, ETA) goes to `self.progress`."""
        items = list(ds.as_numpy_iterator())
        bs = self.settings.batch_size
        report = Progress(label or "", -(-len(items) // bs), "batches",
                          self.progress if label else None)
        for done, start in enumerate(range(0, len(items), bs), 1):
            chunk = items[start:start + bs]
            indices = [int(i) for i, _ in chunk]
            keys = [k for k in chunk[0][1] if not k.endswith("_pretokenized")]
            feats = {k: np.stack([ex[k] for _, ex in chunk]) for k in keys}
            yield indices, partitioning.full_batch_to_global(_pad_rows(feats, bs), self.mesh)
            report.update(done)

    def _predict_fn(self, ds, model_feature_shapes=None):
        del model_feature_shapes
        return self._predict_with_aux_fn(ds)[0]

    def _score_fn(self, ds, model_feature_shapes=None):
        del model_feature_shapes
        score = jax.jit(lambda p, b: self.model.score_batch(p, b),
                        out_shardings=partitioning.replicated(self.mesh))
        out = []
        for indices, batch in self._batches(ds):
            scores = np.asarray(score(self._params, batch))
            out += [(i, float(scores[j])) for j, i in enumerate(indices)]
        return out

    def _loss(self, ds) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _, batch in self._batches(ds):
            sums = jax.device_get(self._eval(self._params, batch))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:
            return {}
        summary = models.summarize_metrics(totals)
        return {"loss": summary["loss"], "token_accuracy": summary["accuracy"]}

    def evaluate(self, params, step: int | None = None) -> dict[str, float]:
        """{"<task>/<metric>": value} for the params (a tree of global arrays)."""
        self._params = params
        try:
            future, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                                predict_fn=self._predict_fn,
                                                score_fn=self._score_fn,
                                                predict_with_aux_fn=self._predict_with_aux_fn)
            results = future.result() or {}
            flat = {}
            for task, task_metrics in results.items():
                for name, value in task_metrics.items():
                    value = getattr(value, "value", value)
                    if np.ndim(value) == 0:
                        flat[f"{task}/{name}"] = float(value)
            for task, _, model_ds in self._tasks():
                if self.settings.loss or task.name in self._unscored:
                    flat.update({f"{task.name}/{k}": v for k, v in self._loss(model_ds).items()})
            return flat
        finally:
            self._params = None

    def _predict_with_aux_fn(self, ds, model_feature_shapes=None):
        del model_feature_shapes
        pairs, scores = [], []
        for indices, batch in self._batches(ds, "decoding"):
            tokens, aux = self._predict(self._params, batch)
            tokens, s = np.asarray(tokens), np.asarray(aux["scores"])
            pairs += [(i, tokens[j].tolist()) for j, i in enumerate(indices)]
            scores += [float(s[j]) for j in range(len(indices))]
        return pairs, {"scores": scores}

    def predictions(self, params) -> list[dict[str, Any]]:
        """One record per example of every task: index, task, inputs, targets, prediction
        (decoded text) and score."""
        self._params = params
        records = []
        try:
            for task, task_ds, model_ds in self._tasks():
                pairs, aux = self._predict_with_aux_fn(model_ds)
                order = np.argsort([i for i, _ in pairs])
                vocabulary = task.output_features["targets"].vocabulary
                inputs_vocabulary = task.output_features["inputs"].vocabulary
                examples = list(task_ds.as_numpy_iterator())
                for rank in order:
                    index, tokens = pairs[rank]
                    ex = examples[index]
                    records.append({
                        "index": int(index), "task": task.name,
                        "inputs": _text(ex, "inputs", inputs_vocabulary),
                        "targets": _text(ex, "targets", vocabulary),
                        "prediction": _decode(vocabulary, tokens),
                        "score": aux["scores"][rank],
                    })
        finally:
            self._params = None
        return records

    def close(self) -> None:
        self.evaluator.close()


def _text(example: Mapping[str, Any], key: str, vocabulary) -> Any:
    """The example's text of `key`: its pretokenized string if seqio kept it, else its ids
    decoded (with EOS and padding dropped)."""
    value = example.get(f"{key}_pretokenized")
    if value is not None:
        value = value.item() if isinstance(value, np.ndarray) else value
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return _decode(vocabulary, np.asarray(example.get(key, [])).reshape(-1))


def _decode(vocabulary, ids) -> Any:
    """Text of token ids up to the first EOS, padding dropped (a list of ids for vocabularies
    without text, such as seqio's PassThroughVocabulary)."""
    ids = [int(i) for i in ids]
    if vocabulary.eos_id in ids:
        ids = ids[:ids.index(vocabulary.eos_id)]
    ids = [i for i in ids if i != vocabulary.pad_id]
    decoded = vocabulary.decode(ids)
    return decoded if isinstance(decoded, str) else [int(i) for i in decoded]


# ---- loading a checkpoint for evaluation --------------------------------------------------------


def load_model(checkpoint_path: str, mesh, model: models.EncoderDecoderModel | None = None):
    """(model, params sharded on `mesh`, step) from any checkpoint `train_state.read_params`
    reads. The checkpoint's saved config builds the model unless `model` is given (then the
    shapes must agree)."""
    params, config, step = train_state.read_params(checkpoint_path)
    if model is None:
        if config is None:
            raise ValueError(f"{checkpoint_path} holds no model config; pass a model (gin "
                             "models/*.gin and attention/*.gin)")
        model = models.EncoderDecoderModel(Transformer(config))
    abstract = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}))
    want = {partitioning.path_keys(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]}
    shapes.check_shapes(shapes.tree_shapes(params), want, f"checkpoint {checkpoint_path}")
    shardings = partitioning.state_shardings(abstract["params"], abstract["params"],
                                             abstract["params_axes"], mesh,
                                             partitioning.rules_for(model.config, mesh))
    return model, jax.device_put(params, shardings), step


def _resolve_checkpoint(model_dir: str | None, checkpoint_path: str | None) -> str:
    if checkpoint_path:
        return checkpoint_path
    if not model_dir:
        raise ValueError("give CHECKPOINT_PATH or MODEL_DIR")
    latest = train_state.latest_checkpoint_dir(model_dir)
    if latest is None:
        raise FileNotFoundError(f"MODEL_DIR {model_dir} holds no complete checkpoint_<step>/; "
                                "set CHECKPOINT_PATH")
    return latest


@gin.configurable(module="gqa_t5x.evaluate")
def evaluate(model_dir: str = gin.REQUIRED, *, settings: EvalSettings = gin.REQUIRED,
             checkpoint_path: str | None = None,
             model: models.EncoderDecoderModel | None = None,
             model_parallel: int = 1) -> dict[str, float]:
    """Evaluates a checkpoint (default: the newest in `model_dir`) and appends the metrics to
    `model_dir/metrics.jsonl` (split = settings.split) and TensorBoard. Returns the metrics;
    for one of Table 1's mixtures (`mixtures`) they include "<mixture>/average", the mean of
    its tasks' ROUGE-1 / BLEU / F1 as Table 1 computes it."""
    if settings.mixture_or_task_name is None or settings.feature_lengths is None:
        raise ValueError("evaluate: settings need mixture_or_task_name (MIXTURE_OR_TASK_NAME) "
                         "and feature_lengths (TASK_FEATURE_LENGTHS)")
    checkpoint_path = _resolve_checkpoint(model_dir, checkpoint_path)
    mesh = partitioning.create_mesh(model_parallel)
    model, params, step = load_model(checkpoint_path, mesh, model)
    evaluator = TaskEvaluator(model, mesh, settings)
    evaluator.progress = sys.stderr if jax.process_index() == 0 else None
    try:
        metrics = evaluator.evaluate(params, step)
    finally:
        evaluator.close()
    if not metrics:
        raise ValueError(f"{settings.mixture_or_task_name!r} gave no metrics: its split "
                         f"{settings.split!r} (EVAL_SPLIT) holds no examples")
    metrics.update(mixtures.table1_average(settings.mixture_or_task_name, metrics))
    log = run_log.RunLog(model_dir)
    log.write(step, settings.split, dict(metrics, checkpoint_step=step))
    log.print(f"{checkpoint_path} ({settings.split}): " + ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    log.close()
    return metrics


@gin.configurable(module="gqa_t5x.evaluate")
def infer(output_path: str = gin.REQUIRED, *, settings: EvalSettings = gin.REQUIRED,
          checkpoint_path: str | None = None, model_dir: str | None = None,
          model: models.EncoderDecoderModel | None = None,
          model_parallel: int = 1, force: bool = False) -> str:
    """Decodes the examples of `settings`' task and split and writes JSONL records
    {"index", "task", "inputs", "targets", "prediction", "score"} to `output_path`; an existing
    file is replaced only with `force` (FORCE=True)."""
    if os.path.exists(output_path) and not force:
        raise FileExistsError(f"infer: {output_path} exists (INFER_OUTPUT_PATH); set FORCE=True "
                              "to replace it")
    if settings.mixture_or_task_name is None or settings.feature_lengths is None:
        raise ValueError("infer: settings need mixture_or_task_name (MIXTURE_OR_TASK_NAME) "
                         "and feature_lengths (TASK_FEATURE_LENGTHS)")
    checkpoint_path = _resolve_checkpoint(model_dir, checkpoint_path)
    mesh = partitioning.create_mesh(model_parallel)
    model, params, _ = load_model(checkpoint_path, mesh, model)
    evaluator = TaskEvaluator(model, mesh, dataclasses.replace(settings, loss=False))
    evaluator.progress = sys.stderr if jax.process_index() == 0 else None
    try:
        records = evaluator.predictions(params)
    finally:
        evaluator.close()
    if jax.process_index() == 0:
        parent = os.path.dirname(os.path.abspath(output_path))
        os.makedirs(parent, exist_ok=True)
        tmp = output_path + ".tmp"
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
        print(f"wrote {len(records)} predictions to {output_path}", flush=True)
    return output_path
