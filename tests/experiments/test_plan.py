"""`gqa-plan` on a tiny config over 8 virtual devices (2 data x 4 model), in its own process.

The per-device sizes are counted by hand from the tiny config: 4 query heads shard over 4 (one
per device), so do the encoder's 4 kv heads (it is not grouped); the grouped decoder attentions'
2 kv heads do not divide and are replicated; MLP (64) and vocabulary (64) shard 4 ways.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Elements per device. Encoder layer: query, key, value 32x16 + out 16x32 + 2 norms of 32 + wi_0,
# wi_1 32x16 + wo 16x32. Decoder layer: two attentions of query 32x16, key and value 32x32 (2 kv
# heads of 16, replicated), out 16x32; 3 norms of 32; the MLP as above.
ENCODER_LAYER = 4 * 512 + 2 * 32 + 3 * 512
DECODER_LAYER = 2 * (512 + 1024 + 1024 + 512) + 3 * 32 + 3 * 512
PARAMS = 4 * (16 * 32 + 2 * 8 + 2 * ENCODER_LAYER + 2 * DECODER_LAYER + 2 * 32 + 32 * 16)
BATCH = 2 * 16 * 4 + 3 * 2 * 8 * 4  # 2 rows per device: inputs [2, 16], three [2, 8] features
# bfloat16 caches of 2 decoder layers, K and V each: self [2, 2, 8, 16], cross [2, 2, 16, 16];
# plus the int32 cache_index.
CACHE = 2 * 2 * 2 * (2 * 2 * 8 * 16 + 2 * 2 * 16 * 16) + 4
# What a decode step reads besides the cache: the embedding, the decoder (its cross-attention
# key and value kernels fill the cross cache at the first step), the logits kernel, the encoder
# output [2, 16, 32] bfloat16 (ditto), the last tokens [2] and the encoder tokens [2, 16] (the
# cross mask). XLA drops unused inputs: the encoder's parameters.
DECODE_PARAMS = 4 * (16 * 32 + 8 + 2 * DECODER_LAYER + 32 + 32 * 16)
ENCODED = 2 * 16 * 32 * 2


@pytest.mark.slow
def test_tiny_plan_on_eight_virtual_devices(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gqa_t5x.cli.plan", "--preset", "tiny", "--num_kv_heads", "2",
         "--input_length", "16", "--target_length", "8", "--batch_size", "4", "--data", "2",
         "--model", "4", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh 2 data x 4 model" in proc.stdout and "XLA peak" in proc.stdout
    plan = json.loads(out.read_text())
    stages = {s["stage"]: s for s in plan["stages"]}
    assert sorted(stages) == ["decode", "eval", "train"]
    for s in stages.values():
        assert s["analytic"]["parameters"] == PARAMS
    assert stages["train"]["analytic"]["batch"] == stages["eval"]["analytic"]["batch"] == BATCH
    # XLA's own count of the eval step's inputs: the parameters and the batch, nothing else.
    assert stages["eval"]["arguments"] == PARAMS + BATCH
    assert stages["decode"]["analytic"]["cache"] == CACHE
    assert stages["decode"]["analytic"]["batch"] == ENCODED + 2 * 4 + 2 * 16 * 4
    assert stages["decode"]["arguments"] == DECODE_PARAMS + CACHE + ENCODED + 2 * 4 + 2 * 16 * 4
    train = stages["train"]
    assert train["analytic"]["optimizer_state"] > 0 and train["temporaries"] > 0
    # Params, optimizer state, step and batch; XLA drops the optimizer's unused placeholders.
    assert PARAMS + BATCH < train["arguments"] <= \
        PARAMS + train["analytic"]["optimizer_state"] + 4 + BATCH
    assert train["aliased"] > 0  # the donated state is updated in place

    # Without compiling: the same analytic sizes, no XLA numbers.
    quick = subprocess.run(
        [sys.executable, "-m", "gqa_t5x.cli.plan", "--preset", "tiny", "--num_kv_heads", "2",
         "--input_length", "16", "--target_length", "8", "--batch_size", "4", "--data", "2",
         "--model", "4", "--no_compile", "--output", str(tmp_path / "quick.json")],
        env=env, capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0, quick.stderr[-3000:]
    analytic = json.loads((tmp_path / "quick.json").read_text())["stages"]
    assert [s["analytic"] for s in analytic] == [s["analytic"] for s in plan["stages"]]
    assert all(s["arguments"] is None and s["peak"] is None for s in analytic)

    again = subprocess.run([sys.executable, "-m", "gqa_t5x.cli.plan", "--preset", "tiny",
                            "--output", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
