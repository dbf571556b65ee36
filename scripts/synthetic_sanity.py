#!/usr/bin/env python
"""A tiny model trained for a few hundred steps beats the trivial baselines of the synthetic suite.

    python scripts/synthetic_sanity.py --workdir out/sanity [--tasks qa,translate] [--steps 300]

Trains one model per task with `gqa_t5x.train.train` under `--workdir/<task>` (deleted first),
decodes N validation examples greedily, and prints a Markdown table of the model's metric against
the trivial baselines (see `gqa_t5x.sanity`). Exits with status 1 if a model does not beat its
best trivial baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

from gqa_t5x.experiments import sanity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="one model dir per task is made here")
    parser.add_argument("--tasks", default="summarize,translate,qa,span_corruption")
    per_task = "default: per task, configs/sanity.toml"
    parser.add_argument("--steps", type=int, default=None, help=per_task)
    parser.add_argument("--batch_size", type=int, default=None, help=per_task)
    parser.add_argument("--learning_rate", type=float, default=None, help=per_task)
    parser.add_argument("--num_eval", type=int, default=100, help="validation examples scored")
    model = "default: configs/sanity.toml [model]"
    parser.add_argument("--emb_dim", type=int, default=None, help=model)
    parser.add_argument("--num_heads", type=int, default=None, help=model)
    parser.add_argument("--num_kv_heads", type=int, default=None, help="default: num_heads")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="encoder and decoder each; " + model)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    size = sanity.ModelSize.from_config(emb_dim=args.emb_dim, num_heads=args.num_heads,
                                        num_kv_heads=args.num_kv_heads,
                                        num_layers=args.num_layers)
    if args.emb_dim or args.num_heads:  # a new width keeps the shipped proportions
        size = dataclasses.replace(size, head_dim=size.emb_dim // size.num_heads,
                                   mlp_dim=2 * size.emb_dim)
    results = []
    for task in args.tasks.split(","):
        model_dir = os.path.join(args.workdir, task)
        shutil.rmtree(model_dir, ignore_errors=True)
        results.append(sanity.run_task(
            task, model_dir, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.learning_rate, size=size, num_eval=args.num_eval, seed=args.seed))
        print(sanity.sanity_table(results[-1:], args.num_eval), flush=True)
    print()
    print(sanity.sanity_table(results, args.num_eval))
    return 0 if all(r.beats_baseline for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
