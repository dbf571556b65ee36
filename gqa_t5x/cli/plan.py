"""`gqa-plan`: per-device memory of the train, eval and decode steps, by compilation alone.

    gqa-plan --preset t5_1_1_xxl --num_kv_heads 8 --input_length 2048 --target_length 512
        --batch_size 128 --data 32 --model 8 [--dtype bfloat16] [--stages train,eval,decode]
        [--no_compile] [--output plan.json] [--force]

Compiles on data x model virtual CPU devices (nothing is allocated); the work is
`gqa_t5x.experiments.plan.memory_plan`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gqa-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="model preset (gqa_t5x.model.config)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings for --preset: MHA, GQA-8 and MQA at 2048/512 "
                   "(batch 128) and 512/114 (batch 2048) on --data x --model (default 32 x 8)")
    p.add_argument("--num_kv_heads", type=int, default=None, help="default: num_heads (MHA)")
    p.add_argument("--input_length", type=int, default=512)
    p.add_argument("--target_length", type=int, default=114)
    p.add_argument("--batch_size", type=int, default=8, help="global batch")
    p.add_argument("--data", type=int, default=None, help="mesh data axis (default 1)")
    p.add_argument("--model", type=int, default=None,
                   help="mesh model axis, model parallel (default 1)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--stages", default="train,eval,decode")
    p.add_argument("--no_compile", action="store_true",
                   help="analytic sizes only (abstract evaluation, seconds even at XXL scale)")
    p.add_argument("--output", help="also write the plan as JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.output and os.path.exists(args.output) and not args.force:
        print(f"gqa-plan: error: --output {args.output} exists; pass --force to replace it",
              file=sys.stderr)
        return 1
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if args.paper:
        from gqa_t5x.experiments.plan import PAPER_MESH  # noqa: PLC0415 - jax not started yet
        data, model = args.data or PAPER_MESH[0], args.model or PAPER_MESH[1]
    else:
        data, model = args.data or 1, args.model or 1
    # The virtual devices must be asked for before jax starts a backend.
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", data * model)
    from gqa_t5x.experiments import plan  # noqa: PLC0415

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    try:
        if args.paper:
            plans = plan.paper_plans(args.preset, data=data, model=model,
                                     compile=not args.no_compile, progress=progress,
                                     stages=stages)
        else:
            plans = [plan.memory_plan(
                args.preset, num_kv_heads=args.num_kv_heads, input_length=args.input_length,
                target_length=args.target_length, batch_size=args.batch_size, data=data,
                model=model, dtype=args.dtype, stages=stages, compile=not args.no_compile,
                progress=progress)]
    except ValueError as e:
        print(f"gqa-plan: error: {e}", file=sys.stderr)
        return 1
    print("\n\n".join(p.format() for p in plans))
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump([p.to_dict() for p in plans] if args.paper else plans[0].to_dict(), f,
                      indent=2)
        os.replace(tmp, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
