"""The demo behind `gqa-demo`: the end-to-end tour on the embedded default, under a minute on a CPU.

Builds a small multi-head T5.1.1 model with random weights, converts it by mean pooling to every
GQA-G (G a divisor of the head count, down to MQA), decodes one batch with each (greedy, cached
cross-attention keys/values), and prints parameter counts, decode-cache bytes and decode time.
The weights are random, so the tokens themselves mean nothing: uptraining (`gqa-train`) is what
makes a converted model good again.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.conversion import pooling as convert
from gqa_t5x.model import decoding
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.layers import count_params
from gqa_t5x.model.network import Transformer

DEMO_CONFIG = TransformerConfig(
    vocab_size=512,
    emb_dim=256,
    num_heads=8,
    num_kv_heads=8,
    head_dim=32,
    mlp_dim=512,
    num_encoder_layers=2,
    num_decoder_layers=2,
)


def divisors(n: int) -> list[int]:
    return [g for g in range(n, 0, -1) if n % g == 0]


def run_demo(config: TransformerConfig = DEMO_CONFIG, batch_size: int = 8, input_length: int = 256,
             output_length: int = 32, seed: int = 0, repeats: int = 9) -> list[dict]:
    """Convert `config` (multi-head) to each GQA-G and decode one random batch with each.

    Each variant is timed `repeats` times, interleaved (one decode of every variant per round),
    so that a slow spell of a shared machine falls on all of them alike; a row keeps every time,
    their median and their range.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(2, config.vocab_size, (batch_size, input_length)), jnp.int32)
    mha = Transformer(config)
    params = mha.init(jax.random.PRNGKey(seed), tokens[:, :4], tokens[:, :4], tokens[:, :4],
                      enable_dropout=False)["params"]
    rows, decodes = [], []
    for g in divisors(config.num_heads):
        target = config.replace(num_kv_heads=g)
        converted = convert.convert_params(params, config, target, method="mean", seed=seed)
        decode = functools.partial(decoding.generate, Transformer(target), converted,
                                   encoder_input_tokens=tokens,
                                   max_decode_length=output_length, force_steps=True)
        jax.block_until_ready(decode())  # compile
        decodes.append(decode)
        rows.append({
            "kv_heads": g,
            "params": count_params(converted),
            "cache_bytes_per_sequence": target.decode_cache_bytes_per_token(input_length) +
            target.decode_cache_bytes_per_token() * (output_length - 1),
            "decode_seconds_all": [],
        })
    for _ in range(repeats):
        for row, decode in zip(rows, decodes):
            start = time.perf_counter()
            jax.block_until_ready(decode())
            row["decode_seconds_all"].append(time.perf_counter() - start)
    for row in rows:
        times = row["decode_seconds_all"]
        row.update(decode_seconds=float(np.median(times)), decode_min=min(times),
                   decode_max=max(times))
    return rows


def within_noise(row: dict, reference: dict) -> bool:
    """Whether two rows' decode times cannot be told apart: their ranges overlap."""
    return row["decode_min"] <= reference["decode_max"] and \
        reference["decode_min"] <= row["decode_max"]


def format_rows(rows: list[dict]) -> str:
    """The table: decode time as the median with the range of the repeats; the speed-up over
    MHA (the first row) as the ratio of medians, marked '~' where the ranges overlap."""
    lines = [f"{'kv heads':>8} {'params':>11} {'cache KiB/seq':>13} {'decode ms':>10} "
             f"{'range ms':>15} {'vs MHA':>9}"]
    mha = rows[0]
    for r in rows:
        noise = r is not mha and within_noise(r, mha)
        ratio = f"{'~' if noise else ''}{mha['decode_seconds'] / r['decode_seconds']:.2f}x"
        span = f"{1e3 * r['decode_min']:.1f}-{1e3 * r['decode_max']:.1f}"
        lines.append(f"{r['kv_heads']:>8} {r['params']:>11,} "
                     f"{r['cache_bytes_per_sequence'] / 1024:>13.1f} "
                     f"{1e3 * r['decode_seconds']:>10.1f} {span:>15} {ratio:>9}")
    lines.append(f"median and range of {len(mha['decode_seconds_all'])} interleaved repeats; "
                 "'~': within noise (the range overlaps MHA's)")
    return "\n".join(lines)
