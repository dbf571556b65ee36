"""The streaming converter: an MHA (or GQA) checkpoint to GQA/MQA, one array at a time.

`convert_checkpoint` reads each array from the source (t5x legacy or orbax, Hugging Face T5.1.1,
or our own format), pools it if it is a grouped key/value kernel (pooling.py) and writes it to
our checkpoint format before reading the next, so memory holds about one array ("aligned" reads
the four kernels of one attention together, so memory holds about one layer's attention; with
"similarity" grouping a first pass reads the key and value kernels one at a time to choose the
groups): the output gets
`config.json`, `conversion.json` (this summary) and `checkpoint_<step>/`, a t5x legacy checkpoint
at the source step (or `step`, for sources that record none: Hugging Face checkpoints) that t5x
restores as INITIAL_CHECKPOINT_PATH and whose step t5x continues. The output is written to a
hidden sibling folder and renamed at the end: a crash leaves nothing at the output path (see
output.py for what `force` may replace, stale temporary folders and SIGINT/SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import TextIO

from gqa_t5x.checkpoints import CheckpointWriter, open_checkpoint, step_dir
from gqa_t5x.checkpoints.t5x import infer_config_from_shapes
from gqa_t5x.conversion.grouping import (
    KERNELS,
    Groups,
    attention_paths,
    bias_groups,
    head_groups_of,
    permute_bias,
    similarity_kinds,
)
from gqa_t5x.conversion.output import (
    CONVERSION_FILE,
    StopSignals,
    check_output,
    remove_stale_temporaries,
    replace,
    temporary_path,
)
from gqa_t5x.conversion.pooling import (
    check_conversion,
    check_method,
    check_shapes,
    convert_array,
    convert_attention,
    count_params,
    kv_kernel_kind,
    param_shapes,
)
from gqa_t5x.model.config import ATTENTION_KINDS, TransformerConfig, with_kv_heads
from gqa_t5x.progress import Progress


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
    grouping: str = "contiguous"
    # {attention module path: lists of source kv heads, one per target kv head} ("aligned")
    groups: dict[str, Groups] | None = None
    # newer checkpoints of a training run's MODEL_DIR that were not converted, and why
    skipped: list[str] = dataclasses.field(default_factory=list)
    source_step: int | None = None  # the step the source records; None: it records none
    warnings: list[str] = dataclasses.field(default_factory=list)

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
            f"  method {self.method}" + (f" ({self.grouping} groups)" if self.groups else "")
            + f", seed {self.seed}; kv heads: {kv}",
            f"  parameters: {count_params(src):,} -> {count_params(tgt):,}",
            f"  decode KV cache bytes per generated token ({src.dtype}): "
            f"{self_before:,} -> {self_after:,}",
            f"  cross-attention KV cache bytes per input token: {cross_before:,} -> "
            f"{cross_after:,}",
            f"  {self.num_arrays} arrays, largest {_size(self.largest_array_bytes)}; "
            f"step {self.step} (source records "
            f"{'none' if self.source_step is None else self.source_step}); "
            f"{self.seconds:.1f} s",
            f"  t5x checkpoint (INITIAL_CHECKPOINT_PATH): {step_dir(self.output, self.step)}",
        ]
        lines += [f"  skipped {s}" for s in self.skipped]
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
                       force: bool = False, grouping: str = "contiguous",
                       progress: TextIO | None = None,
                       step: int | None = None) -> ConversionSummary:
    """Convert the checkpoint at `input_path` to `num_kv_heads` kv heads in the `grouped`
    attentions (default: those the source groups, decoder self and cross for MHA) and write our
    checkpoint format to `output_path`.

    `source_config` is needed only for t5x checkpoints whose shapes do not determine it
    (otherwise it is inferred; `relative_attention_max_distance` then stays 128). `grouping`
    ("contiguous" or "similarity", the latter for method "aligned") chooses which heads share a
    kv head; conversion.json records the groups. `progress` (e.g. sys.stderr) gets a line with
    arrays and bytes done and an ETA every few seconds.

    `step` is the output's training step (default: the source's). Hugging Face checkpoints
    record none; without `step` they are written at step 0 with a warning in the summary, since
    t5x would then restart the learning-rate schedule and count TRAIN_STEPS from 0.
    """
    start = time.perf_counter()
    check_method(method, grouping)
    if step is not None and step < 0:
        raise ValueError(f"--step {step} is negative; give the source's training step (>= 0)")
    output_path = os.path.abspath(output_path)
    check_output(input_path, output_path, force)

    reader = open_checkpoint(input_path, input_format, source_config)
    shapes = reader.shapes()
    source = reader.config or infer_config_from_shapes(shapes)
    check_shapes(shapes, param_shapes(source), where=f"checkpoint {input_path}")
    target = with_kv_heads(source, num_kv_heads, grouped)
    check_conversion(source, target)
    source_step = None if reader.format == "hf" else reader.step  # HF files hold no step
    out_step = step if step is not None else (source_step or 0)
    warnings = []
    if source_step is None and step is None:
        warnings.append(f"{input_path} ({reader.format}) records no training step, so the output "
                        "is checkpoint_0 and t5x restarts the learning-rate schedule and "
                        "TRAIN_STEPS at 0; pass --step N to continue the source's schedule "
                        "(the public T5.1.1 checkpoints: --step 1000000)")
    groups = (_choose_groups(reader, source, target, grouping, progress)
              if method == "aligned" else None)

    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    remove_stale_temporaries(output_path)
    tmp = temporary_path(output_path)
    largest = 0
    signals = StopSignals()
    with signals.active():
        try:
            writer = CheckpointWriter(tmp, target, step=out_step)
            total = sum(4 * math.prod(shape) for shape in shapes.values())  # read as float32
            report = Progress("converting", len(shapes), "arrays", progress, total_bytes=total)
            done = done_bytes = 0
            for path, read_bytes, array in _converted(reader, shapes, source, target, method,
                                                      seed, groups):
                largest = max(largest, read_bytes)
                writer.write(path, array)
                done, done_bytes = done + 1, done_bytes + 4 * math.prod(shapes[path])
                report.update(done, done_bytes)
                del array
                signals.check(tmp)
            signals.check(tmp)
            writer.close()
            summary = ConversionSummary(
                input=os.path.abspath(input_path), input_format=reader.format,
                output=output_path, method=method, seed=seed, source_config=source,
                target_config=target, step=out_step, num_arrays=len(shapes),
                largest_array_bytes=largest, seconds=time.perf_counter() - start,
                grouping=grouping, groups=groups, skipped=list(getattr(reader, "skipped", [])),
                source_step=source_step, warnings=warnings)
            with open(os.path.join(tmp, CONVERSION_FILE), "w") as f:
                json.dump(summary.to_dict(), f, indent=2)
            signals.check(tmp)
            replace(tmp, output_path)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    summary.seconds = time.perf_counter() - start
    return summary


def _choose_groups(reader, source: TransformerConfig, target: TransformerConfig, grouping: str,
                   progress: TextIO | None) -> dict[str, Groups]:
    """`head_groups_of` over the checkpoint, with a progress line for the kernels it reads."""
    total = sum(2 * len(attention_paths(source, k))
                for k in similarity_kinds(source, target, grouping))
    report = Progress("choosing groups", total, "key/value kernels", progress)
    done = 0

    def read(path):
        nonlocal done
        array = reader.read(path)
        done += 1
        report.update(done)
        return array

    return head_groups_of(read, source, target, grouping)


def _converted(reader, shapes, source: TransformerConfig, target: TransformerConfig, method: str,
               seed: int, groups: dict[str, Groups] | None):
    """(path, bytes read, converted array) for every array of the checkpoint, in `shapes`
    order; the kernels of an attention that "aligned" converts come together when its first
    kernel's turn comes."""
    biases = bias_groups(groups, target) if groups is not None else {}
    done = set()
    for path in shapes:
        module = "/".join(path[:3])
        if groups is not None and module in groups and path[3:] in [(k, "kernel") for k in
                                                                       KERNELS]:
            if module in done:
                continue
            done.add(module)
            kernels = {k: reader.read(path[:3] + (k, "kernel")) for k in KERNELS}
            read_bytes = max(a.nbytes for a in kernels.values())
            kind = kv_kernel_kind(path[:3] + ("key", "kernel"))
            converted = convert_attention(kernels, kind, source, target, groups[module])
            del kernels
            for k in KERNELS:
                yield path[:3] + (k, "kernel"), read_bytes, converted.pop(k)
            continue
        array = reader.read(path)
        if path in biases:
            yield path, array.nbytes, permute_bias(array, biases[path])
        else:
            yield path, array.nbytes, convert_array(path, array, source, target, method, seed)
        del array  # before the next read: memory holds one array
