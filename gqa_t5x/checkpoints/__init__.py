"""Checkpoints: our format (`native`), t5x's legacy and orbax formats (`t5x`), Hugging Face T5.1.1
folders (`hf`), and the run checkpoints training writes, behind one reader interface: every
reader gives the params under t5x's names one array at a time."""

from gqa_t5x.checkpoints.hf import config_from_hf_t5, params_from_hf_t5
from gqa_t5x.checkpoints.native import (
    CONFIG_FILE,
    FORMATS,
    STEP_PREFIX,
    CheckpointWriter,
    GqaCheckpointReader,
    HfT5Reader,
    RunCheckpointReader,
    detect_format,
    is_run_checkpoint,
    latest_run_checkpoint,
    load_checkpoint,
    open_checkpoint,
    resolve_gqa_checkpoint,
    resolve_run_checkpoint,
    run_checkpoint_problem,
    save_checkpoint,
    skipped_run_checkpoints,
    step_dir,
)
from gqa_t5x.checkpoints.t5x import CheckpointReader, infer_config_from_shapes

__all__ = [
    "CONFIG_FILE", "FORMATS", "STEP_PREFIX", "CheckpointReader", "CheckpointWriter",
    "GqaCheckpointReader", "HfT5Reader", "RunCheckpointReader", "config_from_hf_t5",
    "detect_format", "infer_config_from_shapes", "is_run_checkpoint", "latest_run_checkpoint",
    "load_checkpoint", "open_checkpoint", "params_from_hf_t5", "resolve_gqa_checkpoint",
    "resolve_run_checkpoint", "run_checkpoint_problem", "save_checkpoint",
    "skipped_run_checkpoints", "step_dir",
]
