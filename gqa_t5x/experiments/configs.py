"""Experiment shapes and grids: the TOML files of the top-level `configs/` folder.

`configs/` sits at the top of the repository so that a reader finds every experiment's shape in
one place; the package reaches it as `gqa_t5x/configs` (a link in a checkout, a copy in a wheel),
so an installed package reads the same files.

    load("config_b")            -> the dict of configs/config_b.toml
    model_config("config_b")    -> TransformerConfig from its [model] table
    gin_bindings("tiny_pipeline") -> ["gqa_t5x.models.model_config.emb_dim = 128", ...]

Shell scripts read them through `scripts/config_flags.py`.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from typing import Any

from gqa_t5x.model.config import TransformerConfig


def names() -> list[str]:
    """The experiment files shipped, without `.toml`."""
    folder = importlib.resources.files("gqa_t5x") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load(name: str) -> dict[str, Any]:
    """The parsed `configs/<name>.toml`."""
    path = importlib.resources.files("gqa_t5x") / "configs" / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no experiment config {name!r} in configs/; shipped: "
                                f"{', '.join(names())}")
    with path.open("rb") as f:
        return tomllib.load(f)


def model_config(name: str, table: str = "model", **overrides: Any) -> TransformerConfig:
    """`TransformerConfig` from the `[model]` table (or another) of `configs/<name>.toml`."""
    fields = dict(load(name)[table])
    fields.update(overrides)
    return TransformerConfig(**fields)


def gin_bindings(name: str, table: str = "model",
                 configurable: str = "gqa_t5x.models.model_config") -> list[str]:
    """Gin bindings `<configurable>.<field> = <value>` of a table of `configs/<name>.toml`, for
    runs configured with gin (`gqa-train --gin.<binding>`)."""
    values = load(name).get(table)
    if values is None:
        raise KeyError(f"configs/{name}.toml has no [{table}] table")
    return [f"{configurable}.{field} = {value!r}" for field, value in values.items()]
