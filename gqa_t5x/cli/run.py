"""Console scripts `gqa-train`, `gqa-eval` and `gqa-infer`, with t5x's flags.

  --gin_file=FILE          repeatable; relative paths are looked up in --gin_search_paths and in
                           this package's gin/ folder
  --gin_search_paths=A,B   comma-separated folders (repeatable)
  --gin.NAME=VALUE         a gin binding, e.g. --gin.MODEL_DIR="'/tmp/run'" or
                           --gin.TRAIN_STEPS=1000 (VALUE is a gin literal)
  --gin_bindings=BINDING   the same, in gin syntax ("MODEL_DIR='/tmp/run'"); repeatable
  --coordinator_address, --num_processes, --process_id   multi-host: jax.distributed
  --tfds_data_dir          TFDS data directory of the paper's tasks

Each main parses the flags and gin, calls one library function (`train.train`,
`evaluate.evaluate`, `evaluate.infer`) and prints where the results went.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import os
import sys
from collections.abc import Sequence

import gin

# The gin files shipped inside the package (gqa_t5x/gin/), wherever it is installed.
PACKAGE_GIN_DIR = str(importlib.resources.files("gqa_t5x") / "gin")


def parse_flags(argv: Sequence[str], description: str) -> argparse.Namespace:
    """t5x-style flags -> Namespace(gin_file, gin_search_paths, gin_bindings, ...)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable)")
    parser.add_argument("--gin_search_paths", action="append", default=[],
                        help="comma-separated folders searched for gin files")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding, NAME=VALUE (repeatable)")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0, for multi-host runs")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--tfds_data_dir", default=None,
                        help="TFDS data directory (sets $GQA_T5X_TFDS_DATA_DIR)")
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
        parser.error("give at least one --gin_file")
    return args


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


def _setup(argv, description):
    args = parse_flags(sys.argv[1:] if argv is None else argv, description)
    if args.tfds_data_dir:
        os.environ["GQA_T5X_TFDS_DATA_DIR"] = args.tfds_data_dir
    from gqa_t5x.training import partitioning  # noqa: PLC0415 - after the environment is set

    partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    parse_gin(args.gin_file, args.gin_search_paths, args.gin_bindings)
    return args


def train_main(argv: Sequence[str] | None = None) -> int:
    """gqa-train: `train.train()` configured by gin."""
    _setup(argv, "Pre-train, uptrain or fine-tune a T5.1.1 model with GQA (gin-configured).")
    from gqa_t5x.training import train  # noqa: PLC0415

    result = train.train()
    print(f"model dir: {result.model_dir}\nfinal checkpoint: {result.checkpoint}")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """gqa-eval: `evaluate.evaluate()` configured by gin."""
    _setup(argv, "Evaluate a checkpoint on a seqio task's validation split.")
    from gqa_t5x.training import evaluate  # noqa: PLC0415

    metrics = evaluate.evaluate()
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.4f}")
    return 0


def infer_main(argv: Sequence[str] | None = None) -> int:
    """gqa-infer: `evaluate.infer()` configured by gin; writes JSONL predictions."""
    _setup(argv, "Decode a seqio task's split and write predictions as JSONL.")
    from gqa_t5x.training import evaluate  # noqa: PLC0415

    path = evaluate.infer()
    print(f"predictions: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
