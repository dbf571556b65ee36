"""Reading t5x checkpoints, one array at a time, and the zarr array layout they share with orbax.

t5x writes a checkpoint directory `checkpoint_<step>/` in one of two formats.

Legacy (t5x.checkpoints.Checkpointer, what the public T5.1.1 checkpoints use):
  checkpoint_<step>/checkpoint      msgpack (flax.serialization) of {"version": 3, "optimizer":
                                    {"target": params, "state": {"step", "param_states"}}}
  checkpoint_<step>/target.encoder.layers_0.attention.key.kernel/   one zarr v2 array per leaf
  checkpoint_<step>/state.param_states.encoder....v_row/           (optimizer state, likewise)
  In the msgpack, a leaf written to tensorstore is replaced by its tensorstore spec as a dict,
  {"driver": "zarr", "kvstore": {"driver": "file" or "gcs", "path": "target.encoder...."},
   "metadata": {...}}, whose kvstore path is relative to the checkpoint directory (t5x makes it
  absolute on restore; copies from GCS keep `"driver": "gcs"`). Small leaves (the step) are
  stored in the msgpack itself as arrays.

Orbax (t5x with orbax, and orbax's PyTree checkpointer in general):
  a directory holding `_METADATA` and either one zarr array per leaf named by the dotted key path
  (non-OCDBT), or a single OCDBT key-value store (`manifest.ocdbt`, `d/`, `ocdbt.process_*/`) that
  holds those same zarr arrays under the same names. The tree is {"target": params, "state": ...}
  for t5x, and may sit in a `state/` item folder under `checkpoint_<step>/`.

Both readers find the arrays by listing the store, not by parsing `_METADATA`, whose schema
changes between orbax versions, and return params under t5x's names (see network.py), as float32
numpy arrays.

A t5x checkpoint holds no model config: `infer_config_from_shapes` recovers it from the
parameter shapes (all but `relative_attention_max_distance`, which keeps T5's 128).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from gqa_t5x.model.config import ATTENTION_KINDS, DEFAULT_GROUPED, TransformerConfig

Path = tuple[str, ...]

# t5x's target chunk size for the arrays it writes (t5x.checkpoints._DESIRED_CHUNK_SIZE_BYTES).
CHUNK_BYTES = 64 * 1024 * 1024
LEGACY_VERSION = 3
_ZARR_FILES = {".zarray": "zarr", "zarr.json": "zarr3"}


# ---- zarr arrays through tensorstore ------------------------------------------------------------


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int | None = None):
    """Chunks of whole trailing rows with at most `chunk_bytes` (default CHUNK_BYTES) per chunk,
    at least one row."""
    if not shape:
        return ()
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    rows = max(1, min(shape[0], chunk_bytes // max(row, 1)))
    return (rows,) + tuple(shape[1:])


def zarr_metadata(shape, dtype) -> dict[str, Any]:
    """The zarr v2 metadata this package writes: no compression (weights do not compress)."""
    dtype = np.dtype(dtype)
    return {"shape": list(shape), "chunks": list(chunk_shape(tuple(shape), dtype.itemsize)),
            "compressor": None}


def write_zarr(directory: str, array: np.ndarray) -> dict[str, Any]:
    """Write `array` as a zarr v2 array in `directory`, one chunk at a time, so that no copy of
    the whole array is made. Returns the metadata written."""
    array = np.asarray(array)
    metadata = zarr_metadata(array.shape, array.dtype)
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": directory},
                     "dtype": array.dtype.name, "metadata": metadata},
                    create=True, delete_existing=True).result()
    if array.ndim == 0:
        store.write(array).result()
        return metadata
    rows = metadata["chunks"][0]
    for start in range(0, array.shape[0], rows):
        stop = min(start + rows, array.shape[0])  # tensorstore rejects out-of-bounds slices
        store[start:stop].write(array[start:stop]).result()
    return metadata


def read_zarr(spec: Mapping[str, Any], dtype=np.float32) -> np.ndarray:
    """Read a whole zarr array given a tensorstore spec; cast to `dtype` (None keeps it).

    Reads one block of whole chunks along the first axis at a time into the result, so the
    memory beyond the result is about one block (at least `CHUNK_BYTES`), not a second copy.
    """
    try:
        store = ts.open(dict(spec), open=True, read=True).result()
        native = np.dtype(store.dtype.numpy_dtype)
        out = np.empty(store.shape, dtype or native)
        if store.ndim == 0 or out.size == 0:
            out[...] = store.read().result()
            return out
        chunk_rows = store.chunk_layout.read_chunk.shape[0] or 1
        row_bytes = max(1, out[0].size * native.itemsize)
        rows = chunk_rows * max(1, CHUNK_BYTES // (chunk_rows * row_bytes))  # whole chunks
        for start in range(0, store.shape[0], rows):
            stop = min(start + rows, store.shape[0])  # tensorstore rejects out-of-bounds slices
            out[start:stop] = store[start:stop].read().result()
    except ValueError as e:
        raise ValueError(f"cannot read array at {_spec_location(spec)}: {e}") from e
    return out


def zarr_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    try:
        return tuple(ts.open(dict(spec), open=True).result().shape)
    except ValueError as e:
        raise ValueError(f"cannot open array at {_spec_location(spec)}: {e}") from e


def _spec_location(spec: Mapping[str, Any]) -> str:
    kv = spec.get("kvstore", {})
    if kv.get("driver") == "ocdbt":
        return f"{kv.get('base')} (OCDBT) {kv.get('path')}"
    return str(kv.get("path", spec))


# ---- readers ------------------------------------------------------------------------------------


class CheckpointReader:
    """Parameters of a checkpoint, readable one array at a time.

    `shapes()` maps each param path (t5x names) to its shape; `read(path)` returns that array as
    float32 numpy. `config` is the checkpoint's TransformerConfig, or None where the format holds
    none; `step` is the training step recorded in it (0 if none).
    """

    format = "?"

    def __init__(self, path: str):
        self.path = path
        self.config: TransformerConfig | None = None
        self.step = 0

    def shapes(self) -> dict[Path, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> dict[str, Any]:
        """The whole param tree as a nested dict (needs memory for all of it)."""
        return unflatten({p: self.read(p) for p in self.shapes()})


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _params_prefix(paths) -> Path:
    """Where the params sit in a t5x or orbax tree: under target/, under params/, or at the top."""
    tops = {p[0] for p in paths if p}
    for key in ("target", "params"):
        if key in tops:
            return (key,)
    return ()


class OrbaxTreeReader(CheckpointReader):
    """An orbax PyTree checkpoint (OCDBT or one zarr folder per array, zarr v2 or v3)."""

    format = "orbax"

    def __init__(self, directory: str):
        super().__init__(directory)
        self.directory = os.path.abspath(directory)
        self.ocdbt = is_ocdbt(self.directory)
        self._specs: dict[Path, dict[str, Any]] = {}
        for name, driver in self._list_arrays():
            self._specs[tuple(name.split("."))] = self._spec(name, driver)
        if not self._specs:
            raise ValueError(f"no arrays found in the orbax checkpoint {directory}")
        prefix = _params_prefix(self._specs)
        self._params = {p[len(prefix):]: s for p, s in self._specs.items()
                        if p[:len(prefix)] == prefix}
        if ("state", "step") in self._specs:
            self.step = int(read_zarr(self._specs[("state", "step")], dtype=None))

    def _list_arrays(self):
        if self.ocdbt:
            kv = ts.KvStore.open({"driver": "ocdbt", "base": _file_url(self.directory)}).result()
            for key in kv.list().result():
                name, _, leaf = key.decode().rpartition("/")
                if leaf in _ZARR_FILES and name:
                    yield name, _ZARR_FILES[leaf]
        else:
            for name in sorted(os.listdir(self.directory)):
                for leaf, driver in _ZARR_FILES.items():
                    if os.path.isfile(os.path.join(self.directory, name, leaf)):
                        yield name, driver

    def _spec(self, name: str, driver: str) -> dict[str, Any]:
        if self.ocdbt:
            kv = {"driver": "ocdbt", "base": _file_url(self.directory), "path": name}
        else:
            kv = {"driver": "file", "path": os.path.join(self.directory, name)}
        return {"driver": driver, "kvstore": kv}

    def shapes(self):
        return {p: zarr_shape(s) for p, s in self._params.items()}

    def read(self, path: Path) -> np.ndarray:
        if path not in self._params:
            raise KeyError(f"{'/'.join(path)} is not in the checkpoint {self.path}")
        return read_zarr(self._params[path])


def _file_url(directory: str) -> str:
    return "file://" + os.path.abspath(directory)


def is_ocdbt(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "manifest.ocdbt")) or any(
        n.startswith("ocdbt.process_") for n in os.listdir(directory))


def is_orbax_tree(directory: str) -> bool:
    """Whether `directory` itself holds an orbax PyTree (not a folder of steps)."""
    if not os.path.isdir(directory):
        return False
    if os.path.exists(os.path.join(directory, "_METADATA")) or is_ocdbt(directory):
        return True
    return any(os.path.isfile(os.path.join(directory, n, leaf))
               for n in os.listdir(directory) for leaf in _ZARR_FILES)


class T5xLegacyReader(CheckpointReader):
    """A t5x legacy checkpoint: `checkpoint` msgpack plus one zarr folder per large array."""

    format = "t5x_legacy"

    def __init__(self, directory: str):
        super().__init__(directory)
        from flax import serialization

        self.directory = os.path.abspath(directory)
        msgpack_file = os.path.join(self.directory, "checkpoint")
        with open(msgpack_file, "rb") as f:
            try:
                contents = serialization.msgpack_restore(f.read())
            except Exception as e:  # msgpack raises several unrelated types
                raise ValueError(f"{msgpack_file} is not a t5x msgpack checkpoint: {e}") from e
        if not isinstance(contents, dict):
            raise ValueError(f"{msgpack_file} does not hold a dict")
        state = contents.get("optimizer", contents)
        if "target" not in state:
            raise ValueError(f"{msgpack_file} has no 'target' (params); top-level keys: "
                             f"{sorted(contents)}")
        self._leaves = _leaves(state["target"])
        step = state.get("state", {}).get("step") if isinstance(state.get("state"), dict) else None
        if step is not None:
            self.step = int(np.asarray(self._value(step)))

    def _value(self, leaf, dtype=None):
        if _is_spec(leaf):
            return read_zarr(self._local_spec(leaf), dtype=dtype)
        array = np.asarray(leaf)
        return array if dtype is None else array.astype(dtype)

    def _local_spec(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The spec pointed at this directory: relative paths joined to it, paths from elsewhere
        (another machine, GCS) replaced by the folder of the same name here."""
        kv = spec.get("kvstore") if isinstance(spec.get("kvstore"), dict) else {}
        rel = kv.get("path", spec.get("path"))
        if rel is None:
            raise ValueError(f"tensorstore spec without a path in {self.directory}: {spec}")
        path = rel if os.path.isabs(rel) else os.path.join(self.directory, rel)
        if not os.path.isdir(path):
            path = os.path.join(self.directory, os.path.basename(rel.rstrip("/")))
        if not os.path.isdir(path):
            raise ValueError(f"array folder {rel!r} named in {self.directory}/checkpoint does "
                             f"not exist in {self.directory}")
        return {"driver": spec.get("driver", "zarr"), "kvstore": {"driver": "file", "path": path}}

    def shapes(self):
        return {p: (zarr_shape(self._local_spec(v)) if _is_spec(v) else tuple(np.shape(v)))
                for p, v in self._leaves.items()}

    def read(self, path: Path) -> np.ndarray:
        if path not in self._leaves:
            raise KeyError(f"{'/'.join(path)} is not in the checkpoint {self.path}")
        return self._value(self._leaves[path], dtype=np.float32)


def _is_spec(x) -> bool:
    return isinstance(x, Mapping) and "driver" in x and ("kvstore" in x or "path" in x)


def _leaves(tree, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and not _is_spec(value):
            out.update(_leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def is_t5x_legacy(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "checkpoint"))


def resolve_t5x_dir(path: str) -> str:
    """The checkpoint folder for `path`: itself, its `state/` item, or its latest
    `checkpoint_<step>` (for a run's output folder)."""
    if is_t5x_legacy(path):
        return path
    if os.path.isdir(os.path.join(path, "state")) and is_orbax_tree(os.path.join(path, "state")):
        return os.path.join(path, "state")
    if is_orbax_tree(path):
        return path
    steps = []
    if os.path.isdir(path):
        steps = [(int(m.group(1)), n) for n in os.listdir(path)
                 if (m := re.fullmatch(r"checkpoint_(\d+)", n))]
    if steps:
        return resolve_t5x_dir(os.path.join(path, max(steps)[1]))
    raise ValueError(f"{path} is not a t5x checkpoint: no 'checkpoint' msgpack file, no orbax "
                     f"tree (_METADATA, manifest.ocdbt or zarr arrays) and no checkpoint_<step> "
                     f"folder")


def open_t5x(path: str) -> CheckpointReader:
    """A reader for a t5x checkpoint in either format (see the module docstring)."""
    directory = resolve_t5x_dir(path)
    if is_t5x_legacy(directory):
        return T5xLegacyReader(directory)
    reader = OrbaxTreeReader(directory)
    reader.format = "t5x_orbax"
    return reader


# ---- writing t5x's legacy msgpack ---------------------------------------------------------------


def legacy_spec(name: str, metadata: Mapping[str, Any], dtype) -> dict[str, Any]:
    """The msgpack leaf t5x writes for an array stored in the zarr folder `name`."""
    return {"driver": "zarr", "dtype": np.dtype(dtype).name,
            "kvstore": {"driver": "file", "path": name},
            "metadata": {**metadata, "dtype": np.dtype(dtype).str}}


def write_legacy_msgpack(directory: str, target_specs: Mapping[Path, Mapping[str, Any]],
                         step: int = 0) -> None:
    """Write t5x's `checkpoint` msgpack for params already stored as zarr folders in `directory`.

    `target_specs` maps each param path to its `legacy_spec`. The optimizer state holds only the
    step: t5x restores it with `fallback_to_scratch=True` (see checkpoints.py).
    """
    from flax import serialization

    state = {"version": LEGACY_VERSION,
             "optimizer": {"target": unflatten(target_specs),
                           "state": {"step": np.asarray(step, np.int32)}}}
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))


# ---- config from shapes -------------------------------------------------------------------------


def infer_config_from_shapes(shapes: Mapping[Path, tuple[int, ...]],
                             **overrides: Any) -> TransformerConfig:
    """The TransformerConfig whose param shapes these are (t5x names, see network.py).

    V and D from the embedding, N and the buckets from a relative position table, H from a query
    kernel (columns / N), F from wi_0, the layer counts from the layer names and each attention's
    kv heads from its key kernel. `relative_attention_max_distance` (not stored) defaults to 128;
    `overrides` set any field.
    """
    def need(path: Path) -> tuple[int, ...]:
        if path not in shapes:
            raise ValueError(f"cannot infer the config: {'/'.join(path)} is missing; pass the "
                             f"config (--model_preset or --config_json)")
        return tuple(shapes[path])

    def layers(stack):
        return len({p[1] for p in shapes if p[0] == stack and p[1].startswith("layers_")})

    v, d = need(("token_embedder", "embedding"))
    enc, dec = layers("encoder"), layers("decoder")
    n, buckets = need(("encoder" if enc else "decoder", "relpos_bias", "rel_embedding"))
    first = {"encoder_self": ("encoder", "layers_0", "attention"),
             "decoder_self": ("decoder", "layers_0", "self_attention"),
             "cross": ("decoder", "layers_0", "encoder_decoder_attention")}
    present = [k for k in ATTENTION_KINDS if (enc if k == "encoder_self" else dec)]
    if not present:
        raise ValueError("cannot infer the config: the checkpoint has no layers")
    nh = need(first[present[0]] + ("query", "kernel"))[1]
    if nh % n:
        raise ValueError(f"cannot infer the config: query kernel width {nh} is not a multiple of "
                         f"{n} heads (from rel_embedding)")
    h = nh // n
    stack0 = ("encoder", "layers_0") if enc else ("decoder", "layers_0")
    f = need(stack0 + ("mlp", "wi_0", "kernel"))[1]
    kv = {k: need(first[k] + ("key", "kernel"))[1] // h for k in present}
    grouped = tuple(k for k in present if kv[k] != n)
    kv_values = {kv[k] for k in grouped}
    if len(kv_values) > 1:
        raise ValueError(f"cannot infer the config: grouped attentions have different kv head "
                         f"counts {kv}; a TransformerConfig has one num_kv_heads")
    fields = dict(vocab_size=v, emb_dim=d, num_heads=n, num_kv_heads=kv_values.pop() if kv_values
                  else n, head_dim=h, mlp_dim=f, num_encoder_layers=enc, num_decoder_layers=dec,
                  relative_attention_num_buckets=buckets, grouped=grouped or DEFAULT_GROUPED)
    fields.update(overrides)
    return TransformerConfig(**fields)


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
