"""Console scripts `gqa-train`, `gqa-eval` and `gqa-infer`, with t5x's flags.

  --gin_file=FILE          repeatable; relative paths are looked up in --gin_search_paths and in
                           this package's gin/ folder
  --gin_search_paths=A,B   comma-separated folders (repeatable)
  --gin.NAME=VALUE         a gin binding, e.g. --gin.MODEL_DIR="'/tmp/run'" or
                           --gin.TRAIN_STEPS=1000 (VALUE is a gin literal)
  --gin_bindings=BINDING   the same, in gin syntax ("MODEL_DIR='/tmp/run'"); repeatable
  --coordinator_address, --num_processes, --process_id   multi-host: jax.distributed
  --tfds_data_dir          TFDS data directory of the paper's tasks
  --verbose                TensorFlow / absl / orbax log output, and tracebacks of errors

Each main parses the flags and gin, checks the bindings (`gin_checks`), calls one library
function (`train.train`, `evaluate.evaluate`, `evaluate.infer`) and prints where the results
went. A mistake in the flags or bindings prints one line, `gqa-train: error: ...`, and exits 2;
`--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence

import gin

from gqa_t5x.cli import quiet

# The gin files shipped inside the package (gqa_t5x/gin/), wherever it is installed.
PACKAGE_GIN_DIR = str(importlib.resources.files("gqa_t5x") / "gin")


def parse_flags(argv: Sequence[str], description: str, prog: str | None = None,
                example: str = "") -> argparse.Namespace:
    """t5x-style flags -> Namespace(gin_file, gin_search_paths, gin_bindings, verbose, ...)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=gin_help(example),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable); the shipped ones are listed below")
    parser.add_argument("--gin_search_paths", action="append", default=[],
                        help="comma-separated folders searched for gin files")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding, NAME=VALUE (repeatable); --gin.NAME=VALUE is the "
                        "same")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0, for multi-host runs")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--tfds_data_dir", default=None,
                        help="TFDS data directory (sets $GQA_T5X_TFDS_DATA_DIR)")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow/absl/orbax log output and error tracebacks")
    args, rest = parser.parse_known_args(list(argv))
    unknown = []
    for arg in rest:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin."):].partition("=")
            if not sep:
                parser.error(f"{arg}: expected --gin.NAME=VALUE")
            args.gin_bindings.append(f"{name}={value}")
        else:
            unknown.append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.gin_file:
        parser.error("give at least one --gin_file (see --help for the shipped ones)")
    args.command_line_bindings = list(args.gin_bindings)
    return args


_MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(#.*)?$")
_INCLUDE_LINE = re.compile(r"^include\s+'([^']+)'")


def gin_help(example: str = "") -> str:
    """The --help text on gin: the shipped gin files, each run file's macros (required ones
    marked), the --gin.NAME=VALUE form and an example."""
    lines = ["gin files shipped with the package (give them relative to it, e.g. "
             "--gin_file=runs/pretrain.gin):"]
    for folder in ("models", "attention", "runs", "t5x"):
        path = os.path.join(PACKAGE_GIN_DIR, folder)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(".gin"))
            lines.append(textwrap.fill(", ".join(names), 96,
                                       initial_indent=f"  {folder + '/':11s} ",
                                       subsequent_indent=" " * 14))
    lines += ["", "macros of each run file (set with --gin.NAME=VALUE; * = required):"]
    runs = os.path.join(PACKAGE_GIN_DIR, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else ():
        if not name.endswith(".gin"):
            continue
        macros, includes = [], []
        with open(os.path.join(runs, name)) as f:
            for line in f:
                if m := _MACRO_LINE.match(line):
                    macros.append(m.group(1) + ("*" if "gin.REQUIRED" in m.group(2) else ""))
                elif m := _INCLUDE_LINE.match(line):
                    includes.append(m.group(1))
        more = f" (and those of {', '.join(includes)})" if includes else ""
        lines.append(f"  runs/{name}{more}:")
        lines.append(textwrap.fill(" ".join(macros), 96, initial_indent="    ",
                                   subsequent_indent="    "))
    lines += ["", "VALUE is a gin literal: numbers as they are (--gin.TRAIN_STEPS=1000), strings "
              "in quotes (--gin.MODEL_DIR=\"'/tmp/run'\"), None, True, {'inputs': 64}."]
    if example:
        lines += ["", "example:", " \\\n".join("  " + part for part in example.split(" --"))
                  .replace("\n  ", "\n    --")]
    return "\n".join(lines)


def parse_gin(files: Sequence[str], search_paths: Sequence[str] = (),
              bindings: Sequence[str] = ()) -> None:
    """Parses gin files (searched in `search_paths`, then the package's gin/ folder) and
    bindings; errors name the file that is missing."""
    folders = [p for group in search_paths for p in group.split(",") if p]
    if os.path.isdir(PACKAGE_GIN_DIR):
        folders.append(PACKAGE_GIN_DIR)
    for folder in folders:
        gin.add_config_file_search_path(folder)
    resolved = []
    for f in files:
        found = [p for p in [f] + [os.path.join(d, f) for d in folders] if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"gin file {f} not found in the current folder or in "
                                    f"--gin_search_paths {folders}")
        resolved.append(os.path.abspath(found[0]))
    # gin logs an error for every search folder that lacks an included file before it finds it
    # in the next one; those are not errors.
    quiet = _DropMessages("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _setup(args: argparse.Namespace) -> None:
    if args.tfds_data_dir:
        os.environ["GQA_T5X_TFDS_DATA_DIR"] = args.tfds_data_dir
    if not args.verbose:
        quiet.silence_libraries()  # before TensorFlow and jax are first imported
    from gqa_t5x.training import gin_checks, partitioning  # noqa: PLC0415 - after the environment

    partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    parse_gin(args.gin_file, args.gin_search_paths, args.gin_bindings)
    gin_checks.check_unused_macros(args.command_line_bindings)
    gin_checks.check_required_macros()
    gin_checks.check_value_types()


# Mistakes in flags, bindings, paths or data: one line and exit 2 (argparse's code for usage
# errors). Anything else is a bug or a fault of the machine and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, SyntaxError)


def _one_line(e: BaseException) -> str:
    """The error's message without gin's appended 'In call to configurable ...' lines, with
    the configurable named once; newlines joined."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    configurables = re.findall(r"In call to configurable '([^']+)'", text)
    text = re.split(r"\n\s*In call to configurable", text)[0]
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if configurables and configurables[-1] not in text:
        text += f" (in gin configurable {configurables[-1]})"
    return text or type(e).__name__


def _main(prog: str, description: str, example: str, argv: Sequence[str] | None,
          work: Callable[[], None]) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv, description, prog, example)
    try:
        _setup(args)
        work()
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the run stopped, not a usage error
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """gqa-train: `train.train()` configured by gin."""

    def work():
        from gqa_t5x.training import train  # noqa: PLC0415

        result = train.train()
        print(f"model dir: {result.model_dir}\nfinal checkpoint: {result.checkpoint}")

    return _main("gqa-train", "Pre-train, uptrain or fine-tune a T5.1.1 model with GQA "
                 "(gin-configured).", _TRAIN_EXAMPLE, argv, work)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """gqa-eval: `evaluate.evaluate()` configured by gin."""

    def work():
        from gqa_t5x.data import mixtures  # noqa: PLC0415
        from gqa_t5x.training import evaluate  # noqa: PLC0415

        metrics = evaluate.evaluate()
        for name, value in sorted(metrics.items()):
            print(f"{name}: {value:.4f}")
        for key in metrics:
            if key.endswith("/average"):  # one of Table 1's mixtures: its row
                print(mixtures.table1_line(key[:-len("/average")], metrics))

    return _main("gqa-eval", "Evaluate a checkpoint on a seqio task's validation split.",
                 _EVAL_EXAMPLE, argv, work)


def infer_main(argv: Sequence[str] | None = None) -> int:
    """gqa-infer: `evaluate.infer()` configured by gin; writes JSONL predictions."""

    def work():
        from gqa_t5x.training import evaluate  # noqa: PLC0415

        path = evaluate.infer()
        print(f"predictions: {path}")

    return _main("gqa-infer", "Decode a seqio task's split and write predictions as JSONL.",
                 _INFER_EXAMPLE, argv, work)


_TRAIN_EXAMPLE = ("gqa-train --gin_file=models/tiny.gin --gin_file=attention/mqa.gin "
                  "--gin_file=runs/pretrain.gin --gin.MODEL_DIR=\"'/tmp/run'\" "
                  "--gin.MIXTURE_OR_TASK_NAME=\"'synthetic_span_corruption'\" "
                  "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\" "
                  "--gin.gqa_t5x.models.model_config.vocab_size=2176 "
                  "--gin.TRAIN_STEPS=300 --gin.BATCH_SIZE=16 --gin.LOG_EVERY=50 "
                  "--gin.CHECKPOINT_EVERY=100")
_EVAL_EXAMPLE = ("gqa-eval --gin_file=runs/eval.gin --gin.MODEL_DIR=\"'/tmp/run'\" "
                 "--gin.MIXTURE_OR_TASK_NAME=\"'synthetic_span_corruption'\" "
                 "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\"")
_INFER_EXAMPLE = ("gqa-infer --gin_file=runs/infer.gin --gin.MODEL_DIR=\"'/tmp/run'\" "
                  "--gin.MIXTURE_OR_TASK_NAME=\"'synthetic_span_corruption'\" "
                  "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\" "
                  "--gin.INFER_OUTPUT_PATH=\"'/tmp/run/predictions.jsonl'\"")


if __name__ == "__main__":
    sys.exit(train_main())
