"""Model hyperparameters: one frozen dataclass and the T5.1.1 size presets.

`TransformerConfig` is the single source of model hyperparameters. Gin binds it (see `gin/models/`),
conversion reads and writes it as JSON beside checkpoints, and every module takes it whole.

Which attentions are grouped is a config field, `grouped`, a tuple drawn from
`("encoder_self", "decoder_self", "cross")`. The paper groups decoder self-attention and
cross-attention and keeps encoder self-attention multi-head, which is the default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

ATTENTION_KINDS = ("encoder_self", "decoder_self", "cross")
DEFAULT_GROUPED = ("decoder_self", "cross")
# Which implementation runs the ops that have a compiled CPU kernel (see `kernel_choice.py`).
KERNEL_CHOICES = ("auto", "xla", "cpu")
REMAT_POLICIES = ("none", "full", "save_projections")  # see model/scan.py

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a T5.1.1 encoder-decoder with grouped-query attention.

    `num_kv_heads` applies to the attentions named in `grouped`; the others keep `num_heads`
    key/value heads. `dtype` is the activation dtype ("float32" or "bfloat16"); parameters are
    always float32, as in t5x. `kernels` chooses the ops' implementation, as maxtext's
    `attention_kernel` does: "xla" (XLA's ops, the path every accelerator runs), "cpu" (the
    compiled CPU decode kernels wherever they apply; an error where they cannot be had) or
    "auto" ("cpu" on a single-device float32 CPU run whose kernels build, else "xla").

    `kernels`, `remat` and `scan_layers` change how the network runs, not what it computes (see
    `model/scan.py`): runs and checkpoints that differ only in them hold the same model.
    """

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    num_kv_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    dropout_rate: float = 0.0
    dtype: str = "float32"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    grouped: tuple[str, ...] = DEFAULT_GROUPED
    layer_norm_epsilon: float = 1e-6
    kernels: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        ints = (
            "vocab_size",
            "emb_dim",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads={self.num_kv_heads!r} must be an integer >= 1")
        if self.num_kv_heads > self.num_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} is larger than num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={self.kernels!r} is not one of {KERNEL_CHOICES}")
        if self.kernels == "cpu" and self.dtype != "float32":
            raise ValueError(f"kernels='cpu' needs dtype='float32' (the CPU kernels take float32), "
                             f"got dtype={self.dtype!r}; use kernels='auto' or 'xla'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be True or False")
        if isinstance(self.grouped, str):
            raise ValueError(f"grouped={self.grouped!r} must be a sequence of attention names, "
                             f"e.g. ({self.grouped!r},)")
        grouped = tuple(self.grouped)
        unknown = [g for g in grouped if g not in ATTENTION_KINDS]
        if unknown:
            raise ValueError(f"grouped={grouped!r} names unknown attentions {unknown}; "
                             f"choose from {ATTENTION_KINDS}")
        if len(set(grouped)) != len(grouped):
            raise ValueError(f"grouped={grouped!r} repeats an attention")
        # Normalize order so that equal configs compare equal.
        object.__setattr__(self, "grouped", tuple(g for g in ATTENTION_KINDS if g in grouped))

    # ---- derived quantities -------------------------------------------------------------------

    @property
    def activation_dtype(self):
        return _DTYPES[self.dtype]

    def kv_heads(self, kind: str) -> int:
        """Number of key/value heads of attention `kind` (one of ATTENTION_KINDS)."""
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; choose from {ATTENTION_KINDS}")
        return self.num_kv_heads if kind in self.grouped else self.num_heads

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> TransformerConfig:
        """This config without the settings that do not change the model's function: dropout,
        kernels, remat and scan_layers at their defaults (to compare two runs' models)."""
        return self.replace(dropout_rate=0.0, kernels="auto", remat="none", scan_layers=False)

    def decode_cache_bytes_per_token(self, input_length: int = 0,
                                     bytes_per_element: int = 0) -> int:
        """Bytes of decode cache per sequence: self-attention K/V per generated token, plus
        cross-attention K/V for `input_length` encoder positions (0 for per-token only)."""
        b = bytes_per_element or jnp.dtype(self.activation_dtype).itemsize
        per_layer_self = 2 * self.kv_heads("decoder_self") * self.head_dim * b
        per_layer_cross = 2 * self.kv_heads("cross") * self.head_dim * b * input_length
        return self.num_decoder_layers * (per_layer_self + per_layer_cross)

    # ---- (de)serialization --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grouped"] = list(self.grouped)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields {unknown}")
        d = dict(d)
        if "grouped" in d:
            d["grouped"] = tuple(d["grouped"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> TransformerConfig:
        return cls.from_dict(json.loads(text))


def _t5_1_1(emb_dim: int, num_heads: int, layers: int, mlp_dim: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=32128,
        emb_dim=emb_dim,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=64,
        mlp_dim=mlp_dim,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
    )


PRESETS: dict[str, TransformerConfig] = {
    "t5_1_1_small": _t5_1_1(512, 6, 8, 1024),
    "t5_1_1_base": _t5_1_1(768, 12, 12, 2048),
    "t5_1_1_large": _t5_1_1(1024, 16, 24, 2816),
    "t5_1_1_xl": _t5_1_1(2048, 32, 24, 5120),
    "t5_1_1_xxl": _t5_1_1(4096, 64, 24, 10240),
    # For tests and CPU smoke runs. head_dim != emb_dim / num_heads on purpose.
    "tiny": TransformerConfig(
        vocab_size=64,
        emb_dim=32,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    ),
}


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """A preset by name, with field overrides (e.g. `num_kv_heads=8`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def with_kv_heads(
    config: TransformerConfig, num_kv_heads: int, grouped: Sequence[str] | None = None
) -> TransformerConfig:
    """`config` converted to `num_kv_heads` key/value heads in the `grouped` attentions."""
    changes: dict[str, Any] = {"num_kv_heads": num_kv_heads}
    if grouped is not None:
        changes["grouped"] = tuple(grouped)
    return config.replace(**changes)
