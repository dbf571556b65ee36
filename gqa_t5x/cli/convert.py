"""`gqa-convert`: convert an MHA (or GQA) checkpoint to GQA/MQA, streaming one array at a time.

    gqa-convert --input PATH --output PATH --num_kv_heads G
        [--method mean|first|random|aligned] [--grouping contiguous|similarity] [--seed N]
        [--grouped decoder_self,cross[,encoder_self]]
        [--input_format auto|gqa_t5x|t5x|hf] [--model_preset NAME | --config_json FILE]
        [--step N] [--force]
        [--evaluate_on TASK [--evaluate_methods mean,aligned,aligned/similarity,...]
         [--evaluate_batches N] [--evaluate_batch_size B] [--feature_lengths inputs=N,targets=M]]

The work is `gqa_t5x.conversion.convert_checkpoint`; `--evaluate_on` then reports, for each
conversion in `--evaluate_methods` (default: this one), the cross-entropy and the KL divergence
from the source model on the first batches of TASK's validation split
(`gqa_t5x.experiments.conversion_quality`; the source is held in memory for it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gqa_t5x.checkpoints import FORMATS
from gqa_t5x.checkpoints.t5x import read_json
from gqa_t5x.conversion.grouping import GROUPINGS
from gqa_t5x.conversion.output import ConversionInterrupted
from gqa_t5x.conversion.pooling import METHODS
from gqa_t5x.conversion.streaming import convert_checkpoint
from gqa_t5x.model.config import ATTENTION_KINDS, PRESETS, TransformerConfig


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gqa-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="checkpoint folder to convert")
    p.add_argument("--input_format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--output", required=True, help="folder for the converted checkpoint")
    p.add_argument("--num_kv_heads", type=int, required=True,
                   help="kv heads of the grouped attentions (1 = MQA)")
    p.add_argument("--method", default="mean", choices=METHODS,
                   help="mean, first, random (the paper's) or aligned (heads rotated into a common "
                   "basis, then mean-pooled)")
    p.add_argument("--grouping", default="contiguous", choices=GROUPINGS,
                   help="which heads share a kv head: contiguous, or similarity (heads that "
                   "agree after alignment; --method aligned)")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--grouped", default=None,
                   help="attentions to group, comma-separated from " + ",".join(ATTENTION_KINDS)
                   + " (default: those the source groups; decoder_self,cross for MHA)")
    config = p.add_mutually_exclusive_group()
    config.add_argument("--model_preset", choices=sorted(PRESETS),
                        help="source config for a t5x checkpoint (default: inferred from shapes)")
    config.add_argument("--config_json", help="source TransformerConfig JSON for a t5x checkpoint")
    p.add_argument("--step", type=int, default=None,
                   help="training step of the output (default: the source's; Hugging Face "
                   "checkpoints record none: the public T5.1.1 ones are at 1000000)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output that an earlier conversion wrote (never a "
                   "folder with other files, the current folder or one holding the input)")
    evaluation = p.add_argument_group("measure what conversions keep (before uptraining)")
    evaluation.add_argument("--evaluate_on", metavar="TASK",
                            help="seqio task whose validation split to evaluate on")
    evaluation.add_argument("--evaluate_methods", default=None,
                            help="comma-separated conversions <method>[/<grouping>] to compare "
                            "(default: --method, with /--grouping unless contiguous)")
    evaluation.add_argument("--evaluate_batches", type=int, default=4)
    evaluation.add_argument("--evaluate_batch_size", type=int, default=8)
    evaluation.add_argument("--feature_lengths", default=None,
                            help="inputs=N,targets=M (default: the task's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    source_config = None
    try:
        if args.model_preset:
            source_config = PRESETS[args.model_preset]
        elif args.config_json:
            source_config = TransformerConfig.from_dict(read_json(args.config_json))
        grouped = None
        if args.grouped is not None:
            grouped = tuple(g.strip() for g in args.grouped.split(",") if g.strip())
        evaluation = _evaluation(args) if args.evaluate_on else None  # bad flags fail first
        summary = convert_checkpoint(
            args.input, args.output, args.num_kv_heads, method=args.method, seed=args.seed,
            grouped=grouped, input_format=args.input_format, source_config=source_config,
            force=args.force, grouping=args.grouping, progress=sys.stderr, step=args.step)
        for warning in summary.warnings:
            print(f"gqa-convert: warning: {warning}", file=sys.stderr)
        print(summary.format())
        if evaluation is not None:
            quality, variants, lengths = evaluation
            results = quality.checkpoint_conversion_quality(
                args.input, args.num_kv_heads, args.evaluate_on, variants=variants,
                grouped=grouped, input_format=args.input_format, source_config=source_config,
                seed=args.seed, num_batches=args.evaluate_batches,
                batch_size=args.evaluate_batch_size, feature_lengths=lengths)
            print(quality.format_quality(results, args.evaluate_on))
    except ConversionInterrupted as e:
        print(f"gqa-convert: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"gqa-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def _evaluation(args: argparse.Namespace):
    """(the quality module, variants, feature lengths) for --evaluate_on, checked."""
    # Imported only when asked: seqio and tensorflow take seconds to load.
    from gqa_t5x.experiments import conversion_quality as quality  # noqa: PLC0415

    variants = [v.strip() for v in (args.evaluate_methods or "").split(",") if v.strip()]
    variants = variants or [quality.variant_name(args.method, args.grouping)]
    for v in variants:
        quality.parse_variant(v)
    lengths = (quality.parse_feature_lengths(args.feature_lengths) if args.feature_lengths
               else quality.default_feature_lengths(args.evaluate_on))
    quality.get_mixture_or_task(args.evaluate_on)
    return quality, variants, lengths


if __name__ == "__main__":
    sys.exit(main())
