"""Checkpoint I/O: our own checkpoints, and readers for t5x and Hugging Face T5.1.1 checkpoints.

Every reader is a `CheckpointReader` (see t5x_checkpoints.py): `shapes()` and `read(path)` give
the params under t5x's names one array at a time, as float32 numpy, so a converter can stream a
checkpoint much larger than memory. `open_checkpoint` picks the reader from the folder.

Our checkpoint layout (`CheckpointWriter`, `save_checkpoint`, `load_checkpoint`; `gqa-convert`
writes it too):

  <dir>/config.json              the TransformerConfig (TransformerConfig.to_json)
  <dir>/checkpoint_<step>/       a t5x legacy checkpoint (format version 3, see t5x_checkpoints.py):
    checkpoint                   msgpack of {"version": 3, "optimizer": {"target": <specs>,
                                 "state": {"step": step}}}, each spec naming a zarr folder here
    target.<dotted path>/        one zarr v2 array per parameter, e.g.
                                 `target.decoder.layers_0.self_attention.key.kernel`

Our readers accept either `<dir>` or `<dir>/checkpoint_<step>` (the config is read from the
parent). The step folder is what t5x restores: to start a t5x fine-tuning or uptraining run from
it, t5x needs the path `<dir>/checkpoint_<step>` (t5x reads the step from the folder name), the
model built with the same config (grouped key/value kernels [D, K*H] in the grouped attentions,
e.g. this package's gin files), and `utils.RestoreCheckpointConfig(mode="specific",
dtype="float32", strict=False, fallback_to_scratch=True)` with the assignment map of
`gin/t5x/uptrain.gin`, `((r"state/param_states.*", None),)`: the checkpoint holds no optimizer
state, which t5x then initializes afresh (as its sparse-upcycling recipe does), and t5x accepts
`fallback_to_scratch` only with such a state transformation. The step continues from the source
step, so the learning-rate schedule continues too. The folder holds no orbax `_METADATA`: t5x
would take it for an orbax checkpoint and look for a `state/` item. t5x is not a dependency, so
the tests check the layout with tensorstore and flax's msgpack, not with t5x itself.

Hugging Face checkpoints are read directly, without transformers: `config.json` through
`config_from_hf_t5`, weights from `model.safetensors` (parsed by header, one tensor per read) or
`pytorch_model.bin` (torch.load with mmap), sharded variants through their `*.index.json`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.checkpoints.hf import config_from_hf_t5, params_from_hf_t5  # noqa: F401
from gqa_t5x.checkpoints.t5x import (
    CheckpointReader,
    OrbaxTreeReader,
    Path,
    T5xLegacyReader,
    is_t5x_legacy,
    legacy_spec,
    open_t5x,
    read_json,
    resolve_t5x_dir,
    write_legacy_msgpack,
    write_zarr,
)
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.shapes import check_shapes, param_shapes

FORMATS = ("gqa_t5x", "t5x", "hf")
CONFIG_FILE = "config.json"
STEP_PREFIX = "checkpoint_"
_STEP_DIR = re.compile(r"checkpoint_(\d+)")


# ---- our format ---------------------------------------------------------------------------------


class CheckpointWriter:
    """Writes our checkpoint one array at a time; `close()` writes the msgpack and the config.

    Arrays go to disk (`<directory>/checkpoint_<step>/`) as they come, so memory holds one array
    at a time. Until `close()` the folder has no `checkpoint` msgpack or `config.json` and no
    reader accepts it.
    """

    def __init__(self, directory: str, config: TransformerConfig, step: int = 0):
        self.directory = directory
        self.config = config
        self.step = int(step)
        self.step_dir = step_dir(directory, self.step)
        os.makedirs(self.step_dir, exist_ok=True)
        self._specs: dict[Path, dict[str, Any]] = {}
        self._expected = param_shapes(config)

    def write(self, path: Path, array) -> None:
        """Store one parameter (float32 numpy or anything np.asarray takes)."""
        path = tuple(path)
        if path not in self._expected:
            raise ValueError(f"{'/'.join(path)} is not a parameter of the config")
        array = np.asarray(array)
        if array.shape != self._expected[path]:
            raise ValueError(f"{'/'.join(path)} has shape {array.shape}, expected "
                             f"{self._expected[path]}")
        name = ".".join(("target",) + path)
        metadata = write_zarr(os.path.join(self.step_dir, name), array)
        self._specs[path] = legacy_spec(name, metadata, array.dtype)

    def close(self) -> None:
        check_shapes({p: tuple(s["metadata"]["shape"]) for p, s in self._specs.items()},
                     self._expected, where=f"checkpoint written to {self.step_dir}")
        write_legacy_msgpack(self.step_dir, self._specs, self.step)
        with open(os.path.join(self.directory, CONFIG_FILE), "w") as f:
            f.write(self.config.to_json())


def save_checkpoint(directory: str, params: Mapping[str, Any], config: TransformerConfig,
                    step: int = 0) -> None:
    """Write `params` (nested dict of arrays, t5x names) and `config` to `directory`."""
    writer = CheckpointWriter(directory, config, step)
    for path, array in _leaf_items(params):
        writer.write(path, np.asarray(array, np.float32))
    writer.close()


def _leaf_items(tree: Mapping[str, Any], prefix: Path = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_items(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def step_dir(directory: str, step: int) -> str:
    """`<directory>/checkpoint_<step>`: the folder t5x restores; it reads the step from the
    name."""
    return os.path.join(directory, f"{STEP_PREFIX}{int(step)}")


def _is_our_config(directory: str) -> bool:
    config_file = os.path.join(directory, CONFIG_FILE)
    return os.path.isfile(config_file) and "emb_dim" in read_json(config_file)


def resolve_gqa_checkpoint(path: str) -> tuple[str, str] | None:
    """(folder holding config.json, its checkpoint_<step> folder) for our checkpoint at `path`,
    given either of the two; the newest complete step where there are several; None if `path`
    is not our checkpoint."""
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        return None
    match = _STEP_DIR.fullmatch(os.path.basename(path))
    if match and is_t5x_legacy(path) and _is_our_config(os.path.dirname(path)):
        return os.path.dirname(path), path
    if not _is_our_config(path):
        return None
    steps = [(int(m.group(1)), os.path.join(path, n)) for n in os.listdir(path)
             if (m := _STEP_DIR.fullmatch(n)) and is_t5x_legacy(os.path.join(path, n))]
    return (path, max(steps)[1]) if steps else None


class GqaCheckpointReader(T5xLegacyReader):
    """Our checkpoint (see the module docstring), given as `<dir>` or `<dir>/checkpoint_<step>`;
    `config` comes from `<dir>/config.json`, `step` from the msgpack."""

    def __init__(self, path: str):
        resolved = resolve_gqa_checkpoint(path)
        if resolved is None:
            raise ValueError(f"{path} is not a gqa_t5x checkpoint: expected {CONFIG_FILE} (a "
                             f"TransformerConfig) beside a {STEP_PREFIX}<step>/ folder holding a "
                             f"'checkpoint' msgpack")
        root, directory = resolved
        config_file = os.path.join(root, CONFIG_FILE)
        try:
            config = TransformerConfig.from_dict(read_json(config_file))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_file} is not a valid TransformerConfig: {e}") from e
        super().__init__(directory)
        self.path = path
        self.format = "gqa_t5x"
        self.config = config


class RunCheckpointReader(OrbaxTreeReader):
    """A training run's orbax checkpoint (`train_state.py`): `<MODEL_DIR>/checkpoint_<step>/` with
    `state/` (params, optimizer state), `config/` (the TransformerConfig as JSON) and `run/`
    (JSON with the step). Given the run's MODEL_DIR, the newest complete step is read, and
    `skipped` says why each newer one was not. Only the params are read; the optimizer state is
    left alone."""

    def __init__(self, path: str):
        directory = resolve_run_checkpoint(path)
        if directory is None:
            raise ValueError(f"{path} is not a training checkpoint: expected "
                             f"{STEP_PREFIX}<step>/ with state/, config/ and run/")
        self.skipped = [f"{p}: {why}" for p, why in skipped_run_checkpoints(path)
                        if p != directory]
        try:
            super().__init__(os.path.join(directory, "state"))
            self.config = TransformerConfig.from_dict(
                read_json(os.path.join(directory, "config", "metadata")))
            self.step = int(read_json(os.path.join(directory, "run", "metadata"))["step"])
        except Exception as e:  # tensorstore and json raise many types for a damaged file
            raise _unreadable(directory, e) from None
        self.path = path
        self.format = "gqa_t5x"
        self.run_directory = directory

    def read(self, path: Path) -> np.ndarray:
        try:
            return super().read(path)
        except Exception as e:
            raise _unreadable(self.run_directory, e) from None


def _unreadable(directory: str, error: Exception) -> ValueError:
    return ValueError(f"training checkpoint {directory} is unreadable "
                      f"({run_checkpoint_problem(directory, error)}); give an earlier "
                      f"{STEP_PREFIX}<step>/ folder as the input")


_RUN_CHECKPOINT_FILES = ("config/metadata", "run/metadata", "state/_METADATA")
_UNDECODABLE = re.compile(r'Error decoding local file "([^"]+)"')


def run_checkpoint_problem(path: str, error: Exception | None = None) -> str | None:
    """Why training checkpoint `path` is not complete (a missing file), or, given the `error`
    reading it raised, why it is unreadable, in a line; None if nothing is known wrong."""
    for item in _RUN_CHECKPOINT_FILES:
        if not os.path.isfile(os.path.join(path, item)):
            return f"{item} is missing"
    if error is None:
        return None
    text = str(error).strip()
    if match := _UNDECODABLE.search(text):
        return f"{os.path.relpath(match.group(1), path)} is corrupt"
    text = text.splitlines()[0] if text else type(error).__name__
    return text.split(" See full TensorStore details")[0][:300]  # tensorstore adds the spec


def is_run_checkpoint(path: str) -> bool:
    """Whether `path` is a complete `checkpoint_<step>` folder of a training run."""
    return run_checkpoint_problem(path) is None


def skipped_run_checkpoints(model_dir: str) -> list[tuple[str, str]]:
    """(folder, reason) of each `checkpoint_<step>` under a MODEL_DIR newer than the newest
    complete one, newest first."""
    if not os.path.isdir(model_dir):
        return []
    steps = sorted(((int(m.group(1)), os.path.join(model_dir, n)) for n in os.listdir(model_dir)
                    if (m := _STEP_DIR.fullmatch(n))), reverse=True)
    skipped = []
    for _, path in steps:
        problem = run_checkpoint_problem(path)
        if problem is None:
            break
        skipped.append((path, problem))
    return skipped


def latest_run_checkpoint(model_dir: str) -> str | None:
    """The newest complete `checkpoint_<step>` folder under a run's MODEL_DIR, or None."""
    if not os.path.isdir(model_dir):
        return None
    steps = [(int(m.group(1)), os.path.join(model_dir, n)) for n in os.listdir(model_dir)
             if (m := _STEP_DIR.fullmatch(n)) and is_run_checkpoint(os.path.join(model_dir, n))]
    return max(steps)[1] if steps else None


def resolve_run_checkpoint(path: str) -> str | None:
    """The `checkpoint_<step>` folder of a training run given it or the run's MODEL_DIR (the
    newest complete step); None if `path` is neither."""
    path = os.path.normpath(path)
    return path if is_run_checkpoint(path) else latest_run_checkpoint(path)


def load_checkpoint(directory: str) -> tuple[dict[str, Any], TransformerConfig]:
    """(params, config) of a checkpoint written by `save_checkpoint` or `gqa-convert`; params
    is a nested dict of float32 numpy arrays, checked against the config's shapes."""
    reader = GqaCheckpointReader(directory)
    check_shapes(reader.shapes(), param_shapes(reader.config), where=directory)
    return reader.read_all(), reader.config


# ---- Hugging Face -------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": np.uint16}


def _safetensors_header(filename: str) -> dict[str, dict[str, Any]]:
    """{name: {"dtype", "shape", "data_offsets"}} with offsets made absolute in the file.

    The format: an 8-byte little-endian header length, a JSON header, then the raw data. A
    truncated or corrupt file raises one ValueError naming it (the file is checked here, before
    any array is converted, so a conversion never stops half way on it).
    """
    file_size = os.path.getsize(filename)

    def corrupt(what: str) -> ValueError:
        return ValueError(f"{filename} is not a valid safetensors file ({what}); download or "
                          f"save it again")

    with open(filename, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{file_size} bytes, shorter than the 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if size > file_size - 8:
            raise corrupt(f"its header claims {size:,} bytes but the file has {file_size:,}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, ValueError) as e:
            raise corrupt(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            itemsize = np.dtype(_SAFETENSORS_DTYPES.get(info["dtype"], np.uint8)).itemsize
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"tensor {name}'s header entry is malformed: {info!r}") from None
        if 8 + size + end > file_size:
            raise corrupt(f"truncated: tensor {name} ends at byte {8 + size + end:,} of "
                          f"{file_size:,}")
        if info["dtype"] in _SAFETENSORS_DTYPES and end - begin != count * itemsize:
            raise corrupt(f"tensor {name} has {end - begin} bytes for shape {info['shape']}")
        info["data_offsets"] = (8 + size + begin, 8 + size + end)
    return header


def _read_safetensor(filename: str, name: str, info: Mapping[str, Any]) -> np.ndarray:
    dtype = info["dtype"]
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{filename}: tensor {name} has dtype {dtype}; expected a float type")
    begin, end = info["data_offsets"]
    raw = np.fromfile(filename, dtype=_SAFETENSORS_DTYPES[dtype],
                      count=int(np.prod(info["shape"], dtype=np.int64)), offset=begin)
    if dtype == "BF16":  # the upper half of a float32
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False).reshape(info["shape"])


class HfT5Reader(CheckpointReader):
    """A Hugging Face T5.1.1 folder: config.json and safetensors or PyTorch weights.

    Names follow `hf_mapping`'s table; Linear weights [out, in] are returned transposed (as a
    view, which the writer copies chunk by chunk). A tied checkpoint holding only
    `shared.weight` gives the logits kernel from it. safetensors are read with plain file reads;
    a `.bin` is memory-mapped, so the pages it has read count as file-backed RSS that the kernel
    can reclaim, not as allocated memory.
    """

    format = "hf"

    def __init__(self, directory: str, config: TransformerConfig | None = None):
        super().__init__(directory)
        self.config = config or config_from_hf_t5(read_json(os.path.join(directory,
                                                                          CONFIG_FILE)))
        self._locate_tensors(directory)
        self._rows: dict[Path, tuple[str | None, bool, tuple[int, ...]]] = {}
        missing = []
        available = set(self._where)
        table = hf_mapping.parameter_table(self.config)
        for name, path, transpose, shape in table:
            source = name
            if name == "lm_head.weight" and name not in available:
                source = "shared.weight"
            if source not in available:
                stack_layers = (self.config.num_encoder_layers if name.startswith("encoder.")
                                else self.config.num_decoder_layers)
                if name.endswith("relative_attention_bias.weight") and not stack_layers:
                    self._rows[path] = (None, False, shape)  # never read by the model
                else:
                    missing.append(name)
                continue
            self._rows[path] = (source, transpose, shape)
            hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
            got = tuple(self._shape(source))
            if got != hf_shape:
                raise ValueError(f"{self._where[source][0]}: {source} has shape {got}, expected "
                                 f"{hf_shape} for {'/'.join(path)} of the config in "
                                 f"{directory}/{CONFIG_FILE}")
        if missing:
            raise ValueError(f"{directory} lacks {len(missing)} arrays the config needs: "
                             f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        known = {row[0] for row in table} | set(hf_mapping.IGNORED_HF_KEYS)
        unexpected = sorted(available - known)
        if unexpected:
            raise ValueError(f"{directory} holds {len(unexpected)} arrays the config has no "
                             f"place for: {', '.join(unexpected[:6])}")

    def _locate_tensors(self, directory: str) -> None:
        """self._where: {hf name: (file, safetensors header entry or None)}."""
        self._where: dict[str, tuple[str, Any]] = {}
        self._torch_files: dict[str, Any] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_file = os.path.join(directory, index_name)
            if os.path.exists(index_file):
                files = sorted(set(read_json(index_file)["weight_map"].values()))
                break
        else:
            files = [n for n in ("model.safetensors", "pytorch_model.bin")
                     if os.path.exists(os.path.join(directory, n))][:1]
        if not files:
            raise ValueError(f"{directory} has {CONFIG_FILE} but no model.safetensors, "
                             f"pytorch_model.bin or a sharded index of them")
        for name in files:
            filename = os.path.join(directory, name)
            if name.endswith(".safetensors"):
                for key, info in _safetensors_header(filename).items():
                    self._where[key] = (filename, info)
            else:
                for key in self._torch_state(filename):
                    self._where[key] = (filename, None)

    def _torch_state(self, filename: str):
        if filename not in self._torch_files:
            import torch  # only for .bin checkpoints

            self._torch_files[filename] = torch.load(filename, map_location="cpu", mmap=True,
                                                     weights_only=True)
        return self._torch_files[filename]

    def _shape(self, name: str) -> tuple[int, ...]:
        filename, info = self._where[name]
        if info is not None:
            return tuple(info["shape"])
        return tuple(self._torch_state(filename)[name].shape)

    def _tensor(self, name: str) -> np.ndarray:
        filename, info = self._where[name]
        if info is not None:
            return _read_safetensor(filename, name, info)
        tensor = self._torch_state(filename)[name]
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{filename}: tensor {name} has dtype {tensor.dtype}")
        return tensor.float().numpy()

    def shapes(self):
        return {p: tuple(shape) for p, (_, _, shape) in self._rows.items()}

    def read(self, path: Path) -> np.ndarray:
        if path not in self._rows:
            raise KeyError(f"{'/'.join(path)} is not in the checkpoint {self.path}")
        source, transpose, shape = self._rows[path]
        if source is None:
            return np.zeros(shape, np.float32)
        array = self._tensor(source)
        return array.T if transpose else array


# ---- detection ----------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """'gqa_t5x', 'hf' or 't5x' from the files in `path`; ValueError if none fits."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} does not exist or is not a folder")
    if resolve_gqa_checkpoint(path) is not None or resolve_run_checkpoint(path) is not None:
        return "gqa_t5x"
    config_file = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_file) and "d_model" in read_json(config_file):
        return "hf"
    try:
        resolve_t5x_dir(path)
        return "t5x"
    except ValueError:
        pass
    raise ValueError(f"unknown checkpoint format in {path}: expected {CONFIG_FILE} with "
                     f"{STEP_PREFIX}<step>/ (gqa_t5x), {CONFIG_FILE} with model.safetensors or "
                     f"pytorch_model.bin (hf), or a t5x checkpoint ('checkpoint' msgpack or an "
                     f"orbax tree, possibly under checkpoint_<step>/)")


def open_checkpoint(path: str, input_format: str = "auto",
                    config: TransformerConfig | None = None) -> CheckpointReader:
    """A reader for the checkpoint at `path`. `config` is needed for t5x checkpoints, which
    hold none (None: its `config` stays None; see `infer_config_from_shapes`); for the other
    formats it replaces the stored config."""
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt == "gqa_t5x":
        is_run = resolve_run_checkpoint(path) is not None
        reader = RunCheckpointReader(path) if is_run else GqaCheckpointReader(path)
    elif fmt == "hf":
        return HfT5Reader(path, config)
    elif fmt == "t5x":
        reader = open_t5x(path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose from "
                         f"{('auto',) + FORMATS}")
    if config is not None:
        reader.config = config
    return reader
