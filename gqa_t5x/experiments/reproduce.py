"""`gqa-reproduce`: the paper's experiment grid as cached, resumable stages, and its report.

A grid (`configs/reproduce_<scale>.toml`) becomes a plan: a list of stages in dependency order,

    pretrain  small and big MHA models on the grid's pretraining task (the paper's public
              checkpoints; at CPU scale span corruption mixed with the three tasks)
    convert   big -> MQA / GQA-G by each method (conversion.convert_params)
    quality   what each conversion keeps before uptraining: cross-entropy and KL from the big
              model on the pretraining task (experiments.conversion_quality; the alpha = 0
              column)
    uptrain   each conversion for alpha x the pretraining steps (none at alpha = 0)
    finetune  every model on the fine-tuning mixture, once per seed
    evaluate  every fine-tuned model on each task of the mixture (metric, held-out loss)
    time      time per sample of every shape, and against the number of kv groups (Figure 6)

Each stage's key is a hash of its own inputs and of the keys of the stages it reads, so changing
an input redoes exactly the stages that depend on it. A stage runs in `<out>/stages/<name>.partial`
(training resumes there from its last checkpoint after a kill) and becomes `<out>/stages/<name>`
with its `stage.json` by one rename: a stage is either complete or absent. `run_plan` skips
complete stages, prints "stage k/n", each training run's own progress, and an ETA for the grid
from the seconds per unit of work measured so far; `report.write_report` turns the results into
results.json, REPORT.md and the figures.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from gqa_t5x.experiments import configs
from gqa_t5x.progress import format_duration

STAGE_FILE = "stage.json"
# Bump a kind's version when what its stage computes changes, so that cached outputs are redone.
STAGE_VERSIONS = {"pretrain": 1, "convert": 1, "uptrain": 1, "finetune": 1, "evaluate": 1,
                  "quality": 1, "time": 1}
# Grid method names -> convert_params arguments.
METHOD_ARGS = {"aligned_similarity": {"method": "aligned", "grouping": "similarity"}}
# Grid method names -> conversion_quality's variant names.
QUALITY_VARIANT = {"aligned_similarity": "aligned/similarity"}


def g_methods(grid: Mapping) -> list[str]:
    """The grid's conversion methods in the order the report lists them."""
    g = grid["grid"]
    return list(dict.fromkeys([*g["ablation_methods"], *g.get("aligned_methods", [])]))


# ---- the grid -----------------------------------------------------------------------------------


def _merge(base: dict, override: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_grid(scale: str = "cpu", *, quick: bool = False, full: bool = False,
              seeds: int | None = None, path: str | None = None) -> dict[str, Any]:
    """The grid of `configs/reproduce_<scale>.toml` (or the TOML file `path`; one with a `base`
    key, such as "reproduce_cpu", is merged over that grid of configs/), with its `[quick]` or
    `[full]` table merged in and `seeds` replacing `finetune.seeds`."""
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    if path is not None:
        import tomllib  # noqa: PLC0415

        with open(path, "rb") as f:
            grid = tomllib.load(f)
        if "base" in grid:  # a grid written as changes to one of configs/
            grid = _merge(configs.load(grid.pop("base")), grid)
    else:
        grid = configs.load(f"reproduce_{scale}")
    variants = {k: grid.pop(k, {}) for k in ("quick", "full")}
    if quick or full:
        grid = _merge(grid, variants["quick" if quick else "full"])
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds {seeds}: need at least 1")
        grid["finetune"]["seeds"] = int(seeds)
    grid["variant"] = "quick" if quick else "full" if full else grid.pop("name", "default")
    return grid


# ---- stages -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One unit of the plan. `inputs` (JSON) and the keys of `deps` determine its output."""

    kind: str
    name: str
    inputs: dict[str, Any]
    deps: tuple[str, ...] = ()
    key: str = ""
    cost: float = 1.0  # relative work, for the ETA

    @property
    def folder(self) -> str:
        return f"{self.name.replace('/', '-')}-{self.key}"


def stage_key(kind: str, inputs: Mapping[str, Any], dep_keys: tuple[str, ...]) -> str:
    """12 hex digits of sha256 over the stage kind and version, its inputs and its deps' keys."""
    blob = json.dumps({"kind": kind, "version": STAGE_VERSIONS[kind], "inputs": inputs,
                       "deps": list(dep_keys)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class _Plan:
    def __init__(self):
        self.stages: dict[str, Stage] = {}

    def add(self, kind: str, name: str, inputs: dict, deps: tuple[str, ...] = (),
            cost: float = 1.0) -> str:
        key = stage_key(kind, inputs, tuple(self.stages[d].key for d in deps))
        self.stages[name] = Stage(kind, name, inputs, deps, key, cost)
        return name


def model_fields(grid: Mapping, size: str, num_kv_heads: int | None = None,
                 dropout_rate: float = 0.0) -> dict[str, Any]:
    """TransformerConfig fields of model `size` ("small", "big") with `num_kv_heads` (None: MHA):
    the grid's shape, the suite's vocabulary and T5's 32 position buckets up to distance 128."""
    fields = dict(grid["models"][size])
    fields.update(vocab_size=grid["vocab_size"], relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, dropout_rate=dropout_rate,
                  num_kv_heads=num_kv_heads or fields["num_heads"])
    return fields


def _train_cost(fields, steps, batch, lengths) -> float:
    width = fields["emb_dim"] * fields["mlp_dim"] * (fields["num_encoder_layers"]
                                                     + fields["num_decoder_layers"])
    return 20.0 + steps * batch * (lengths["inputs"] + lengths["targets"]) * width / 3e7


def cells(grid: Mapping, available_methods: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """(the grid's fine-tuned models, notes on cells left out). A cell: {"name", "size", "kv",
    "method", "alpha"} (method None for the MHA models)."""
    g = grid["grid"]
    n_big = grid["models"]["big"]["num_heads"]
    out = [{"name": "mha_small", "size": "small", "kv": None, "method": None, "alpha": None},
           {"name": "mha_big", "size": "big", "kv": None, "method": None, "alpha": None}]
    wanted = []
    for kv in (1, g["gqa_kv_heads"]):
        wanted += [(kv, "mean", a) for a in g["alphas"]]
        wanted += [(kv, "mean", g["table1_alpha"])]
        wanted += [(kv, m, a) for m in g.get("aligned_methods", []) for a in g["aligned_alphas"]]
    wanted += [(kv, m, a) for kv in g.get("ablation_kv_heads", [1]) for m in g["ablation_methods"]
               for a in g.get("ablation_alphas", [g["table1_alpha"]])]
    notes, seen = [], set()
    for kv, method, alpha in wanted:
        if (kv, method, alpha) in seen:
            continue
        seen.add((kv, method, alpha))
        base = METHOD_ARGS.get(method, {"method": method})["method"]
        if base not in available_methods:
            note = f"method {method!r} is not in conversion.METHODS {available_methods}: skipped"
            if note not in notes:
                notes.append(note)
            continue
        if kv == n_big:
            continue
        if kv == 1 and METHOD_ARGS.get(method, {}).get("grouping") == "similarity":
            note = (f"{method} at 1 kv head: one group holds every head, so similarity grouping "
                    f"is the contiguous grouping and mqa_{method} would repeat mqa_"
                    f"{METHOD_ARGS[method]['method']}: not run")
            if note not in notes:
                notes.append(note)
            continue
        label = "mqa" if kv == 1 else f"gqa{kv}"
        out.append({"name": f"{label}_{method}_a{alpha:g}", "size": "big", "kv": kv,
                    "method": method, "alpha": float(alpha)})
    return out, notes


def make_plan(grid: Mapping, available_methods: tuple[str, ...] | None = None
              ) -> tuple[list[Stage], list[dict], list[str]]:
    """(stages in dependency order, cells, notes). Pure: nothing runs."""
    if available_methods is None:
        from gqa_t5x.conversion import METHODS  # noqa: PLC0415

        available_methods = tuple(METHODS)
    plan = _Plan()
    pre, ft, ev = grid["pretrain"], grid["finetune"], grid["evaluate"]
    for size in ("small", "big"):
        fields = model_fields(grid, size)
        plan.add("pretrain", f"pretrain/{size}", {
            "model": fields, "task": pre["task"], "lengths": pre["lengths"],
            "batch_size": pre["batch_size"], "steps": pre["steps"], "seed": pre["seed"]},
            cost=_train_cost(fields, pre["steps"], pre["batch_size"], pre["lengths"]))
    the_cells, notes = cells(grid, available_methods)
    for cell in the_cells:
        start = f"pretrain/{cell['size']}"
        fields = model_fields(grid, cell["size"], cell["kv"])
        if cell["kv"] is not None:
            label = cell["name"].rsplit("_a", 1)[0]
            conv = f"convert/{label}"
            if conv not in plan.stages:
                plan.add("convert", conv, {"target": fields, **METHOD_ARGS.get(
                    cell["method"], {"method": cell["method"]}), "seed": 0}, (start,), cost=3)
            start = conv
            if cell["alpha"] > 0:
                steps = int(round(cell["alpha"] * pre["steps"]))
                start = plan.add("uptrain", f"uptrain/{cell['name']}", {
                    "model": fields, "task": pre["task"], "lengths": pre["lengths"],
                    "batch_size": pre["batch_size"], "alpha": cell["alpha"],
                    "seed": pre["seed"]}, (conv,),
                    cost=_train_cost(fields, steps, pre["batch_size"], pre["lengths"]))
        cell["stages"] = []
        for seed in range(ft["seeds"]):
            ft_fields = dict(fields, dropout_rate=ft["dropout_rate"])
            f = plan.add("finetune", f"finetune/{cell['name']}/s{seed}", {
                "model": ft_fields, "mixture": ft["mixture"], "lengths": ft["lengths"],
                "batch_size": ft["batch_size"], "steps": ft["steps"],
                "learning_rate": ft["learning_rate"], "seed": seed}, (start,),
                cost=_train_cost(fields, ft["steps"], ft["batch_size"], ft["lengths"]))
            e = plan.add("evaluate", f"evaluate/{cell['name']}/s{seed}", {
                "mixture": ft["mixture"], "lengths": ft["lengths"],
                "num_examples": ev["num_examples"], "batch_size": ev["batch_size"]}, (f,),
                cost=10 + ev["num_examples"] * ft["lengths"]["targets"] / 40)
            cell["stages"].append(e)
    ran = {c["method"] for c in the_cells}
    variants = [QUALITY_VARIANT.get(m, m) for m in g_methods(grid) if m in ran]
    gk = grid["grid"]["gqa_kv_heads"]
    for kv, label in ((1, "mqa"), (gk, f"gqa{gk}")):
        plan.add("quality", f"quality/{label}", {
            "target": model_fields(grid, "big", kv), "task": pre["task"],
            "lengths": pre["lengths"], "variants": variants, "num_batches": 4,
            "batch_size": 8, "seed": 0}, ("pretrain/big",), cost=15)
    t = grid["time"]
    shapes = {"small": model_fields(grid, "small"), "big": model_fields(grid, "big")}
    for size, fields in shapes.items():
        plan.add("time", f"time/{size}", {
            "model": fields, "batch_size": t["batch_size"], "input_length": t["input_length"],
            "output_length": t["output_length"], "repeats": t["repeats"],
            "kv_heads": "all" if size == "big" else [fields["num_heads"]]}, cost=30)
    if not t["config_b"].get("skip"):
        cb = configs.load("config_b")["model"]
        plan.add("time", "time/config_b", {
            "model": dict(cb), "repeats": t["repeats"], "kv_heads": "all", **t["config_b"]},
            cost=60)
    return list(plan.stages.values()), the_cells, notes


# ---- running ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a stage function gets: where it works, its deps' folders and results, a stream."""

    workdir: str
    dep_dirs: dict[str, str]
    dep_results: dict[str, dict]
    stream: Any


def stage_dir(out: str, stage: Stage) -> str:
    return os.path.join(out, "stages", stage.folder)


def read_result(out: str, stage: Stage) -> dict | None:
    path = os.path.join(stage_dir(out, stage), STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def pending(stages: list[Stage], out: str, redo_kinds: tuple[str, ...] = ()) -> list[Stage]:
    """The stages `run_plan` runs: those without a complete output, and those of `redo_kinds`."""
    return [s for s in stages if s.kind in redo_kinds or read_result(out, s) is None]


def run_plan(stages: list[Stage], out: str, runners: Mapping[str, Callable[[Stage, Context],
                                                                               dict]],
             *, stream=None, redo_kinds: tuple[str, ...] = ()) -> dict[str, dict]:
    """Runs every stage whose output is missing (and those of `redo_kinds`), in order; returns
    {stage name: result}. Progress: stage k/n, the stage's own lines, an ETA for the grid."""
    stream = stream or sys.stdout
    results: dict[str, dict] = {}
    by_name = {s.name: s for s in stages}
    todo = pending(stages, out, redo_kinds)
    total_cost = sum(s.cost for s in todo)
    done_cost, spent = 0.0, 0.0
    print(f"{len(stages)} stages, {len(stages) - len(todo)} already complete in {out}",
          file=stream, flush=True)
    k = 0
    for stage in stages:
        final = stage_dir(out, stage)
        if stage not in todo:
            results[stage.name] = read_result(out, stage)
            continue
        k += 1
        eta = ("" if not done_cost else
               f", grid ETA {format_duration((total_cost - done_cost) * spent / done_cost)}")
        print(f"\n== stage {k}/{len(todo)}: {stage.name} [{stage.key}]{eta}", file=stream,
              flush=True)
        partial = final + ".partial"
        os.makedirs(partial, exist_ok=True)
        ctx = Context(partial, {d: stage_dir(out, by_name[d]) for d in stage.deps},
                      {d: results[d] for d in stage.deps}, stream)
        start = time.time()
        result = dict(runners[stage.kind](stage, ctx))
        result.update(stage=stage.name, key=stage.key, seconds=time.time() - start,
                      inputs=stage.inputs)
        tmp = os.path.join(partial, STAGE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(partial, STAGE_FILE))
        if os.path.exists(final):  # a redone stage: the old output goes only now
            shutil.rmtree(final)
        os.replace(partial, final)
        results[stage.name] = result
        done_cost += stage.cost
        spent += result["seconds"]
        print(f"   {stage.name} done in {format_duration(result['seconds'])}", file=stream,
              flush=True)
    return results


# ---- the whole run ------------------------------------------------------------------------------

GRID_FILE = "grid.json"


def _check_out(out: str, force: bool) -> None:
    """`out` must be empty, absent, or a folder of this driver (then its stages are reused);
    --force clears it."""
    if not os.path.exists(out):
        return
    ours = os.path.exists(os.path.join(out, GRID_FILE)) or os.path.isdir(
        os.path.join(out, "stages"))
    if force:
        for name in ("stages", "results.json", "REPORT.md", GRID_FILE):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.listdir(out) and not ours:
        raise FileExistsError(f"--out {out} holds files that are not a gqa-reproduce run; choose "
                              "another folder or pass --force")


def reproduce(scale: str = "cpu", out: str = "reproduce_out", *, quick: bool = False,
              full: bool = False, seeds: int | None = None, dry_run: bool = False,
              force: bool = False, grid_path: str | None = None,
              redo: tuple[str, ...] = (), stream=None) -> str:
    """Runs (cpu) or writes (paper) the grid into `out`; returns the report's path.

    cpu: every missing stage runs (stages of the kinds in `redo` run again, e.g. ("time",) on a
    quiet machine), then results.json, REPORT.md and the figures are written to `out`.
    paper: `repro_paper.write_paper_plan`. `dry_run` prints the plan and runs nothing.
    """
    stream = stream or sys.stdout
    if scale not in ("cpu", "paper"):
        raise ValueError(f"--scale {scale!r}: expected 'cpu' or 'paper'")
    unknown = set(redo) - set(STAGE_VERSIONS)
    if unknown:
        raise ValueError(f"--redo {sorted(unknown)}: stage kinds are {sorted(STAGE_VERSIONS)}")
    grid = load_grid(scale, quick=quick, full=full, seeds=seeds, path=grid_path)
    if scale == "paper" or grid.get("scale") == "paper":
        from gqa_t5x.experiments import repro_paper  # noqa: PLC0415

        return repro_paper.write_paper_plan(grid, out, dry_run=dry_run, force=force,
                                            stream=stream)
    stages, the_cells, notes = make_plan(grid)
    if dry_run:
        for k, s in enumerate(stages, 1):
            state = "done" if read_result(out, s) else "to run"
            print(f"{k:3d}/{len(stages)} {s.name} [{s.key}] {state}", file=stream)
        for n in notes:
            print(f"note: {n}", file=stream)
        return ""
    _check_out(out, force)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, GRID_FILE), "w") as f:
        json.dump(grid, f, indent=1, sort_keys=True)
    import jax  # noqa: PLC0415

    # Compiled programs are reused across stages, reruns and output folders (same program,
    # same jax: the cache's key); beside the synthetic suite's vocabulary.
    from gqa_t5x.data import synthetic  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", os.path.join(synthetic.default_cache_dir(),
                                                                "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from gqa_t5x.experiments import repro_report, repro_stages  # noqa: PLC0415

    start = time.time()
    for n in notes:
        print(f"note: {n}", file=stream, flush=True)
    stages_run = len(pending(stages, out, redo))
    results = run_plan(stages, out, repro_stages.RUNNERS, stream=stream, redo_kinds=redo)
    repro_report.write_report(out, grid, the_cells, results, notes, time.time() - start,
                              stages_run=stages_run)
    path = os.path.join(out, "REPORT.md")
    print(f"\nreport: {path}", file=stream, flush=True)
    return path
