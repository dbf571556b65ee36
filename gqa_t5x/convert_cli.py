"""`gqa-convert`: convert an MHA (or GQA) checkpoint to GQA/MQA, streaming one array at a time.

    gqa-convert --input PATH --output PATH --num_kv_heads G [--method mean|first|random]
        [--seed N] [--grouped decoder_self,cross[,encoder_self]]
        [--input_format auto|gqa_t5x|t5x|hf] [--model_preset NAME | --config_json FILE] [--force]

`convert_checkpoint` reads each array from the source (t5x legacy or orbax, Hugging Face T5.1.1,
or our own format), pools it if it is a grouped key/value kernel (convert.py) and writes it to
our checkpoint format (checkpoints.py) before reading the next, so memory holds about one array:
`--output` gets `config.json`, `conversion.json` (this summary) and `checkpoint_<step>/`, a t5x
legacy checkpoint at the source step that t5x restores as INITIAL_CHECKPOINT_PATH.
The output is written to a hidden sibling folder and renamed to `--output` at the end: a crash
leaves nothing at `--output`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence

from gqa_t5x.checkpoints import FORMATS, CheckpointWriter, open_checkpoint, step_dir
from gqa_t5x.config import ATTENTION_KINDS, PRESETS, TransformerConfig, with_kv_heads
from gqa_t5x.convert import (
    METHODS,
    check_conversion,
    check_shapes,
    convert_array,
    count_params,
    param_shapes,
)
from gqa_t5x.t5x_checkpoints import infer_config_from_shapes, read_json

CONVERSION_FILE = "conversion.json"


@dataclasses.dataclass
class ConversionSummary:
    input: str
    input_format: str
    output: str
    method: str
    seed: int
    source_config: TransformerConfig
    target_config: TransformerConfig
    step: int
    num_arrays: int
    largest_array_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["source_config"] = self.source_config.to_dict()
        d["target_config"] = self.target_config.to_dict()
        return d

    def format(self) -> str:
        src, tgt = self.source_config, self.target_config
        kv = ", ".join(f"{k} {src.kv_heads(k)} -> {tgt.kv_heads(k)}" for k in ATTENTION_KINDS)
        self_before, self_after = (c.decode_cache_bytes_per_token(0) for c in (src, tgt))
        cross_before, cross_after = (c.decode_cache_bytes_per_token(1)
                                     - c.decode_cache_bytes_per_token(0) for c in (src, tgt))
        lines = [
            f"converted {self.input} ({self.input_format}) -> {self.output}",
            f"  method {self.method}, seed {self.seed}; kv heads: {kv}",
            f"  parameters: {count_params(src):,} -> {count_params(tgt):,}",
            f"  decode KV cache bytes per generated token ({src.dtype}): "
            f"{self_before:,} -> {self_after:,}",
            f"  cross-attention KV cache bytes per input token: {cross_before:,} -> "
            f"{cross_after:,}",
            f"  {self.num_arrays} arrays, largest {_size(self.largest_array_bytes)}; "
            f"step {self.step}; {self.seconds:.1f} s",
            f"  t5x checkpoint (INITIAL_CHECKPOINT_PATH): {step_dir(self.output, self.step)}",
        ]
        return "\n".join(lines)


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def convert_checkpoint(input_path: str, output_path: str, num_kv_heads: int,
                       method: str = "mean", seed: int = 0,
                       grouped: Sequence[str] | None = None, input_format: str = "auto",
                       source_config: TransformerConfig | None = None,
                       force: bool = False) -> ConversionSummary:
    """Convert the checkpoint at `input_path` to `num_kv_heads` kv heads in the `grouped`
    attentions (default: those the source groups, decoder self and cross for MHA) and write our
    checkpoint format to `output_path`.

    `source_config` is needed only for t5x checkpoints whose shapes do not determine it
    (otherwise it is inferred; `relative_attention_max_distance` then stays 128).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    output_path = os.path.abspath(output_path)
    if os.path.exists(output_path) and not force:
        raise FileExistsError(f"output {output_path} already exists; pass --force to replace it")
    if os.path.abspath(input_path) == output_path:
        raise ValueError(f"output {output_path} is the input; write to another folder")

    reader = open_checkpoint(input_path, input_format, source_config)
    shapes = reader.shapes()
    source = reader.config or infer_config_from_shapes(shapes)
    check_shapes(shapes, param_shapes(source), where=f"checkpoint {input_path}")
    target = with_kv_heads(source, num_kv_heads, grouped)
    check_conversion(source, target)

    parent, name = os.path.split(output_path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    largest = 0
    try:
        writer = CheckpointWriter(tmp, target, step=reader.step)
        for path in shapes:
            array = reader.read(path)
            largest = max(largest, array.nbytes)
            writer.write(path, convert_array(path, array, source, target, method, seed))
            del array
        writer.close()
        summary = ConversionSummary(
            input=os.path.abspath(input_path), input_format=reader.format, output=output_path,
            method=method, seed=seed, source_config=source, target_config=target,
            step=reader.step, num_arrays=len(shapes), largest_array_bytes=largest,
            seconds=time.perf_counter() - start)
        with open(os.path.join(tmp, CONVERSION_FILE), "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
        _replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    summary.seconds = time.perf_counter() - start
    return summary


def _replace(tmp: str, output_path: str) -> None:
    """Move `tmp` to `output_path`, replacing what is there only once `tmp` is complete."""
    if not os.path.exists(output_path):
        os.rename(tmp, output_path)
        return
    old = f"{tmp}.old"
    os.rename(output_path, old)
    os.rename(tmp, output_path)
    shutil.rmtree(old)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gqa-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="checkpoint folder to convert")
    p.add_argument("--input_format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--output", required=True, help="folder for the converted checkpoint")
    p.add_argument("--num_kv_heads", type=int, required=True,
                   help="kv heads of the grouped attentions (1 = MQA)")
    p.add_argument("--method", default="mean", choices=METHODS)
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--grouped", default=None,
                   help="attentions to group, comma-separated from " + ",".join(ATTENTION_KINDS)
                   + " (default: those the source groups; decoder_self,cross for MHA)")
    config = p.add_mutually_exclusive_group()
    config.add_argument("--model_preset", choices=sorted(PRESETS),
                        help="source config for a t5x checkpoint (default: inferred from shapes)")
    config.add_argument("--config_json", help="source TransformerConfig JSON for a t5x checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
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
        summary = convert_checkpoint(
            args.input, args.output, args.num_kv_heads, method=args.method, seed=args.seed,
            grouped=grouped, input_format=args.input_format, source_config=source_config,
            force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"gqa-convert: error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
