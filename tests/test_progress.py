"""The progress line of conversion and decoding: hand-computed rates and ETAs, throttling."""

import functools
import io
import math

from gqa_t5x import progress
from gqa_t5x.progress import Progress


def test_line_with_bytes_uses_the_byte_rate():
    p = Progress("converting", 48, "arrays", None, total_bytes=368 * 2**20)
    p.start = 100.0
    # 92 MiB in 10 s: 9.2 MiB/s, (368 - 92) / 9.2 = 30 s left
    assert p.line(12, 92 * 2**20, now=110.0) == \
        "converting: 12/48 arrays, 92.0/368.0 MiB, 9.2 MiB/s, ETA 30s"


def test_line_without_bytes_uses_the_item_rate():
    p = Progress("decoding", 10, "batches", None)
    p.start = 0.0
    assert p.line(4, now=8.0) == "decoding: 4/10 batches, ETA 12s"  # 2 s a batch, 6 left
    assert p.line(0, now=8.0) == "decoding: 0/10 batches, ETA ?"


def test_quick_work_prints_nothing_and_slow_work_prints_each_due_line():
    quiet = io.StringIO()
    p = Progress("decoding", 3, "batches", quiet, every=1e9)
    for done in (1, 2, 3):
        p.update(done)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    p = Progress("decoding", 3, "batches", loud, every=0.0)
    for done in (1, 2, 3):
        p.update(done)
    assert [line.split(",")[0] for line in loud.getvalue().splitlines()] == [
        "decoding: 1/3 batches", "decoding: 2/3 batches", "decoding: 3/3 batches"]


def test_conversion_reports_arrays_and_bytes(tmp_path, monkeypatch):
    import numpy as np

    from gqa_t5x.checkpoints import save_checkpoint
    from gqa_t5x.checkpoints.t5x import unflatten
    from gqa_t5x.conversion import streaming
    from gqa_t5x.model.config import TransformerConfig
    from gqa_t5x.model.shapes import param_shapes

    config = TransformerConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=4,
                               head_dim=4, mlp_dim=24, num_encoder_layers=1,
                               num_decoder_layers=1, relative_attention_num_buckets=8)
    shapes = param_shapes(config)
    rng = np.random.default_rng(0)
    save_checkpoint(str(tmp_path / "src"), unflatten(
        {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}), config)
    monkeypatch.setattr(streaming, "Progress", functools.partial(Progress, every=0.0))
    stream = io.StringIO()
    streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2,
                                 progress=stream)
    lines = stream.getvalue().splitlines()
    total = sum(4 * math.prod(s) for s in shapes.values())
    assert len(lines) == len(shapes)
    assert lines[-1].startswith(f"converting: {len(shapes)}/{len(shapes)} arrays, "
                                f"{total / 2**20:,.1f}/{total / 2**20:,.1f} MiB, ")
    assert lines[-1].endswith("ETA 0s")
    assert progress.format_duration(3725) == "1h02m05s"
