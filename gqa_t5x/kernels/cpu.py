"""Compiled CPU kernels for a decode step, as XLA FFI custom calls.

At a decode step every dense layer multiplies a handful of rows (batch x beams) by its kernel and
every attention reads its cached keys and values for one query per head, so the step's cost
should be reading weights and cache. XLA's CPU dot, like numpy's and torch's GEMMs, is built for
many rows: at 8 rows on a 2-core machine it reads the decoder's weights at 8-14 GB/s where a plain
sum over them runs at ~28, and the per-head [G, H] x [H, S] attention products fare no better.
  - `small_matmul` (csrc/small_matmul.cc): x [M, D] @ w [D, F] for M <= MAX_ROWS, reading w where
    it lies (t5x's [in, out] layout), 64 columns at a time with prefetching; used by
    `layers.dense`.
  - `decode_attention` (csrc/decode_attention.cc): softmax(q . key + bias) @ value for one query
    position, each kv head's keys and values read once for its G query heads; used by
    `attention.dot_product_attention`.
`gqa-bench` run with `GQA_T5X_CPU_KERNELS=0` shows the decode step without them.

The kernels are compiled with the system's C++ compiler on first use (a few seconds) into a cache
folder, keyed by their source, jaxlib's version and the CPU, and registered with jax as FFI
targets. Without a compiler, or with `GQA_T5X_CPU_KERNELS=0`, the model keeps XLA's ops: the
results are the same up to float rounding. Set the variable before the first jitted call: the
choice is made when a function is traced.

Environment: `CXX` (compiler, default `c++`), `GQA_T5X_CACHE` (default `~/.cache/gqa_t5x`),
`GQA_T5X_CPU_KERNELS` (`0` to turn off).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cc")))
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
MATMUL_TARGET = "gqa_small_matmul"
ATTENTION_TARGET = "gqa_decode_attention"
# Rows (tokens) up to which a product goes to the kernel: a decode step of batch x beams. It
# re-reads a weight tile per 8 rows, so its lead shrinks with rows: over a decode step's weights
# at config B's widths on 2 cores, 1.9x XLA's dot at 8 rows, 1.2x at 32, even at 64.
MAX_ROWS = 32
ENV_SWITCH = "GQA_T5X_CPU_KERNELS"
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> Path:
    """`$GQA_T5X_CACHE`, else `~/.cache/gqa_t5x`: the cache the synthetic suite uses too."""
    return Path(os.environ.get("GQA_T5X_CACHE") or Path.home() / ".cache" / "gqa_t5x")


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and flags where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def library_path(compiler: str, directory: Path | None = None) -> Path:
    """Where the kernels built by `compiler` for these sources, jaxlib and CPU are cached."""
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), jaxlib.__version__.encode(),
                 compiler.encode(), " ".join(CXX_FLAGS).encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return (directory or cache_dir()) / f"kernels-{key.hexdigest()[:16]}.so"


def build(directory: Path | None = None) -> Path:
    """Compile the kernels into the cache (once) and return the shared library's path.

    The library is written under a temporary name and renamed, so that a concurrent or interrupted
    build never leaves a half-written file under the final name. Raises RuntimeError naming the
    compiler and its output when the build fails.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    out = library_path(compiler, directory)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *CXX_FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed: {shlex.join(cmd)}\n"
                               f"{proc.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def _registered() -> bool:
    """Build, load and register the kernels once per process; False (with a warning) if not."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"gqa_t5x CPU kernels unavailable, decode steps use XLA's ops: {e}",
                      stacklevel=3)
        return False
    for target, handler in ((MATMUL_TARGET, lib.GqaSmallMatmul),
                            (ATTENTION_TARGET, lib.GqaDecodeAttention)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def enabled() -> bool:
    """Whether this process is set up to use the kernels (CPU backend, one device, switch on)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    # Under a multi-device mesh a custom call would make XLA gather its sharded operands.
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return _registered()


def dense_applies(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `layers.dense(x, kernel)` should use the kernel: few float32 rows, a 2-D kernel."""
    rows = math.prod(x.shape[:-1])
    return (0 < rows <= MAX_ROWS and kernel.ndim == 2 and x.dtype == jnp.float32
            and kernel.dtype == jnp.float32 and enabled())


def attention_applies(query: jax.Array, key: jax.Array, value: jax.Array) -> bool:
    """Whether a decode step's attention should use `decode_attention`: float32 operands."""
    return all(a.dtype == jnp.float32 for a in (query, key, value)) and enabled()


def _check_float32(fn: str, **arrays: jax.Array) -> None:
    for name, a in arrays.items():
        if a.dtype != jnp.float32:
            raise ValueError(f"{fn}: {name} is {a.dtype}, the CPU kernels take float32")


def small_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [M, D] @ kernel [D, F] -> [M, F], float32, by the compiled kernel (see `dense_applies`)."""
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"small_matmul: x {x.shape} and kernel {kernel.shape} are not "
                         "[M, D] and [D, F]")
    _check_float32("small_matmul", x=x, kernel=kernel)
    if not _registered():
        raise RuntimeError("small_matmul: the CPU kernels could not be built (see the warning)")
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(MATMUL_TARGET, out, vmap_method="sequential")(x, kernel)


def decode_attention(q: jax.Array, key: jax.Array, value: jax.Array,
                     bias: jax.Array) -> jax.Array:
    """One decode step of grouped attention by the compiled kernel, float32:
    softmax(q . key + bias) @ value per kv head.

    q [B, K, G, H], key and value [B, K, S, H], bias [B, K, G, S] -> [B, K, G, H]. No gradient:
    `attention.dot_product_attention` gives it one.
    """
    shapes = (q.shape, key.shape, value.shape, bias.shape)
    b, k, g, h = q.shape if q.ndim == 4 else (-1,) * 4
    s = key.shape[2] if key.ndim == 4 else -1
    if shapes != ((b, k, g, h), (b, k, s, h), (b, k, s, h), (b, k, g, s)):
        raise ValueError(f"decode_attention: q {q.shape}, key {key.shape}, value {value.shape} "
                         f"and bias {bias.shape} are not [B, K, G, H], [B, K, S, H] (twice) and "
                         "[B, K, G, S]")
    _check_float32("decode_attention", q=q, key=key, value=value, bias=bias)
    if not _registered():
        raise RuntimeError("decode_attention: the CPU kernels could not be built (see the warning)")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(q, key, value, bias)
