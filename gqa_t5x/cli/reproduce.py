"""Console script `gqa-reproduce`: the paper's experiments end to end, and a report of which
claims hold (`gqa_t5x.experiments.reproduce.reproduce`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gqa_t5x.cli import quiet


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(
        "Reproduce the GQA paper's grid: pretrain, convert, uptrain, fine-tune, evaluate, time; "
        "write results.json, REPORT.md and figures. Stages are cached: rerun to resume."))
    p.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                   help="cpu: run on the embedded synthetic suite; paper: write commands and "
                        "gin files for T5.1.1 on the real datasets (runs nothing)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny steps, one seed: checks the machinery (numbers mean nothing)")
    size.add_argument("--full", action="store_true", help="5 seeds, alpha 0.2, longer pretraining")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per cell")
    p.add_argument("--out", default="reproduce_out", help="output folder (reused to resume)")
    p.add_argument("--grid", default=None, help="a grid TOML file instead of configs/")
    p.add_argument("--redo", action="append", default=[],
                   help="run the stages of this kind again, e.g. --redo time (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (paper: the commands, and check the gin files parse)")
    p.add_argument("--force", action="store_true", help="discard what --out holds and start over")
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's, absl's and orbax's own log output")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.verbose and not args.dry_run:
        quiet.silence_libraries()  # before TensorFlow and jax are first imported
    from gqa_t5x.experiments import reproduce  # noqa: PLC0415 - fast --help

    try:
        reproduce.reproduce(args.scale, args.out, quick=args.quick, full=args.full,
                            seeds=args.seeds, dry_run=args.dry_run, force=args.force,
                            grid_path=args.grid, redo=tuple(args.redo))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"gqa-reproduce: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngqa-reproduce: interrupted; run the same command again to resume from "
              f"{args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
