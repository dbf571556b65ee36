"""Device mesh, logical axis rules, sharded creation of train state, and batch placement.

The mesh has two axes, `data` (batch) and `model` (heads, MLP width, vocabulary). Every parameter
carries logical axis names (`layers.py`); `LOGICAL_AXIS_RULES` maps them to mesh axes, in this one
place, and `rules_for` adapts them to a model: query heads and kv heads are sharded whole over
`model` when their count is divisible by it and replicated otherwise (an MQA or GQA-2 key kernel
[D, K*H] on model=8 is replicated, the usual practice for MQA under tensor parallelism, instead of
splitting a head over devices and resharding keys, values and cache at every layer). Any other
dimension that the mesh axis does not divide is replicated too, so any head count runs on any
mesh. Optimizer state that has its parameter's shape is sharded like it; Adafactor's
factored row/column statistics are vectors and are replicated.

`state_shardings` turns the abstract params (or a train state holding them) into NamedShardings;
initializers jit with them as `out_shardings`, so each device computes only its shard.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize`. Data is fed per model
replica, not per process (t5x's `DataLayout`): `data_layout` finds the rows of the global batch
that this process's devices hold (their index on the `data` axis), so processes that hold the same
replica (model parallelism wider than a host) read the same data shard, and `host_batch_to_global`
places this process's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.experimental import mesh_utils
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
    ("kv_heads", MODEL),
    ("head_dim", None),
    ("relpos_buckets", None),
    ("length", None),
    ("layers", None),  # the stacked-layer axis of a scanned model (model/scan.py)
)

def create_mesh(model_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all devices of all processes).

    `model_parallel` devices per model replica; the rest of the devices form the data axis. The
    grid comes from `mesh_utils.create_device_mesh`, which on TPU places each model replica on
    physically adjacent chips (on CPU and GPU it keeps the device order).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the "
                         f"{len(devices)} devices; choose a divisor of {len(devices)}")
    shape = (len(devices) // model_parallel, model_parallel)
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
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


def rules_for(config, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Rules:
    """`rules` for `config` on `mesh`: the head axes (and `mlp`) are unsharded when the model axis
    does not divide the number of heads (of MLP units), so that parameters, activations and
    caches are split by whole heads or not at all. The kv axes are those of the grouped
    attentions (num_kv_heads); the others have num_heads kv heads and use the query axes
    (`attention.kv_axes`)."""
    model = mesh.shape[MODEL]
    counts = {"heads": config.num_heads, "joined_kv": config.num_heads,
              "kv_heads": config.num_kv_heads, "kv_joined": config.num_kv_heads,
              "mlp": config.mlp_dim}
    return tuple((name, None if name in counts and counts[name] % model else axis)
                 for name, axis in rules)


# ---- batches ------------------------------------------------------------------------------------


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Errors unless the mesh's data axis divides `batch_size`."""
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's data axis "
                         f"({data} = {mesh.devices.size} devices / model_parallel "
                         f"{mesh.shape[MODEL]}); choose a multiple of {data}")


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which rows of the global batch one process feeds: rows
    [shard_id * per_host_batch_size, (shard_id + 1) * per_host_batch_size), read from data shard
    `shard_id` of `num_shards`. Processes holding the same model replicas share a shard."""

    batch_size: int  # global
    shard_id: int
    num_shards: int

    @property
    def per_host_batch_size(self) -> int:
        return self.batch_size // self.num_shards

    @property
    def first_row(self) -> int:
        return self.shard_id * self.per_host_batch_size

    def shard_info(self):
        """seqio.ShardInfo for this process's data, None when there is one shard."""
        if self.num_shards == 1:
            return None
        import seqio  # noqa: PLC0415 - keep the mesh code importable without seqio

        return seqio.ShardInfo(index=self.shard_id, num_shards=self.num_shards)


def data_layout(mesh: Mesh, batch_size: int, process_index: int | None = None) -> DataLayout:
    """The DataLayout of `process_index` (default: this process) from the mesh.

    A process's devices sit at some indices of the `data` axis; processes whose devices sit at
    the same indices hold the same model replicas and must feed the same rows. The distinct index
    sets, in order, are the shards; they must be contiguous, disjoint and of one size.
    """
    check_batch_size(batch_size, mesh)
    process_index = jax.process_index() if process_index is None else process_index
    grid = mesh.devices  # [data, model]
    rows_of: dict[int, set[int]] = {}
    for (row, _), device in np.ndenumerate(grid):
        rows_of.setdefault(device.process_index, set()).add(row)
    if process_index not in rows_of:
        raise ValueError(f"process {process_index} holds no device of the mesh")
    groups = sorted({tuple(sorted(r)) for r in rows_of.values()})
    for rows in groups:
        if rows != tuple(range(rows[0], rows[0] + len(rows))) or len(rows) != len(groups[0]):
            raise ValueError(f"the processes' devices cover data-axis rows {groups}: each process "
                             "must hold whole model replicas in one contiguous block of rows of "
                             "one size, or whole replicas shared with other processes; choose "
                             "model_parallel to divide or be a multiple of the devices per host")
    if len({r for rows in groups for r in rows}) != sum(len(rows) for rows in groups):
        raise ValueError(f"the processes' devices cover overlapping data-axis rows {groups}; "
                         "choose model_parallel to divide or be a multiple of the devices per "
                         "host")
    shard_id = groups.index(tuple(sorted(rows_of[process_index])))
    return DataLayout(batch_size=batch_size, shard_id=shard_id, num_shards=len(groups))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         layout: DataLayout) -> dict[str, jax.Array]:
    """This process's rows of the global batch (`layout`) -> global arrays split over `data`."""
    sharding = batch_sharding(mesh)
    lo, n = layout.first_row, layout.per_host_batch_size
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] != n:
            raise ValueError(f"batch feature {k!r} has {v.shape[0]} rows; this process feeds "
                             f"{n} (global batch {layout.batch_size} / {layout.num_shards} "
                             "data shards)")

        def rows(idx, v=v):
            start = idx[0].start or 0
            stop = layout.batch_size if idx[0].stop is None else idx[0].stop
            return v[(slice(start - lo, stop - lo),) + tuple(idx[1:])]

        out[k] = jax.make_array_from_callback((layout.batch_size,) + v.shape[1:], sharding, rows)
    return out


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
