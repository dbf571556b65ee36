"""The train state (step, params, optimizer state) and its checkpoints.

A run's `MODEL_DIR` holds orbax checkpoints `checkpoint_<step>/` with three items:
  state/   the TrainState (step, params, Adafactor state), written by every process, sharded
  run/     JSON: {"step", "examples_seen", "batch_size", "task", "shuffle_seed"}; the data
           stream resumes from its iterator state saved beside (`data_stream.py`), or after
           `examples_seen` examples without it
  config/  JSON: the TransformerConfig
orbax writes each checkpoint under a temporary name and renames it when complete, so a process
killed mid-save leaves no checkpoint that looks complete, and the next run resumes from the
previous one. The manager keeps the last `keep` checkpoints plus the best one by a named metric.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gqa_t5x import checkpoints
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.training import partitioning

STEP_PREFIX = checkpoints.STEP_PREFIX.rstrip("_")  # orbax adds the "_"
ITEMS = ("state", "run", "config")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # scalar int32: updates applied so far (continues across uptraining)
    params: Any
    opt_state: Any


def _init_fn(model, tx, input_shapes: Mapping[str, tuple[int, ...]]):
    """rng, params or None -> (TrainState at step 0, the params' logical axes)."""

    def init(rng, given=None):
        variables = model.get_initial_variables(rng, input_shapes)
        p = variables["params"] if given is None else given
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                          opt_state=tx.init(p)), variables["params_axes"]

    return init


def abstract_train_state(model, tx, mesh, input_shapes: Mapping[str, tuple[int, ...]],
                         seed: int = 0):
    """(TrainState of ShapeDtypeStructs carrying their shardings, the shardings); nothing is
    allocated. The first is the restore target orbax needs."""
    abstract, params_axes = jax.eval_shape(_init_fn(model, tx, input_shapes),
                                           jax.random.PRNGKey(seed))
    shardings = partitioning.state_shardings(abstract, abstract.params, params_axes, mesh,
                                             partitioning.rules_for(model.config, mesh))
    return abstract_with_shardings(shardings, abstract), shardings


def create_train_state(model, tx, mesh, input_shapes: Mapping[str, tuple[int, ...]], seed: int,
                       params=None):
    """A sharded TrainState: params from `model.get_initial_variables(PRNGKey(seed))` (or the
    given `params`, e.g. an initial checkpoint), fresh optimizer state, step 0.

    Returns (state, shardings). The initializer is jitted with `out_shardings`, so every array is
    created directly in its shards and nothing is materialized on one device first.
    """
    _, shardings = abstract_train_state(model, tx, mesh, input_shapes, seed)
    init = _init_fn(model, tx, input_shapes)
    if params is not None:
        params = jax.device_put(params, shardings.params)
    state = jax.jit(lambda rng, given: init(rng, given)[0],
                    out_shardings=shardings)(jax.random.PRNGKey(seed), params)
    return state, shardings


def abstract_with_shardings(shardings, abstract):
    """ShapeDtypeStructs carrying `shardings`, the restore target orbax needs."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def checkpoint_manager(model_dir: str, *, keep: int = 3, best_metric: str | None = None,
                       best_mode: str = "max", read_only: bool = False) -> ocp.CheckpointManager:
    """orbax CheckpointManager over `model_dir/checkpoint_<step>`: keeps the latest `keep`, and
    with `best_metric` the best checkpoint by that metric (`best_mode` "max" or "min")."""
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode={best_mode!r} must be 'max' or 'min'")
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        step_prefix=STEP_PREFIX,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(os.path.abspath(model_dir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, run: Mapping[str, Any],
         config: TransformerConfig, metrics: Mapping[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        run=ocp.args.JsonSave(dict(run)),
        config=ocp.args.JsonSave(config.to_dict()),
    ), metrics=dict(metrics) if metrics else None, force=True)


def restore(manager: ocp.CheckpointManager, step: int, target_state: TrainState):
    """(state, run info) of checkpoint `step`, restored into the shardings of `target_state`
    (a TrainState of ShapeDtypeStructs with shardings)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state),
        run=ocp.args.JsonRestore(),
    ))
    return restored.state, dict(restored.run)


def restore_newest_readable(manager: ocp.CheckpointManager, model_dir: str, target_state,
                            check_config, report) -> tuple[Any, dict[str, Any], int] | None:
    """(state, run info, step) of the newest checkpoint in `model_dir` that restores; None if
    the folder has no checkpoint.

    A newer checkpoint that does not restore (a truncated file, a missing metadata file: a disk
    fault or a copy cut short) is `report`ed with the reason and, once an older one restores,
    moved aside to `unreadable_checkpoint_<step>/` (kept for a look, never deleted; the run then
    saves that step again). If none restores, ValueError lists them. `check_config(config,
    path)` vets each checkpoint's model before its state is read.
    """
    unreadable: list[tuple[str, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        path = step_dir(model_dir, step)
        try:
            config = read_config(path)
        except Exception as e:  # orbax and tensorstore raise many types for a damaged file
            unreadable.append((path, checkpoints.run_checkpoint_problem(path, e)))
            continue
        check_config(config, path)
        try:
            state, run = restore(manager, step, target_state)
        except Exception as e:
            unreadable.append((path, checkpoints.run_checkpoint_problem(path, e)))
            continue
        for bad, why in unreadable:
            aside = os.path.join(os.path.dirname(bad), "unreadable_" + os.path.basename(bad))
            if jax.process_index() == 0:
                os.rename(bad, aside)
            report(f"{bad} is unreadable ({why}); moved it to {aside}, resuming from the "
                   f"newest complete checkpoint, {path}")
        if unreadable:
            manager.reload()
        return state, dict(run), step
    if unreadable:
        raise ValueError(f"MODEL_DIR {model_dir} has no readable checkpoint: " + "; ".join(
            f"{p}: {why}" for p, why in unreadable) + ". Move them away to start afresh, or "
            "use another MODEL_DIR")
    return None


def step_dir(model_dir: str, step: int) -> str:
    return checkpoints.step_dir(os.path.abspath(model_dir), step)


def latest_checkpoint_dir(model_dir: str) -> str | None:
    """The newest complete `checkpoint_<step>` under `model_dir`, or None."""
    latest = checkpoints.latest_run_checkpoint(model_dir)
    return os.path.abspath(latest) if latest is not None else None


def read_train_checkpoint(path: str, shardings=None) -> tuple[Any, TransformerConfig, int]:
    """(params, config, step) of a `checkpoint_<step>` directory; the optimizer state is not read.

    With `shardings` (a params tree of NamedShardings) the params are restored into them,
    otherwise onto the first local device.
    """
    path = os.path.abspath(path)
    if not checkpoints.is_run_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (state/, config/ "
                                "and run/)")
    config = read_config(path)
    state_dir = os.path.join(path, "state")
    with ocp.PyTreeCheckpointer() as ckpt:
        params_meta = ckpt.metadata(state_dir).item_metadata.tree["params"]
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: device, params_meta)
        item = {
            "params": jax.tree_util.tree_map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), params_meta,
                shardings),
            "step": jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=jax.sharding.
                                         SingleDeviceSharding(jax.local_devices()[0])),
        }
        restored = ckpt.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    return restored["params"], config, int(restored["step"])


def read_config(path: str) -> TransformerConfig:
    """The TransformerConfig saved in checkpoint directory `path`."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
        return TransformerConfig.from_dict(ckpt.restore(os.path.join(os.path.abspath(path),
                                                                     "config")))


def read_params(path: str, shardings=None) -> tuple[Any, TransformerConfig | None, int]:
    """(params, config or None, step) from any checkpoint a run can start from or evaluate:

    - a training checkpoint `checkpoint_<step>/` (this module), or a model dir holding them
      (the newest is read);
    - a params checkpoint of `gqa_t5x.checkpoints` (converted or imported models).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (INITIAL_CHECKPOINT_PATH / "
                                "CHECKPOINT_PATH)")
    run_checkpoint = checkpoints.resolve_run_checkpoint(path)
    if run_checkpoint is not None:
        return read_train_checkpoint(run_checkpoint, shardings)
    from gqa_t5x.checkpoints import t5x as t5x_checkpoints  # noqa: PLC0415 - other formats

    reader = checkpoints.open_checkpoint(path)
    shapes = reader.shapes()
    params = t5x_checkpoints.unflatten({p: np.asarray(reader.read(p)) for p in shapes})
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return params, reader.config, int(getattr(reader, "step", 0) or 0)
