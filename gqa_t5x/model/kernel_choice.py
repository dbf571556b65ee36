"""Which implementation runs the ops that have a compiled CPU kernel: `TransformerConfig.kernels`.

  "xla"   XLA's ops everywhere: the path TPU and GPU run, and the reference the kernels are
          tested against. `gqa_t5x.kernels` is never imported.
  "cpu"   the compiled CPU kernels of `gqa_t5x.kernels.cpu` wherever they apply (few-row float32
          products, one-query float32 attention), XLA's ops elsewhere; an error naming the reason
          when this run cannot have them (not a single-device CPU run, no compiler, a failed build).
  "auto"  "cpu" on a single-device CPU run whose kernels build and load (operands float32);
          otherwise "xla", with one warning when building or loading them failed.

The choice is made when a function is traced, by `cpu_kernels(choice)`: the kernels module is
imported and compiled only then, so importing the model compiles nothing.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import jax

from gqa_t5x.model.config import KERNEL_CHOICES


def _single_device_cpu() -> bool:
    # Under a multi-device mesh a custom call would make XLA gather its sharded operands.
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _auto_applies() -> bool:
    """Whether "auto" asks for the kernels on this run (tests replace it to pin the XLA path)."""
    return _single_device_cpu()


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(the kernels module, "") once built, loaded and registered, or (None, why not); once per
    process."""
    try:
        from gqa_t5x.kernels import cpu  # noqa: PLC0415  (imported only when asked for)

        cpu.register()
    # Any failure means "no kernels": no compiler, a failed build, a library that does not load,
    # or a jax without the public `jax.ffi` (an AttributeError).
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    return cpu, ""


def dense_applies(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether the kernels would take `layers.dense(x, kernel)` (few float32 rows, a 2-D kernel),
    known without building them."""
    from gqa_t5x.kernels import cpu  # noqa: PLC0415  (imported only when asked for)

    return cpu.dense_applies(x, kernel)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"gqa_t5x: the CPU kernels are unavailable, kernels='auto' uses XLA's ops "
                  f"({reason}); set kernels='xla' to silence this", stacklevel=4)


def cpu_kernels(choice: str) -> ModuleType | None:
    """The `gqa_t5x.kernels.cpu` module if `choice` ("auto", "xla" or "cpu") takes the kernels on
    this run, else None. Raises ValueError / RuntimeError for "cpu" where they cannot be had."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r} is not one of {KERNEL_CHOICES}")
    if choice == "xla" or (choice == "auto" and not _auto_applies()):
        return None
    if choice == "cpu" and not _single_device_cpu():
        raise ValueError(f"kernels='cpu' needs a single-device CPU run, this one has "
                         f"{jax.device_count()} {jax.default_backend()} device(s); "
                         "use kernels='auto' or 'xla'")
    module, reason = _load()
    if module is None:
        if choice == "cpu":
            raise RuntimeError(f"kernels='cpu': the CPU kernels could not be built or loaded "
                               f"({reason}); use kernels='auto' or 'xla'")
        _warn_once(reason)
    return module
