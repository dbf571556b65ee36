"""`gqa-bench`: flags -> `benchmark.run_benchmark`; prints the table and where results went.

Without --preset the model and the decode shape (batch, input length, steps) are config B,
`configs/config_b.toml`; width flags override either.
"""

from __future__ import annotations

import argparse
import sys

from gqa_t5x.experiments import benchmark, benchmark_report, configs
from gqa_t5x.model import kernel_choice
from gqa_t5x.model.config import KERNEL_CHOICES, PRESETS, TransformerConfig, get_config

CONFIG = "config_b"


def build_parser() -> argparse.ArgumentParser:
    decode = configs.load(CONFIG)["decode"]
    p = argparse.ArgumentParser(
        prog="gqa-bench", description=__doc__.splitlines()[0],
        epilog=f"Default model and decode shape: config B (configs/{CONFIG}.toml); results go "
        "to --output_dir (benchmark_results/): benchmark.json, the table and the figure.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model size preset instead of config B (default: config B)")
    for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_layers", "vocab_size"):
        p.add_argument(f"--{name}", type=int, help="override the preset's " + name)
    p.add_argument("--input_length", type=int, default=decode["input_length"],
                   help="encoder input tokens (default: config B's, %(default)s)")
    p.add_argument("--output_length", type=int, default=decode["decode_steps"],
                   help="greedy steps (exactly)")
    p.add_argument("--batch_size", type=int, default=decode["batch_size"],
                   help="sequences decoded together (default: config B's, %(default)s)")
    p.add_argument("--groups", help="comma-separated numbers of kv heads to time, e.g. 8,4,1 "
                   "(1 = MQA, the head count = MHA; default: every divisor of the heads)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and activation dtype")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="the config's kernels: 'xla' times XLA's ops alone, 'cpu' requires the "
                        "compiled CPU decode kernels, 'auto' (default) takes them where they apply")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    p.add_argument("--recompute_cross_kv", action="store_true",
                   help="also time re-projecting cross K/V every step (t5x/flaxformer)")
    p.add_argument("--num_beams", type=int, default=0, help="also time beam search (0: no)")
    p.add_argument("--compare_hf", action="store_true",
                   help="also time transformers' PyTorch T5 generate (MHA, greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--output_dir", default="benchmark_results",
                   help="folder for benchmark.json, the table and the figure (default: "
                   "%(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    return p


def config_from_args(args: argparse.Namespace) -> TransformerConfig:
    overrides = {}
    for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "vocab_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.num_layers is not None:
        overrides["num_encoder_layers"] = overrides["num_decoder_layers"] = args.num_layers
    overrides["dtype"] = args.dtype
    overrides["kernels"] = args.kernels
    if args.preset:
        config = get_config(args.preset)
    else:
        config = configs.model_config(CONFIG)
    heads = overrides.get("num_heads", config.num_heads)
    return config.replace(**overrides, num_kv_heads=heads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        kernel_choice.cpu_kernels(config.kernels)  # --kernels cpu: fail now, not after minutes
    except (ValueError, RuntimeError) as e:
        print(f"gqa-bench: {e}", file=sys.stderr)
        return 2
    settings = benchmark.BenchmarkSettings(
        input_length=args.input_length, output_length=args.output_length,
        batch_size=args.batch_size, groups=benchmark.parse_groups(args.groups),
        repeats=args.repeats, recompute_cross_kv=args.recompute_cross_kv,
        compare_hf=args.compare_hf, num_beams=args.num_beams, seed=args.seed)
    try:
        results = benchmark.run_benchmark(config, settings, args.output_dir, force=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"gqa-bench: {e}", file=sys.stderr)
        return 2
    print(benchmark_report.format_table(results))
    for path in results["paths"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
