"""`gqa-reproduce --scale paper`: the grid written as commands and gin files, run by nothing here.

For every stage of the paper's grid (convert, uptrain, fine-tune per task and seed, evaluate,
time) this writes, under `<out>/paper/`, our runner's gin file (`<stage>.gin`, for `gqa-train` /
`gqa-eval`), t5x's (`<stage>.t5x.gin`, for `python -m t5x.train`), and `commands.sh`, the
commands in order. `check_gin_files` parses every gin file written: ours fully (gin resolves every
configurable and include), t5x's for syntax and for includes that resolve (t5x's own run files
only where t5x is installed).
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from gqa_t5x.data import mixtures
from gqa_t5x.experiments import reproduce
from gqa_t5x.model.config import get_config

PACKAGE_GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def _attention(kv: int | None) -> list[str]:
    if kv is None:
        return ["include 'attention/mha.gin'"]
    if kv == 1:
        return ["include 'attention/mqa.gin'"]
    return ["include 'attention/gqa8.gin'", f"NUM_KV_HEADS = {kv}"]


def _gin_value(v: Any) -> str:
    return repr(v) if not isinstance(v, bool) else str(v)


def plan_files(grid: Mapping, out: str) -> tuple[dict[str, str], list[str]]:
    """({relative path: gin text}, commands) for the paper's grid; paths under `out`."""
    from gqa_t5x.data.tasks import TASK_FEATURE_LENGTHS  # noqa: PLC0415

    ck, pre, ft = grid["checkpoints"], grid["pretrain"], grid["finetune"]
    mp = grid["run"]["model_parallel"]
    presets = {size: grid["models"][size]["preset"] for size in ("small", "big")}
    shaped = dict(grid, models={s: {"num_heads": get_config(p).num_heads}
                                for s, p in presets.items()})
    cells, notes = reproduce.cells(shaped, _methods())
    files: dict[str, str] = {}
    commands = [f"# gqa-reproduce --scale paper: {len(cells)} models; notes: {notes or 'none'}",
                "set -euo pipefail"]
    runs = os.path.join(out, "runs")
    gin_dir = "$(python -c 'import gqa_t5x, os; print(os.path.dirname(gqa_t5x.__file__))')/gin"

    def gin_file(name, lines):
        files[name] = "\n".join([f"# {name}: written by gqa-reproduce --scale paper"]
                                + lines) + "\n"
        return os.path.join(out, "paper", name)

    for cell in cells:
        preset, kv, name = presets[cell["size"]], cell["kv"], cell["name"]
        model = [f"include 'models/{preset}.gin'"] + _attention(kv)
        start, step = ck[cell["size"]], ck["step"]
        # t5x restores t5x checkpoints: the public one, a converted checkpoint_<step> (params
        # only: t5x/uptrain.gin's restore rules) or its own uptraining run's last step
        t5x_start, t5x_step, t5x_restore = start, step, []
        if kv is not None:
            label = name.rsplit("_a", 1)[0]
            converted = os.path.join(runs, "converted", label)
            if f"# convert {label}" not in commands:
                args = reproduce.METHOD_ARGS.get(cell["method"], {"method": cell["method"]})
                commands += [f"# convert {label}", shlex.join(
                    ["gqa-convert", "--input", ck["big"], "--output", converted,
                     "--num_kv_heads", str(kv), "--model_preset", preset]
                    + [x for k, v in args.items() for x in (f"--{k}", v)])]
            start = converted
            t5x_start = os.path.join(converted, f"checkpoint_{step}")
            t5x_restore = ["include 't5x/uptrain.gin'"]
            if cell["alpha"] > 0:
                up_dir = os.path.join(runs, "uptrain", name)
                ours = gin_file(f"uptrain/{name}.gin", model + [
                    "include 'runs/uptrain.gin'", f"MODEL_DIR = {up_dir!r}",
                    f"INITIAL_CHECKPOINT_PATH = {converted!r}",
                    f"INITIAL_CHECKPOINT_STEP = {step}", f"UPTRAIN_FRACTION = {cell['alpha']}",
                    f"MIXTURE_OR_TASK_NAME = {pre['task']!r}",
                    f"TASK_FEATURE_LENGTHS = {dict(pre['lengths'])!r}",
                    f"BATCH_SIZE = {pre['batch_size']}", f"MODEL_PARALLEL = {mp}"])
                theirs = gin_file(f"uptrain/{name}.t5x.gin", model + [
                    "include 't5x/model.gin'", "include 't5x/configs/runs/pretrain.gin'",
                    "include 't5x/uptrain.gin'", f"MODEL_DIR = {up_dir + '_t5x'!r}",
                    f"INITIAL_CHECKPOINT_PATH = {os.path.join(converted, f'checkpoint_{step}')!r}",
                    f"TRAIN_STEPS = {step + int(round(cell['alpha'] * step))}",
                    f"MIXTURE_OR_TASK_NAME = {pre['task']!r}",
                    f"TASK_FEATURE_LENGTHS = {dict(pre['lengths'])!r}",
                    f"BATCH_SIZE = {pre['batch_size']}"])
                commands += [f"# uptrain {name}", f"gqa-train --gin_file={ours}",
                             f"#   or: python -m t5x.train --gin_search_paths={gin_dir} "
                             f"--gin_file={theirs}"]
                start = up_dir
                t5x_step = step + int(round(cell["alpha"] * step))
                t5x_start = os.path.join(up_dir + "_t5x", f"checkpoint_{t5x_step}")
                t5x_restore = []
        for task in ft["tasks"]:
            lengths = TASK_FEATURE_LENGTHS[task]
            best = f"{task}/{mixtures.primary_metric(task)}"
            ft_dir = os.path.join(runs, "finetune", name, task)
            common = [f"MIXTURE_OR_TASK_NAME = {task!r}",
                      f"TASK_FEATURE_LENGTHS = {dict(lengths)!r}"]
            ours = gin_file(f"finetune/{name}/{task}.gin", model + [
                "include 'runs/finetune.gin'", f"MODEL_DIR = {ft_dir!r}",
                f"INITIAL_CHECKPOINT_PATH = {start!r}", *common,
                f"TRAIN_STEPS = {ft['steps']}", f"BATCH_SIZE = {ft['batch_size']}",
                f"LEARNING_RATE = {ft['learning_rate']}", f"DROPOUT_RATE = {ft['dropout_rate']}",
                f"EVAL_EVERY = {ft['eval_every']}", f"BEST_METRIC = {best!r}",
                f"MODEL_PARALLEL = {mp}"])
            evaluation = gin_file(f"evaluate/{name}/{task}.gin", [
                "include 'runs/eval.gin'", f"MODEL_DIR = {ft_dir!r}", *common,
                f"EVAL_BATCH_SIZE = {grid['evaluate']['batch_size']}", f"MODEL_PARALLEL = {mp}"])
            theirs = gin_file(f"finetune/{name}/{task}.t5x.gin", model + [
                "include 't5x/model.gin'", "include 't5x/configs/runs/finetune.gin'",
                *t5x_restore, f"MODEL_DIR = {ft_dir + '_t5x'!r}",
                f"INITIAL_CHECKPOINT_PATH = {t5x_start!r}", *common,
                f"TRAIN_STEPS = {t5x_step + ft['steps']}", f"BATCH_SIZE = {ft['batch_size']}",
                f"DROPOUT_RATE = {ft['dropout_rate']}"])
            for seed in range(ft["seeds"]):
                seed_dir = f"--gin.MODEL_DIR=\"'{ft_dir}/s{seed}'\""
                commands += [f"# fine-tune {name} on {task}, seed {seed}",
                             f"gqa-train --gin_file={ours} {seed_dir} --gin.SEED={seed} "
                             f"--gin.SHUFFLE_SEED={seed}",
                             f"gqa-eval --gin_file={evaluation} {seed_dir}",
                             f"#   or: python -m t5x.train --gin_search_paths={gin_dir} "
                             f"--gin_file={theirs} --gin.MODEL_DIR=\"'{ft_dir}_t5x/s{seed}'\""]
    t = grid["time"]
    for size, preset in presets.items():
        commands += [f"# time per sample, {preset} (Figure 6 for the big model)", shlex.join(
            ["gqa-bench", "--preset", preset, "--input_length", str(t["input_length"]),
             "--output_length", str(t["output_length"]), "--batch_size", str(t["batch_size"]),
             "--repeats", str(t["repeats"]), "--output_dir", os.path.join(runs, "time", size)])]
    return files, commands


def _methods() -> tuple[str, ...]:
    from gqa_t5x.conversion import METHODS  # noqa: PLC0415

    return tuple(METHODS)


def _search_paths() -> list[str]:
    paths = [PACKAGE_GIN]
    try:
        import t5x  # noqa: PLC0415

        paths.append(os.path.dirname(os.path.dirname(t5x.__file__)))
    except ImportError:
        pass
    return paths


def check_gin_files(paths: Sequence[str]) -> list[str]:
    """Parses every gin file: ours with gin itself (then clears gin's config), t5x's for syntax
    and includes. Returns notes on what could not be checked; raises on the first bad file."""
    import gin  # noqa: PLC0415
    from gin import config_parser  # noqa: PLC0415

    from gqa_t5x.cli.run import parse_gin  # noqa: PLC0415

    notes, search = set(), _search_paths()
    for path in paths:
        if path.endswith(".t5x.gin"):
            with open(path) as f:
                text = f.read()
            try:
                statements = list(config_parser.ConfigParser(text, _Delegate()))
            except SyntaxError as e:
                raise ValueError(f"{path}: gin syntax error: {e}") from None
            for st in statements:
                if isinstance(st, config_parser.IncludeStatement):
                    if not any(os.path.isfile(os.path.join(d, st.filename)) for d in search):
                        if st.filename.startswith("t5x/configs/"):
                            notes.add("t5x is not installed: its run files (t5x/configs/runs/"
                                      "*.gin) were not checked")
                            continue
                        raise ValueError(f"{path}: include {st.filename!r} is found in none of "
                                         f"{search}")
        else:
            gin.clear_config()
            try:
                parse_gin([path])
            except Exception as e:
                raise ValueError(f"{path} does not parse: {e}") from None
            finally:
                gin.clear_config()
    return sorted(notes)


class _Delegate:
    def configurable_reference(self, scoped_name, evaluate):
        return scoped_name

    def macro(self, name):
        return name


def write_paper_plan(grid: Mapping, out: str, *, dry_run: bool = False, force: bool = False,
                     stream=None) -> str:
    """Writes `<out>/paper/` (gin files, commands.sh) and checks every gin file parses; with
    `dry_run` writes to a temporary folder, prints the commands, checks and removes it."""
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    stream = stream or sys.stdout
    target = os.path.join(out, "paper")
    if os.path.exists(target) and not force and not dry_run:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    files, commands = plan_files(grid, os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix="paper.", dir=None if dry_run else out if
                           os.path.isdir(out) else None)
    try:
        written = []
        for name, text in files.items():
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
        with open(os.path.join(tmp, "commands.sh"), "w") as f:
            f.write("\n".join(commands) + "\n")
        notes = check_gin_files(written)
        print(f"{len(written)} gin files parse" + "".join(f"; {n}" for n in notes),
              file=stream, flush=True)
        if dry_run:
            print("\n".join(commands), file=stream, flush=True)
            return ""
        os.makedirs(out, exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
        print(f"wrote {target}/commands.sh and {len(written)} gin files (nothing was run)",
              file=stream, flush=True)
        return target
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
