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

The model never imports this module at its own import: `TransformerConfig.kernels` chooses it
(see `model/kernel_choice.py`), and `gqa-bench --kernels xla` shows the decode step without it.
The kernels are compiled with the system's C++ compiler when first asked for (a few seconds)
into a cache folder, keyed by everything the library's code depends on: the sources, the flags,
jaxlib's version, the compiler and its version, the machine and its CPU's feature flags. Where
the OS does not say the CPU's flags (neither Linux's /proc/cpuinfo nor macOS's sysctl), the build
targets the architecture's baseline instead of `-march=native`, so a cache folder shared between
machines never hands one a library with instructions it lacks.

The vectors are sized for AVX-512 (32 registers of 16 floats): the product's register tile is
8 rows x 64 columns of accumulators, the attention works in 16-float vectors. On an AVX2-only CPU
(16 registers of 8 floats) the compiler splits every vector in two and the product's accumulators
no longer fit in registers, so they spill to the stack; a baseline build (no `-march=native`)
has narrower vectors still. The results are the same; the speed on such machines has not been
measured: compare with `kernels="xla"` before relying on the kernels there.

Environment: `CXX` (compiler, default `c++`), `GQA_T5X_CACHE` (default `~/.cache/gqa_t5x`).
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
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cc")))
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
MATMUL_TARGET = "gqa_small_matmul"
ATTENTION_TARGET = "gqa_decode_attention"
# Rows (tokens) up to which a product goes to the kernel: a decode step of batch x beams. Its
# register tile holds 8 rows; over 8 rows it takes each weight tile through every block of 8 rows
# before the next tile, so the weights are read from memory once. Config B's logits projection
# ([M, 512] @ [512, 32128], 2 cores): 2.9 ms at 8 rows against XLA's 4.1; at 32 rows 6.9 against
# 7.6 (9.8 when every block of 8 rows read all the weights).
MAX_ROWS = 32
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
NATIVE_FLAG = "-march=native"  # only where the CPU's feature flags are known (see cpu_features)


def cache_dir() -> Path:
    """`$GQA_T5X_CACHE`, else `~/.cache/gqa_t5x`: the cache the synthetic suite uses too."""
    return Path(os.environ.get("GQA_T5X_CACHE") or Path.home() / ".cache" / "gqa_t5x")


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model and instruction-set flags as the OS states them, or "" where it does not.

    Linux: /proc/cpuinfo's model name and flags (x86) or Features / CPU part (arm). macOS: the
    `machdep.cpu` and `hw.optional` sysctls (Intel's feature lists, Apple silicon's optional ISA
    extensions).
    """
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part", "isa")
    keep = sorted({ln.strip() for ln in lines if ln.startswith(keys)})
    if keep:
        return "\n".join(keep)
    if platform.system() == "Darwin" and shutil.which("sysctl"):
        proc = subprocess.run(["sysctl", "machdep.cpu", "hw.optional"], capture_output=True,
                              text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    return ""


def compiler_version(compiler: str) -> str:
    """`compiler --version`'s output: two compilers named `c++` on two machines differ here."""
    proc = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{compiler} --version failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def compile_flags(features: str) -> tuple[str, ...]:
    """CXX_FLAGS, with `-march=native` only where the CPU's flags go into the cache key."""
    return (*CXX_FLAGS, NATIVE_FLAG) if features else CXX_FLAGS


def library_path(compiler: str, directory: Path | None = None, *,
                 features: str | None = None, version: str | None = None) -> Path:
    """Where the kernels built by `compiler` for these sources, flags, jaxlib, machine and CPU are
    cached. `features` and `version` default to this machine's `cpu_features()` and the
    compiler's `compiler_version`."""
    features = cpu_features() if features is None else features
    version = compiler_version(compiler) if version is None else version
    key = hashlib.sha256()
    parts = (*(p.read_bytes() for p in SOURCES + HEADERS), jaxlib.__version__.encode(),
             compiler.encode(), version.encode(), " ".join(compile_flags(features)).encode(),
             platform.system().encode(), platform.machine().encode(), features.encode())
    for part in parts:
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
    features = cpu_features()
    out = library_path(compiler, directory, features=features)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *compile_flags(features), "-isystem", jax.ffi.include_dir(),
           *map(str, SOURCES), "-o", tmp]
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
def register() -> None:
    """Build, load and register the kernels with jax as FFI targets, once per process.

    Raises what went wrong (RuntimeError for a missing compiler or a failed build, OSError for a
    library that does not load, AttributeError on a jax without `jax.ffi`); the model's
    `kernel_choice` turns that into a fallback to XLA (kernels="auto") or an error ("cpu").
    """
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target, handler in ((MATMUL_TARGET, lib.GqaSmallMatmul),
                            (ATTENTION_TARGET, lib.GqaDecodeAttention)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def dense_applies(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `small_matmul` takes `layers.dense(x, kernel)`: few float32 rows, a 2-D kernel."""
    rows = math.prod(x.shape[:-1])
    return (0 < rows <= MAX_ROWS and kernel.ndim == 2 and x.dtype == jnp.float32
            and kernel.dtype == jnp.float32)


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
    register()
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
    register()
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(q, key, value, bias)
