"""Peak memory and wall time of `gqa-convert` on a synthetic multi-GB t5x checkpoint.

Builds a t5x legacy checkpoint (msgpack + one zarr folder per array) for a wide, shallow
T5.1.1-shaped config, filling each array with random data chunk by chunk so that building it
needs little memory; then runs the converter in a subprocess and reports its wall time and peak
RSS against the largest array. The converter streams one array at a time, so its peak should
stay under 2x the largest array plus the fixed cost of a process that has imported it (measured
here as the peak RSS of a subprocess that only imports the modules).

    python scripts/convert_memory_benchmark.py --workdir out/convert_bench [--keep]

The default config writes about 4.6 GB; check free disk space first. The work folder is deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import tensorstore as ts
from flax import serialization

from gqa_t5x.conversion.pooling import param_shapes
from gqa_t5x.model.config import TransformerConfig

# Largest arrays: embedding and logits, 65536 x 4096 float32 = 1 GiB each; 4.6 GB in all.
BENCH_CONFIG = TransformerConfig(vocab_size=65536, emb_dim=4096, num_heads=32, num_kv_heads=32,
                                 head_dim=128, mlp_dim=16384, num_encoder_layers=1,
                                 num_decoder_layers=1)
CHUNK_BYTES = 64 * 2**20  # t5x's target chunk size


def build_t5x_checkpoint(directory: str, config: TransformerConfig, seed: int = 0) -> int:
    """Write a random t5x legacy checkpoint; returns its size in bytes."""
    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    target: dict = {}
    total = 0
    for path, shape in param_shapes(config).items():
        name = ".".join(("target",) + path)
        rows_per_chunk = max(1, min(shape[0], CHUNK_BYTES // (4 * int(np.prod(shape[1:])))))
        chunks = [rows_per_chunk] + list(shape[1:])
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": name},
                "metadata": {"compressor": None, "shape": list(shape), "chunks": chunks,
                             "dtype": "<f4"}}
        store = ts.open({**spec, "kvstore": {"driver": "file",
                                             "path": os.path.join(directory, name)}},
                        create=True).result()
        scale = np.float32(1.0 / np.sqrt(shape[0]))
        for start in range(0, shape[0], rows_per_chunk):
            rows = min(rows_per_chunk, shape[0] - start)
            block = rng.random((rows,) + tuple(shape[1:]), dtype=np.float32)
            store[start:start + rows].write((block - 0.5) * scale).result()
        node = target
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = spec
        total += int(np.prod(shape)) * 4
    state = {"version": 3, "optimizer": {"target": target,
                                         "state": {"step": np.asarray(1000, np.int32)}}}
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.to_bytes(state))
    return total


# Peak RSS is read from the child's own /proc/self/status (VmHWM, Linux), not from
# getrusage(RUSAGE_CHILDREN): a child started by fork/vfork + exec inherits the parent's RSS
# high-water mark in ru_maxrss, which would charge it the memory used to build the checkpoint.
_MEASURE = """
import sys
{body}
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print("PEAK_RSS_KB", int(hwm.split()[1]), file=sys.stderr)
sys.exit(rc)
"""


def run_measured(body: str) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, output) of a python subprocess running `body`,
    which sets `rc`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE.format(body=body)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = [int(line.split()[1]) * 1024 for line in proc.stderr.splitlines()
            if line.startswith("PEAK_RSS_KB")]
    output = proc.stdout + "".join(line + "\n" for line in proc.stderr.splitlines()
                                   if not line.startswith("PEAK_RSS_KB"))
    return proc.returncode, seconds, (peak or [0])[0], output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="out/convert_bench")
    p.add_argument("--num_kv_heads", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    src, out = os.path.join(args.workdir, "t5x_src"), os.path.join(args.workdir, "converted")
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    gib = 2**30
    try:
        t0 = time.perf_counter()
        total = build_t5x_checkpoint(src, BENCH_CONFIG)
        largest = max(int(np.prod(s)) * 4 for s in param_shapes(BENCH_CONFIG).values())
        print(f"built {total / 1e9:.2f} GB t5x checkpoint in {time.perf_counter() - t0:.0f} s; "
              f"largest array {largest / gib:.2f} GiB")

        rc, _, overhead, output = run_measured(
            "import gqa_t5x.cli.convert, flax.serialization\nrc = 0")
        if rc:
            print(output)
            return rc
        print(f"process overhead (peak RSS after imports): {overhead / gib:.2f} GiB")

        argv = ["--input", src, "--output", out, "--num_kv_heads", str(args.num_kv_heads),
                "--method", "mean"]
        rc, seconds, peak, output = run_measured(
            f"from gqa_t5x.cli.convert import main\nrc = main({argv!r})")
        print(output.rstrip())
        if rc:
            return rc
        bound = 2 * largest + overhead
        print(f"gqa-convert: {seconds:.1f} s wall, peak RSS {peak / gib:.2f} GiB = "
              f"{(peak - overhead) / largest:.2f} x largest array + overhead; "
              f"bound 2 x largest + overhead = {bound / gib:.2f} GiB: "
              f"{'OK' if peak < bound else 'EXCEEDED'}")
        return 0 if peak < bound else 1
    finally:
        if not args.keep and os.path.exists(args.workdir):
            shutil.rmtree(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
