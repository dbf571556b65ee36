"""Pre-training, uptraining and fine-tuning: `train(model_dir, ...)`, the function behind
`gqa-train`, configured with gin (see gin/runs/).

The run, top to bottom:
1. mesh (`data` x `model`) and model; the batch size must divide over `data`; each process
   feeds the rows of the model replicas its devices hold (`partitioning.data_layout`);
2. state: resume from the newest complete checkpoint in `model_dir` if there is one; else start
   from `initial_checkpoint_path` (a converted or earlier checkpoint: params only, fresh Adafactor
   state; the step continues from the checkpoint's, or restarts at 0 with
   `initial_step_mode="restart"`); else random initialization;
3. data: the seqio task's train split, shuffled with `shuffle_seed`, repeated, packed, batched;
   a resume restores the stream's position saved with the checkpoint (`data_stream.py`), so the
   order is that of an uninterrupted run, and refuses another task, batch size or shuffle seed;
4. loop: jitted train step; every `log_every` steps a progress line, metrics.jsonl and
   TensorBoard; every `eval.every_steps` the validation evaluation; every `checkpoint_every`
   steps, after each evaluation and at the end, a checkpoint.

A non-finite loss or gradient stops the run with `NonFiniteLossError` before anything is saved
from the bad step on, so the newest checkpoint is the last good one.

The step budget: `train_steps` is the final global step (as in t5x). With `uptrain_fraction`
instead, the run trains for `uptrain_fraction x` the initial checkpoint's step count.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5x.data.registry import get_mixture_or_task
from gqa_t5x.model import shapes
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.training import (
    data_stream,
    evaluate,
    models,
    optim,
    partitioning,
    run_log,
    train_state,
)
from gqa_t5x.training.train_state import TrainState

STEP_MODES = ("continue", "restart")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    model_dir: str
    step: int
    checkpoint: str | None
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]


# ---- data ---------------------------------------------------------------------------------------


def check_vocabulary(task, config: TransformerConfig) -> None:
    """The model must embed every id the task's vocabularies produce (JAX gathers clamp silently
    out-of-range ids, which would train on garbage)."""
    for name, feature in task.output_features.items():
        size = feature.vocabulary.vocab_size
        if size > config.vocab_size:
            raise ValueError(
                f"task {task.name!r} feature {name!r} has a vocabulary of {size} ids but the "
                f"model's vocab_size is {config.vocab_size}; set "
                f"gqa_t5x.models.model_config.vocab_size to at least {size}")


# The stream and its checkpoints live in data_stream.py; the name is kept for callers.
train_dataset = data_stream.train_batches


# ---- the step -----------------------------------------------------------------------------------


def train_step(model: models.EncoderDecoderModel, tx: optax.GradientTransformation,
               schedule: optim.Schedule, dropout_key, state: TrainState, batch):
    """One Adafactor update; returns (new state, metric sums of the batch).

    The learning rate is `schedule(state.step)`: the global step, which uptraining continues.
    Dropout masks depend on (dropout_key, step) only, so a resumed run draws the same masks.
    """
    rng = jax.random.fold_in(dropout_key, state.step) if model.config.dropout_rate > 0 else None
    (objective, sums), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        state.params, batch, rng)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = schedule(state.step)
    params = jax.tree_util.tree_map(lambda p, d: p + lr * d, state.params, direction)
    metrics = dict(sums, objective=objective, learning_rate=lr,
                   grad_norm=optax.global_norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(model: models.EncoderDecoderModel, tx: optax.GradientTransformation,
                   schedule: optim.Schedule, dropout_key, shardings, mesh):
    """`train_step` jitted with the state in `shardings` (donated: updated in place) and the batch
    split over `data`; metrics come back replicated."""
    return jax.jit(functools.partial(train_step, model, tx, schedule, dropout_key),
                   in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=0)


def _sum_metrics(records: list[dict[str, np.ndarray]]) -> dict[str, float]:
    sums = {k: float(np.sum([r[k] for r in records]))
            for k in ("cross_ent_sum", "z_loss_sum", "correct", "weight_sum", "num_examples")}
    out = models.summarize_metrics(sums)
    out["learning_rate"] = float(records[-1]["learning_rate"])
    out["grad_norm"] = float(np.mean([r["grad_norm"] for r in records]))
    return out


# ---- initial state ------------------------------------------------------------------------------


def _check_same_model(saved: TransformerConfig, current: TransformerConfig, where: str) -> None:
    a, b = saved.architecture().to_dict(), current.architecture().to_dict()
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"{where} holds a model with " + ", ".join(
            f"{k}={a[k]!r}" for k in diff) + " but this run's model has " + ", ".join(
            f"{k}={b[k]!r}" for k in diff) + "; use another MODEL_DIR or the matching model gin "
            "file")


def _initial_params(path: str, config: TransformerConfig, abstract_params):
    """(params as numpy, step) from an initial checkpoint, checked against the model."""
    params, saved_config, step = train_state.read_params(path)
    want = {partitioning.path_keys(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    got = shapes.tree_shapes(params)
    hint = ""
    if saved_config is not None and saved_config.num_kv_heads != config.num_kv_heads:
        hint = (f" (the checkpoint has num_kv_heads={saved_config.num_kv_heads}, the model "
                f"{config.num_kv_heads}: convert it first with gqa-convert)")
    try:
        shapes.check_shapes(got, want, f"initial checkpoint {path}")
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None
    return params, step


@dataclasses.dataclass(frozen=True)
class InitialCheckpoint:
    """Where a run without checkpoints of its own starts (see `train`'s arguments)."""

    path: str | None = None
    step_mode: str = "continue"
    step: int | None = None
    uptrain_fraction: float | None = None


def initial_state(model: models.EncoderDecoderModel, tx: optax.GradientTransformation, mesh,
                  manager, model_dir: str, input_shapes: Mapping[str, tuple[int, ...]],
                  seed: int, initial: InitialCheckpoint, log: run_log.RunLog):
    """(state, shardings, run info) of the run's start, in this order of precedence:

    1. the newest checkpoint in `model_dir` that restores (resume: state and run info as saved;
       newer unreadable ones are reported and moved aside);
    2. `initial.path`: its params, fresh optimizer state, its step (or 0 with "restart");
    3. random initialization from `seed`, step 0.

    The run info holds "examples_seen" (the data stream skips them), "start_step" and, when the
    budget is a fraction of the initial checkpoint's steps, "train_steps".
    """
    config = model.config
    if manager.latest_step() is not None:
        target, shardings = train_state.abstract_train_state(model, tx, mesh, input_shapes, seed)
        state, run_info, latest = train_state.restore_newest_readable(
            manager, model_dir, target,
            lambda saved, _: _check_same_model(saved, config, f"MODEL_DIR {model_dir}"),
            log.print)
        log.print(f"resuming from {train_state.step_dir(model_dir, latest)} "
                  f"({run_info['examples_seen']} examples seen)")
        return state, shardings, run_info

    run_info: dict[str, Any] = {"examples_seen": 0, "start_step": 0}
    params, start_step = None, 0
    if initial.path:
        abstract, _ = train_state.abstract_train_state(model, tx, mesh, input_shapes, seed)
        params, source_step = _initial_params(initial.path, config, abstract.params)
        if initial.step is not None:
            source_step = int(initial.step)
        if initial.uptrain_fraction is not None and source_step <= 0:
            raise ValueError(f"initial checkpoint {initial.path} records no step, so "
                             "uptrain_fraction has nothing to take a fraction of; set "
                             "initial_checkpoint_step (INITIAL_CHECKPOINT_STEP)")
        start_step = source_step if initial.step_mode == "continue" else 0
        run_info.update(initial_checkpoint=initial.path, source_step=source_step)
        if initial.uptrain_fraction is not None:
            run_info["train_steps"] = start_step + int(round(initial.uptrain_fraction *
                                                             source_step))
        log.print(f"starting from {initial.path} (step {source_step}), fresh optimizer state, "
                  f"step {start_step}")
    state, shardings = train_state.create_train_state(model, tx, mesh, input_shapes, seed, params)
    if start_step:
        state = state.replace(step=jax.device_put(jnp.asarray(start_step, jnp.int32),
                                                  shardings.step))
    run_info["start_step"] = start_step
    return state, shardings, run_info


# ---- logging, evaluation and saving inside the loop ---------------------------------------------


def _check_finite(pending, model_dir: str, last_saved: int | None) -> list[dict[str, np.ndarray]]:
    records = []
    for step, metrics in pending:
        m = jax.device_get(metrics)
        for name in ("objective", "grad_norm"):
            if not np.isfinite(m[name]):
                where = (train_state.step_dir(model_dir, last_saved) if last_saved is not None
                         else "none (no checkpoint was saved yet)")
                raise NonFiniteLossError(
                    f"step {step}: {name} is {float(m[name])}; training stopped. The last good "
                    f"checkpoint is {where}. Lower the learning rate, check the data, or resume "
                    "from that checkpoint with another seed")
        records.append(m)
    return records


class _Throughput:
    """Steps per second since the previous report; evaluation time is left out."""

    def __init__(self, step: int):
        self.time, self.step = time.time(), step

    def rate(self, step: int) -> float:
        now = time.time()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate

    def restart_clock(self) -> None:
        self.time = time.time()


def _report_train(log: run_log.RunLog, step: int, train_steps: int, records, rate: float,
                  tokens_per_step: int) -> dict[str, float]:
    metrics = _sum_metrics(records)
    metrics.update(steps_per_sec=rate, tokens_per_sec=rate * tokens_per_step)
    log.write(step, "train", metrics)
    log.print(run_log.progress_line(step, train_steps, metrics, rate, rate * tokens_per_step))
    return metrics


def _evaluate(evaluator: evaluate.TaskEvaluator, log: run_log.RunLog, params,
              step: int) -> dict[str, float]:
    metrics = evaluator.evaluate(params, step)
    log.write(step, "validation", metrics)
    log.print(f"step {step} validation: " + ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


def _best_metrics(eval_settings: evaluate.EvalSettings | None,
                  eval_metrics: dict[str, float] | None) -> dict[str, float] | None:
    """The metrics the manager ranks this checkpoint by (None: not ranked)."""
    if eval_metrics is None or not eval_settings.best_metric:
        return None
    if eval_settings.best_metric not in eval_metrics:
        raise ValueError(f"best_metric {eval_settings.best_metric!r} is not among the "
                         f"evaluation's metrics {sorted(eval_metrics)}")
    return eval_metrics


def _write_run_files(model_dir: str, config: TransformerConfig, step: int,
                     log: run_log.RunLog) -> None:
    """config.gin (the gin configuration, resolved) and model_config.json beside the
    checkpoints. A resumed run whose configuration differs keeps the recorded config.gin as
    config.before_step_<step>.gin and says which bindings changed."""
    if jax.process_index() != 0:
        return
    os.makedirs(model_dir, exist_ok=True)
    path, new = os.path.join(model_dir, "config.gin"), gin.config_str()
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != new:
            kept = os.path.join(model_dir, f"config.before_step_{step}.gin")
            os.replace(path, kept)
            changed = sorted({line[2:].split(" =")[0].strip() for line in
                              difflib.ndiff(old.splitlines(), new.splitlines())
                              if line[:2] in ("- ", "+ ") and " =" in line})
            log.print(f"config.gin: the gin configuration differs from the recorded one "
                      f"({', '.join(changed) or 'layout'}); the recorded one is kept as {kept}")
    with open(path, "w") as f:
        f.write(new)
    with open(os.path.join(model_dir, "model_config.json"), "w") as f:
        f.write(config.to_json())


# ---- the run ------------------------------------------------------------------------------------


def _check_budget(train_steps, uptrain_fraction, initial: InitialCheckpoint) -> None:
    if initial.step_mode not in STEP_MODES:
        raise ValueError(f"initial_step_mode={initial.step_mode!r} is not one of {STEP_MODES}")
    if (train_steps is None) == (uptrain_fraction is None):
        raise ValueError("set exactly one of train_steps (TRAIN_STEPS) and uptrain_fraction "
                         "(UPTRAIN_FRACTION)")
    if uptrain_fraction is not None and not initial.path:
        raise ValueError("uptrain_fraction (UPTRAIN_FRACTION) needs initial_checkpoint_path "
                         "(INITIAL_CHECKPOINT_PATH): the fraction is of its step count")


@gin.configurable(module="gqa_t5x.train")
def train(
    model_dir: str = gin.REQUIRED,
    *,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    train_steps: int | None = None,
    model: models.EncoderDecoderModel | None = None,
    schedule: optim.Schedule | None = None,
    optimizer: optax.GradientTransformation | None = None,
    initial_checkpoint_path: str | None = None,
    initial_step_mode: str = "continue",
    initial_checkpoint_step: int | None = None,
    uptrain_fraction: float | None = None,
    pack: bool = True,
    shuffle_seed: int = 0,
    seed: int = 0,
    model_parallel: int = 1,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    log_every: int = 100,
    eval_settings: evaluate.EvalSettings | None = None,
    use_cached: bool = False,
    stream=None,
) -> TrainResult:
    """Trains until global step `train_steps` (see the module docstring); returns where it went.

    Args:
      model_dir: checkpoints, metrics.jsonl, TensorBoard logs, config.gin.
      mixture_or_task_name, task_feature_lengths: the seqio train data and its lengths.
      batch_size: global batch (all processes), a multiple of the mesh's data axis.
      train_steps: final global step. Exclusive with `uptrain_fraction`.
      model: default `models.build_model()` (gin-configured).
      schedule: learning rate of the global step; default `optim.rsqrt_schedule()`.
      optimizer: default `optim.adafactor()` (a direction; the schedule scales it).
      initial_checkpoint_path: params to start from when `model_dir` has no checkpoint: a
        training checkpoint (`checkpoint_<step>` or a model dir) or a params checkpoint.
      initial_step_mode: "continue" the initial checkpoint's step (and schedule) or "restart"
        at step 0.
      initial_checkpoint_step: the initial checkpoint's step where it records none (Hugging Face
        checkpoints; public T5.1.1: 1_000_000); replaces the recorded one when given.
      uptrain_fraction: train for this fraction of the initial checkpoint's steps.
      pack: pack examples (t5x's pre-training default).
      shuffle_seed, seed: data order; parameter init and dropout.
      model_parallel: devices per model replica (the mesh's model axis).
      checkpoint_every, keep_checkpoints, log_every: in steps.
      eval_settings: periodic evaluation and best-checkpoint selection; None for none.
      stream: where progress lines go (default stdout).
    """
    initial = InitialCheckpoint(initial_checkpoint_path, initial_step_mode,
                                initial_checkpoint_step, uptrain_fraction)
    _check_budget(train_steps, uptrain_fraction, initial)
    model = model if model is not None else models.build_model()
    schedule = schedule if schedule is not None else optim.rsqrt_schedule()
    tx = optimizer if optimizer is not None else optim.adafactor()
    config = model.config
    check_vocabulary(get_mixture_or_task(mixture_or_task_name), config)
    lengths = dict(task_feature_lengths)

    # -- mesh, run log, checkpoint manager
    mesh = partitioning.create_mesh(model_parallel)
    layout = partitioning.data_layout(mesh, batch_size)
    log = run_log.RunLog(model_dir, stream)
    manager = train_state.checkpoint_manager(
        model_dir, keep=keep_checkpoints,
        best_metric=eval_settings.best_metric if eval_settings else None,
        best_mode=eval_settings.best_mode if eval_settings else "max")

    # -- state: resume, initial checkpoint or random init
    input_shapes = {"encoder_input_tokens": (1, lengths["inputs"]),
                    "decoder_input_tokens": (1, lengths["targets"])}
    state, shardings, run_info = initial_state(model, tx, mesh, manager, model_dir, input_shapes,
                                               seed, initial, log)
    if train_steps is None:
        train_steps = run_info.get("train_steps")
        if train_steps is None:
            raise ValueError(f"{model_dir}: uptrain_fraction given but the checkpoint records no "
                             "step budget; set train_steps")
    step = int(jax.device_get(state.step))
    if step > train_steps:
        raise ValueError(f"MODEL_DIR {model_dir} is at step {step}, past train_steps "
                         f"(TRAIN_STEPS) = {train_steps}: give TRAIN_STEPS of at least {step}, "
                         "or another MODEL_DIR")
    if dropped := log.drop_after(step):
        log.print(f"metrics.jsonl: removed {dropped} rows after step {step}, which this run "
                  "redoes")
    stream = dict(batch_size=batch_size, task=mixture_or_task_name, shuffle_seed=shuffle_seed)
    data_stream.check_same_stream(run_info, stream, model_dir)
    run_info.update(train_steps=train_steps, **stream)
    _write_run_files(model_dir, config, step, log)

    # -- data, step function, evaluator
    def stream_from(skip_examples):
        return train_dataset(mixture_or_task_name, lengths, layout.per_host_batch_size,
                             shuffle_seed=shuffle_seed, pack=pack, skip_examples=skip_examples,
                             shard_info=layout.shard_info(), use_cached=use_cached)

    batches = stream_from(0)
    warned_unsaveable = False
    if run_info["examples_seen"] and not batches.restore(model_dir, step):
        log.print(f"{data_stream.step_dir(model_dir, step)} holds no data stream state for this "
                  "process; regenerating the stream and skipping the "
                  f"{run_info['examples_seen']} examples seen")
        batches = stream_from(run_info["examples_seen"] // layout.num_shards)
    step_fn = jit_train_step(model, tx, schedule, jax.random.PRNGKey(seed + 1), shardings, mesh)
    evaluator = None
    if eval_settings is not None and eval_settings.every_steps:
        evaluator = evaluate.TaskEvaluator(
            model, mesh, eval_settings.with_defaults(mixture_or_task_name, lengths))
    tokens_per_step = batch_size * (lengths["inputs"] + lengths["targets"])

    # -- loop: step; every log_every a report; every eval.every_steps an evaluation; save
    pending: list[tuple[int, Any]] = []  # (step, metrics on device) not yet reported
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_saved = manager.latest_step()
    clock = _Throughput(step)
    act_rules = partitioning.rules_for(config, mesh)
    try:
        while step < train_steps:
            batch = partitioning.host_batch_to_global(next(batches), mesh, layout)
            with partitioning.activation_rules(mesh, act_rules):
                state, metrics = step_fn(state, batch)
            step += 1
            run_info["examples_seen"] += batch_size
            pending.append((step, metrics))
            is_last = step == train_steps
            do_eval = evaluator is not None and (step % eval_settings.every_steps == 0 or is_last)
            do_save = step % checkpoint_every == 0 or is_last or do_eval
            if step % log_every == 0 or do_save:
                records, pending = _check_finite(pending, model_dir, last_saved), []
                train_metrics = _report_train(log, step, train_steps, records, clock.rate(step),
                                              tokens_per_step)
            if do_eval:
                eval_metrics = _evaluate(evaluator, log, state.params, step)
                clock.restart_clock()
            if do_save:
                run_info["step"] = step
                # Before the state: a complete state has its data stream saved too.
                if not batches.save(model_dir, step) and not warned_unsaveable:
                    warned_unsaveable = True
                    log.print(f"the data stream of {mixture_or_task_name} cannot be saved "
                              "(tf.data refuses its stateful ops); a resume will regenerate it "
                              "and skip the examples seen")
                train_state.save(manager, state, run_info, config,
                                 _best_metrics(eval_settings, eval_metrics if do_eval else None))
                data_stream.prune(model_dir, set(manager.all_steps()) | {step})
                last_saved = step
    finally:
        manager.wait_until_finished()
        log.close()
        if evaluator is not None:
            evaluator.close()
    checkpoint = train_state.step_dir(model_dir, last_saved) if last_saved is not None else None
    log.print(f"done: step {step}, checkpoint {checkpoint}")
    return TrainResult(model_dir, step, checkpoint, train_metrics, eval_metrics)
