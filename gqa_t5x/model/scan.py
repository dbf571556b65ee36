"""Deep stacks: rematerialization policies, `nn.scan` over layers, and the stacked parameter
layout that scanning needs.

Checkpoints, train state and optimizer state always keep t5x's unscanned layout
(`encoder/layers_0/...`, `encoder/layers_1/...`): t5x and Hugging Face checkpoints load unchanged,
our checkpoints restore in t5x, and Adafactor's per-parameter statistics (factoring, update
clipping, parameter scale) stay per layer exactly as in t5x. A model with
`config.scan_layers=True` takes its layers stacked (`encoder/layers/...` with a leading [L] axis
whose logical name is `layers`); `stack_layers` / `unstack_layers` convert between the two, as
pure functions on nested dicts, and `EncoderDecoderModel` stacks inside the jitted step.

Remat policies (`config.remat`):
  none               keep every activation for the backward pass
  full               keep only each layer's input; recompute the layer in the backward pass
  save_projections   keep the outputs of the dense projections (query/key/value/out kernels and
                     the MLP's wi_0/wi_1/wo, named PROJECTION with `checkpoint_name`, as maxtext
                     names its matmuls); recompute norms, softmax, GELU and dropout
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from gqa_t5x.model.config import REMAT_POLICIES

PROJECTION = "projection"  # the checkpoint_name of every DenseJoined output
LAYERS = "layers"  # the logical axis (and the module name) of stacked layers
STACKS = ("encoder", "decoder")
_LAYER = re.compile(r"layers_(\d+)$")


def remat_policy(name: str):
    """The `jax.checkpoint` policy of remat policy `name` (None for "full": save nothing)."""
    if name == "save_projections":
        return jax.checkpoint_policies.save_only_these_names(PROJECTION)
    if name == "full":
        return None
    raise ValueError(f"remat={name!r} has no checkpoint policy; choose from {REMAT_POLICIES}")


def layer_stack(layer_cls: type[nn.Module], config, num_layers: int, num_broadcast: int):
    """(module class, name) of a stack of `num_layers` `layer_cls` layers under `config`'s remat
    and scan settings.

    Unscanned, the caller makes one module per layer, named `layers_<i>`. Scanned, the class is
    called once as `cls(...)(x, *broadcast)` with `num_broadcast` arguments shared by all layers
    and returns (x, None); its parameters carry a leading [L] axis named `layers`.
    """
    cls = layer_cls
    if config.remat != "none":
        # prevent_cse only matters outside scan (jax's advice); inside scan it costs speed.
        cls = nn_partitioning.remat(cls, policy=remat_policy(config.remat),
                                    prevent_cse=not config.scan_layers)
    if not config.scan_layers:
        return cls
    return nn_partitioning.scan_with_axes(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=num_layers,
        axis_name=LAYERS,
    )


def _layer_numbers(tree: Mapping[str, Any], where: str) -> int:
    numbers = sorted(int(m.group(1)) for k in tree if (m := _LAYER.match(k)))
    if numbers != list(range(len(numbers))):
        raise ValueError(f"{where} has layers {numbers}; expected layers_0 .. layers_"
                         f"{len(numbers) - 1} without gaps")
    return len(numbers)


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params in t5x's layout (`<stack>/layers_<i>/...`) -> the scanned layout
    (`<stack>/layers/...`, every leaf stacked along a new leading [L] axis).

    Works on any tree of arrays (numpy or jax, abstract shapes excluded) and leaves the other
    parameters (embeddings, relative position biases, final norms) as they are.
    """
    out = dict(params)
    for stack in STACKS:
        if stack not in params:
            continue
        sub = dict(params[stack])
        n = _layer_numbers(sub, stack)
        if n == 0:
            continue
        if LAYERS in sub:
            raise ValueError(f"{stack} holds both {LAYERS}/ and {LAYERS}_0/: already stacked?")
        per_layer = [sub.pop(f"layers_{i}") for i in range(n)]
        try:
            sub[LAYERS] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
        except ValueError as e:
            raise ValueError(f"{stack}/layers_0 .. layers_{n - 1} do not hold the same "
                             f"parameters and shapes, so they cannot be stacked: {e}") from None
        out[stack] = sub
    return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layers`: `<stack>/layers/...` [L, ...] -> `<stack>/layers_<i>/...`."""
    out = dict(params)
    for stack in STACKS:
        if stack not in params or LAYERS not in params[stack]:
            continue
        sub = dict(params[stack])
        stacked = sub.pop(LAYERS)
        n = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
        if len(n) != 1:
            raise ValueError(f"{stack}/{LAYERS} leaves have different leading (layer) sizes "
                             f"{sorted(n)}")
        for i in range(n.pop()):
            sub[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
        out[stack] = sub
    return out
