"""What each stage of `reproduce`'s plan computes, through the library's own functions:
`train.train` (pretrain, uptrain, finetune), `conversion.convert_params` (convert),
`evaluate.TaskEvaluator` (evaluate) and `benchmark.time_decoding` (time).

Each function takes the stage and its `reproduce.Context` and returns a JSON result. Paths in a
result are relative to the stage folder, which is renamed when the stage completes.
"""

from __future__ import annotations

import gc
import os
import shutil
from typing import Any

import jax
import numpy as np

from gqa_t5x import checkpoints
from gqa_t5x.data import mixtures
from gqa_t5x.experiments import benchmark
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer
from gqa_t5x.training import evaluate, models, optim, partitioning, train, train_state


def _config(fields) -> TransformerConfig:
    return TransformerConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields.items()})


def _checkpoint(ctx, dep: str) -> str:
    return os.path.join(ctx.dep_dirs[dep], ctx.dep_results[dep]["checkpoint"])


def _train(stage, ctx, task: str, schedule, **kwargs) -> dict[str, Any]:
    """train.train in the stage folder on `task` with the stage's model, lengths, batch and
    seed; returns the checkpoint (relative), the step and the last train loss."""
    i = stage.inputs
    result = train.train(
        ctx.workdir, mixture_or_task_name=task, task_feature_lengths=i["lengths"],
        batch_size=i["batch_size"], model=models.build_model(_config(i["model"])),
        schedule=schedule, seed=i["seed"], keep_checkpoints=1, stream=ctx.stream, **kwargs)
    return {"checkpoint": os.path.relpath(result.checkpoint, ctx.workdir), "step": result.step,
            "train_loss": result.train_metrics.get("loss")}


def _every(steps: int, at_most: int = 100) -> dict[str, int]:
    return {"checkpoint_every": max(1, steps // 2), "log_every": max(1, min(at_most, steps // 4))}


def pretrain(stage, ctx) -> dict[str, Any]:
    i = stage.inputs
    return _train(stage, ctx, i["task"], optim.rsqrt_schedule(), train_steps=i["steps"],
                  shuffle_seed=i["seed"], **_every(i["steps"]))


def convert(stage, ctx) -> dict[str, Any]:
    from gqa_t5x.conversion import convert_params  # noqa: PLC0415

    i = stage.inputs
    (dep,) = stage.deps
    params, source, step = train_state.read_params(_checkpoint(ctx, dep))
    target = _config(i["target"])
    kwargs = {k: v for k, v in i.items() if k not in ("target", "method", "seed")}
    params = jax.tree_util.tree_map(np.asarray, params)
    converted = convert_params(params, source, target, method=i["method"], seed=i["seed"],
                               **kwargs)
    out = os.path.join(ctx.workdir, "converted")
    if os.path.exists(out):  # a killed earlier try: converting again is cheap
        shutil.rmtree(out)
    checkpoints.save_checkpoint(out, converted, target, step)
    return {"checkpoint": "converted", "step": int(step)}


def uptrain(stage, ctx) -> dict[str, Any]:
    i = stage.inputs
    (dep,) = stage.deps
    return _train(stage, ctx, i["task"], optim.rsqrt_schedule(), uptrain_fraction=i["alpha"],
                  initial_checkpoint_path=_checkpoint(ctx, dep), shuffle_seed=i["seed"] + 1,
                  checkpoint_every=1_000_000, log_every=10)


def finetune(stage, ctx) -> dict[str, Any]:
    i = stage.inputs
    (dep,) = stage.deps
    return _train(stage, ctx, i["mixture"], optim.constant_schedule(i["learning_rate"]),
                  train_steps=i["steps"], initial_checkpoint_path=_checkpoint(ctx, dep),
                  initial_step_mode="restart", shuffle_seed=i["seed"], **_every(i["steps"]))


def evaluate_stage(stage, ctx) -> dict[str, Any]:
    i = stage.inputs
    (dep,) = stage.deps
    mesh = partitioning.create_mesh(1)
    model, params, _ = evaluate.load_model(_checkpoint(ctx, dep), mesh)
    model = models.build_model(model.config.replace(dropout_rate=0.0))
    settings = evaluate.EvalSettings(mixture_or_task_name=i["mixture"],
                                     feature_lengths=i["lengths"], batch_size=i["batch_size"],
                                     num_examples=i["num_examples"])
    evaluator = evaluate.TaskEvaluator(model, mesh, settings)
    try:
        metrics = evaluator.evaluate(params)
    finally:
        evaluator.close()
    metrics.update(mixtures.table1_average(i["mixture"], metrics))
    print("   " + mixtures.table1_line(i["mixture"], metrics), file=ctx.stream, flush=True)
    return {"metrics": metrics}


def quality(stage, ctx) -> dict[str, Any]:
    from gqa_t5x.experiments.conversion_quality import conversion_quality  # noqa: PLC0415

    i = stage.inputs
    (dep,) = stage.deps
    params, source, _ = train_state.read_params(_checkpoint(ctx, dep))
    params = jax.tree_util.tree_map(np.asarray, params)
    results = conversion_quality(params, source, _config(i["target"]), i["task"],
                                 variants=i["variants"], seed=i["seed"],
                                 num_batches=i["num_batches"], batch_size=i["batch_size"],
                                 feature_lengths=i["lengths"])
    for name, m in results.items():
        print(f"   {name}: cross-entropy {m['cross_entropy']:.3f}, KL from source "
              f"{m['kl_from_source']:.4f}", file=ctx.stream, flush=True)
    return {"metrics": results}


def time_stage(stage, ctx) -> dict[str, Any]:
    i = stage.inputs
    fields = dict(i["model"])
    heads = fields["num_heads"]
    kv_list = benchmark.divisors(heads) if i["kv_heads"] == "all" else list(i["kv_heads"])
    settings = benchmark.BenchmarkSettings(input_length=i["input_length"],
                                           output_length=i["output_length"],
                                           batch_size=i["batch_size"], repeats=i["repeats"])
    tokens = benchmark.random_inputs(fields["vocab_size"], i["batch_size"], i["input_length"])
    rows = {}
    for kv in kv_list:
        module = Transformer(_config(dict(fields, num_kv_heads=kv)))
        params = benchmark.random_params(module)
        rows[str(kv)] = benchmark.time_decoding(module, params, tokens, settings)
        print(f"   kv heads {kv}: {rows[str(kv)]['sample_s'] * 1e3:.2f} ms per sample",
              file=ctx.stream, flush=True)
        del module, params
        jax.clear_caches()
        gc.collect()
    return {"num_heads": heads, "rows": rows}


RUNNERS = {"pretrain": pretrain, "convert": convert, "uptrain": uptrain, "finetune": finetune,
           "evaluate": evaluate_stage, "quality": quality, "time": time_stage}
