"""What a run reports: a progress line, `metrics.jsonl` and TensorBoard summaries in MODEL_DIR.

Only process 0 writes. Each `write` appends one JSON object per line to `MODEL_DIR/metrics.jsonl`
({"step": .., "split": "train" | "validation" | ..., metric: value, ...}) and writes the same
scalars to TensorBoard under `MODEL_DIR/<split>/`. A resumed run first drops the rows of the
steps it redoes (`drop_after`), so metrics.jsonl keeps one row per step and split.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax

from gqa_t5x.progress import format_duration  # noqa: F401 - also run_log's


def progress_line(step: int, total: int, metrics: Mapping[str, float], steps_per_sec: float,
                  tokens_per_sec: float) -> str:
    """'step 120/300 loss 4.1230 lr 1.00e-02 2.35 steps/s 1,203 tokens/s ETA 1m16s'."""
    eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return (f"step {step}/{total}  loss {metrics['loss']:.4f}  "
            f"lr {metrics['learning_rate']:.2e}  {steps_per_sec:.2f} steps/s  "
            f"{tokens_per_sec:,.0f} tokens/s  ETA {format_duration(eta)}")


class RunLog:
    """Appends metrics to MODEL_DIR/metrics.jsonl and TensorBoard; prints progress lines."""

    def __init__(self, model_dir: str, stream=None):
        self.model_dir = model_dir
        self.active = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self._writers = {}
        if self.active:
            os.makedirs(model_dir, exist_ok=True)

    def print(self, line: str) -> None:
        if self.active:
            print(line, file=self.stream, flush=True)

    def _writer(self, split: str):
        if split not in self._writers:
            import tensorflow as tf  # noqa: PLC0415 - only the writing process needs it

            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self.model_dir, split))
        return self._writers[split]

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(os.path.join(self.model_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf  # noqa: PLC0415

        with self._writer(split).as_default():
            for name, value in metrics.items():
                tf.summary.scalar(name, float(value), step=int(step))

    def drop_after(self, step: int) -> int:
        """Remove the metrics.jsonl rows of steps after `step`, the step a resumed run starts
        from: the run redoes those steps and writes them again, so each step keeps one row.
        Returns how many rows were removed."""
        path = os.path.join(self.model_dir, "metrics.jsonl")
        if not self.active or not os.path.exists(path):
            return 0
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)  # a crash here leaves the old file whole
        return len(lines) - len(kept)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.flush()
            writer.close()
        self._writers = {}


def read_metrics(model_dir: str) -> list[dict]:
    """The records of MODEL_DIR/metrics.jsonl, in order."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
