"""Device mesh, logical axis rules, sharded creation of train state, and batch placement.

The mesh has two axes, `data` (batch) and `model` (heads, MLP width, vocabulary). Every parameter
carries logical axis names (`layers.py`); `LOGICAL_AXIS_RULES` maps them to mesh axes, in this one
place. A parameter dimension that the mesh axis does not divide is replicated instead (e.g. an
MQA key kernel [D, 64] shards over model=8 but is replicated over model=3), so any head count runs
on any mesh. Optimizer state that has its parameter's shape is sharded like it; Adafactor's
factored row/column statistics are vectors and are replicated.

`state_shardings` turns the abstract params (or a train state holding them) into NamedShardings;
initializers jit with them as `out_shardings`, so each device computes only its shard.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize`; each process reads its
own share of the data (`data_shard_info`) and `host_batch_to_global` assembles the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"

Rules = Sequence[tuple[str, str | None]]

LOGICAL_AXIS_RULES: Rules = (
    ("batch", DATA),
    ("vocab", MODEL),
    ("embed", None),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("joined_kv", MODEL),
    ("kv_joined", MODEL),
    ("relpos_buckets", None),
    ("length", None),
)


def create_mesh(model_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all devices of all processes).

    `model_parallel` devices per model replica; the rest of the devices form the data axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the "
                         f"{len(devices)} devices; choose a divisor of {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_parallel,
                                                     model_parallel)
    return Mesh(grid, (DATA, MODEL))


def mesh_axes(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules: Rules = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for an array of `shape` with logical `axes`.

    A dimension is replicated when its rule maps it to no mesh axis, when the mesh axis size does
    not divide it, or when an earlier dimension already uses that mesh axis.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(axes, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def path_keys(path) -> tuple[str, ...]:
    """The dict keys along a pytree path (skipping attribute and sequence entries)."""
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def param_specs(abstract_params, params_axes, mesh: Mesh,
                rules: Rules = LOGICAL_AXIS_RULES) -> dict[tuple[str, ...], P]:
    """{param path: PartitionSpec} from the `params_axes` collection of `Module.init`."""
    logical = nn_partitioning.get_axis_names(params_axes)  # same tree as params, logical specs
    flat_logical = {
        path_keys(path): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(
            logical, is_leaf=lambda x: isinstance(x, P))[0]
    }
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        key = path_keys(path)
        if key not in flat_logical:
            raise ValueError(f"parameter {'/'.join(key)} has no logical axes in params_axes")
        specs[key] = mesh_axes(tuple(flat_logical[key]), leaf.shape, mesh, rules)
    return specs


def tree_shardings(abstract_tree, specs: Mapping[tuple[str, ...], P], mesh: Mesh,
                   shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None):
    """NamedShardings for any tree whose leaves sit under parameter paths (params, optimizer
    state): a leaf whose dict-key path ends with a parameter's path and that has the parameter's
    shape gets the parameter's spec; every other leaf (step counters, factored statistics) is
    replicated."""
    by_suffix = {}
    for key, spec in specs.items():
        by_suffix[key] = (spec, None if shapes is None else shapes[key])

    def sharding(path, leaf):
        keys = path_keys(path)
        for start in range(len(keys)):
            hit = by_suffix.get(keys[start:])
            if hit is not None:
                spec, shape = hit
                if (shape is None or tuple(leaf.shape) == tuple(shape)) and \
                        len(spec) == len(leaf.shape):
                    return NamedSharding(mesh, spec)
                break
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


def state_shardings(abstract_tree, abstract_params, params_axes, mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES):
    """NamedShardings for `abstract_tree` (the params themselves, or a train state holding them
    and their optimizer state), from the params' shapes and their `params_axes` collection."""
    specs = param_specs(abstract_params, params_axes, mesh, rules)
    shapes = {path_keys(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    return tree_shardings(abstract_tree, specs, mesh, shapes)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """Context for tracing model code: the mesh and logical rules that make the modules'
    `with_sharding_constraint` calls take effect."""
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(rules):
        yield


def activation_rules_for(config, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Rules:
    """`rules` with `heads` and `mlp` unsharded when the model axis does not divide them, so that
    activation constraints never ask for uneven shards."""
    model = mesh.shape[MODEL]
    sizes = {"heads": config.num_heads, "mlp": config.mlp_dim}
    return tuple((name, None if name in sizes and sizes[name] % model else axis)
                 for name, axis in rules)


# ---- batches ------------------------------------------------------------------------------------


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The per-process batch size; errors if the data axis or process count does not divide."""
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's data axis "
                         f"({data} = {mesh.devices.size} devices / model_parallel "
                         f"{mesh.shape[MODEL]}); choose a multiple of {data}")
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    return batch_size // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def full_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The whole global batch, held by every process -> global arrays split over `data`."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---- multiple processes -------------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` when a coordinator is given (else nothing: one process)."""
    if coordinator_address is None:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def data_shard_info():
    """seqio.ShardInfo of this process (index, number of processes)."""
    import seqio  # noqa: PLC0415 - keep the mesh code importable without seqio

    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
