"""Inference benchmark: time per sample against the number of key/value groups (Figure 6).

For one model shape and every divisor G of `num_heads` (or a given list), GQA-G is built with
random weights and timed after compilation and warm-up: encoder, cache creation (zeros), the
decode loop (whose first step projects the cross K/V, once per input), per-step time, time per
sample and the cache size. Beam search rows keep one cross K/V cache per example, as
`decoding.generate` does.
Beside each measurement stands the prediction of the bytes model:

  per decode step: bytes of decoder weights (every decoder layer and the logits projection, but
  not the cross-attention key/value kernels, which run once) + bytes of K/V cache read
  (self-attention up to the current length, cross-attention over the whole input), divided by
  the memory bandwidth measured on the spot (`jax.jit(jnp.sum)` over ~1 GiB);
  encoder and the cross K/V projection: their FLOPs divided by the measured matmul rate (the
  predicted `cache_init_s` is the projection, which the measured figures count in the loop).

A second per-step figure, the matvec model, charges the decoder weights at the rate at which a
[batch, D] x [D, V] product (the logits projection alone through `layers.dense`, timed on the
spot) streams its weights instead of at bandwidth. With XLA's dot on CPU that rate is well below
bandwidth (the products are built for many rows); with the compiled CPU kernel (the config's
`kernels`, "auto" or "cpu") it can be above the `jnp.sum` figure, and the matvec model is then
the lower of the two.

The bytes model is a set of plain functions on a `TransformerConfig`; `run_benchmark` writes a
table, `benchmark.json` and `time_per_sample.png` (time per sample against G, measured and
predicted). `compare_hf` adds the same shape run by transformers' PyTorch T5 `generate` (MHA,
greedy, fixed length) on the same inputs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.model import decoding, kernel_choice, layers
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

RESULTS_JSON = "benchmark.json"
RESULTS_PNG = "time_per_sample.png"


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What to run. `groups` None means every divisor of num_heads; `num_beams` > 0 adds beam
    search rows; `recompute_cross_kv` adds rows that re-project cross K/V at every step."""

    input_length: int = 1024
    output_length: int = 128
    batch_size: int = 8
    groups: tuple[int, ...] | None = None
    repeats: int = 3
    recompute_cross_kv: bool = False
    compare_hf: bool = False
    num_beams: int = 0
    seed: int = 0


# ---- the bytes model (pure) ---------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def _itemsize(config: TransformerConfig) -> int:
    return jnp.dtype(config.activation_dtype).itemsize


def decoder_weight_bytes(config: TransformerConfig) -> int:
    """Bytes of decoder weights read by one decode step: all decoder layers (without the
    cross-attention key/value kernels), the final norm and the logits projection [D, V].

    Kernels are counted at the activation dtype: the casts of the float32 parameters are loop
    invariant and run before the loop.
    """
    d, n, h, f = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim
    k_self = config.kv_heads("decoder_self")
    per_layer = (
        d * n * h + 2 * d * k_self * h + n * h * d  # self-attention q, k, v, out
        + d * n * h + n * h * d  # cross-attention q, out
        + 3 * d * f  # wi_0, wi_1, wo
        + 3 * d  # three RMSNorm scales
    )
    norm_and_layers = (config.num_decoder_layers * per_layer + d) * _itemsize(config)
    return norm_and_layers + logits_weight_bytes(config)


def logits_weight_bytes(config: TransformerConfig) -> int:
    """Bytes of the logits projection [D, V]."""
    return config.emb_dim * config.vocab_size * _itemsize(config)


def cross_kv_weight_bytes(config: TransformerConfig) -> int:
    """Bytes of the cross-attention key and value kernels of all decoder layers."""
    k = config.kv_heads("cross")
    return config.num_decoder_layers * 2 * config.emb_dim * k * config.head_dim * _itemsize(config)


def kv_read_bytes(config: TransformerConfig, batch: int, self_length: int,
                  input_length: int) -> int:
    """Bytes of K/V cache read by one step: self-attention over `self_length` positions and
    cross-attention over `input_length`, all decoder layers, `batch` sequences."""
    h, b = config.head_dim, _itemsize(config)
    self_kv = 2 * config.kv_heads("decoder_self") * h * self_length
    cross_kv = 2 * config.kv_heads("cross") * h * input_length
    return config.num_decoder_layers * batch * (self_kv + cross_kv) * b


def cache_bytes(config: TransformerConfig, batch: int, max_decode_length: int,
                input_length: int) -> int:
    """Bytes the decode cache holds (its size is that of a full read at max length)."""
    return kv_read_bytes(config, batch, max_decode_length, input_length)


def decode_bytes(config: TransformerConfig, batch: int, output_length: int, input_length: int,
                 recompute_cross_kv: bool = False) -> int:
    """Bytes the whole decode loop reads, step t (0-based) attending to t + 1 positions.

    With `recompute_cross_kv`, each step also reads the cross K/V kernels and the encoder
    output and writes the projected K/V.
    """
    weights = decoder_weight_bytes(config)
    total = 0
    for t in range(output_length):
        total += weights + kv_read_bytes(config, batch, t + 1, input_length)
    if recompute_cross_kv:
        encoded = batch * input_length * config.emb_dim * _itemsize(config)
        per_step = (cross_kv_weight_bytes(config) + config.num_decoder_layers * encoded
                    + kv_read_bytes(config, batch, 0, input_length))
        total += output_length * per_step
    return total


def encoder_flops(config: TransformerConfig, batch: int, input_length: int) -> int:
    """Matmul FLOPs of the encoder (projections, attention logits and values, MLP)."""
    d, n, h, f, s = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim, input_length
    k = config.kv_heads("encoder_self")
    per_layer = (2 * s * d * (2 * n * h + 2 * k * h)  # q, out, k, v
                 + 2 * 2 * n * s * s * h  # logits and values
                 + 2 * s * d * f * 3)  # gated MLP
    return batch * config.num_encoder_layers * per_layer


def cross_kv_flops(config: TransformerConfig, batch: int, input_length: int) -> int:
    """FLOPs of projecting the encoder output into cross-attention K/V for all decoder layers."""
    k = config.kv_heads("cross")
    return (batch * config.num_decoder_layers * 2 * input_length * config.emb_dim
            * 2 * k * config.head_dim)


def predict(config: TransformerConfig, settings: BenchmarkSettings, bandwidth: float,
            flops_rate: float, recompute_cross_kv: bool = False,
            weight_rate: float | None = None) -> dict[str, float]:
    """Predicted seconds (bytes model) for one batch of greedy decoding; with `weight_rate`
    (bytes/s of weights a batch-sized matvec streams), also `step_ms_matvec` and
    `sample_s_matvec`, with the decoder weights read at that rate instead of at `bandwidth`."""
    b, s, n = settings.batch_size, settings.input_length, settings.output_length
    encoder_s = encoder_flops(config, b, s) / flops_rate
    cache_init_s = cross_kv_flops(config, b, s) / flops_rate
    loop_bytes = decode_bytes(config, b, n, s, recompute_cross_kv)
    loop_s = loop_bytes / bandwidth
    if recompute_cross_kv:
        loop_s += n * cross_kv_flops(config, b, s) / flops_rate
    out = {
        "encoder_s": encoder_s,
        "cache_init_s": cache_init_s,
        "decode_s": loop_s,
        "step_ms": 1e3 * loop_s / n,
        "step_bytes": loop_bytes / n,
        "sample_s": (encoder_s + cache_init_s + loop_s) / b,
    }
    if weight_rate is not None:
        weights = decoder_weight_bytes(config)
        extra_s = weights * (1 / weight_rate - 1 / bandwidth)  # per step, over the bytes model
        out["step_ms_matvec"] = out["step_ms"] + 1e3 * extra_s
        out["sample_s_matvec"] = out["sample_s"] + n * extra_s / b
    return out


# ---- machine rates ------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of `jax.jit(jnp.sum)` over a float32 array of `nbytes`."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / _median_time(lambda: total(x), repeats)


def measure_matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 [n, n] x [n, n] matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / _median_time(lambda: matmul(a, a), repeats)


def measure_logits_step(config: TransformerConfig, batch: int, steps: int = 64,
                        repeats: int = 3) -> float:
    """Seconds per decode step of the logits projection alone: [batch, emb] x [emb, vocab] in a
    jitted loop of `steps` dependent iterations (each feeds a slice of its output back, so that
    nothing is hoisted). The bytes model charges it only its weight bytes at bandwidth; this figure
    shows the rate the model's own path (`layers.dense` with `config.kernels`: the CPU kernel
    where it applies, else XLA's dot) reaches at this batch."""
    dtype = jnp.dtype(config.dtype)
    x = jnp.ones((batch, config.emb_dim), dtype)
    w = jax.random.normal(jax.random.PRNGKey(0), (config.emb_dim, config.vocab_size), dtype)

    @jax.jit
    def loop(x, w):
        def body(_, h):  # h: [B, E]
            logits = layers.dense(h, w, config.kernels)  # [B, V]
            return h + 1e-6 * logits[:, :config.emb_dim]
        return jax.lax.fori_loop(0, steps, body, x)

    return _median_time(lambda: loop(x, w), repeats) / steps


# ---- timing our decoder -------------------------------------------------------------------------


def random_params(module: Transformer, seed: int = 0):
    """Random (T5-initialized) float32 parameters for `module`."""
    tokens = jnp.ones((1, 2), jnp.int32)
    init = jax.jit(lambda key: module.init(key, tokens, tokens, tokens,
                                           enable_dropout=False)["params"])
    return init(jax.random.PRNGKey(seed))


def random_inputs(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[batch, length] token ids in [2, vocab_size): no padding, no EOS."""
    return np.random.RandomState(seed).randint(2, vocab_size, (batch, length)).astype(np.int32)


def time_decoding(module: Transformer, params, tokens, settings: BenchmarkSettings,
                  method: str = "greedy") -> dict[str, float]:
    """Median seconds of encoder, cache creation and the decode loop of exactly
    `settings.output_length` steps (after a compiling run and a warm-up run)."""
    tokens = jnp.asarray(tokens)
    n = settings.output_length
    beams = settings.num_beams if method == "beam" else 1

    def once():
        t0 = time.perf_counter()
        encoded = jax.block_until_ready(decoding.encode(module, params, tokens))
        t1 = time.perf_counter()
        cache = jax.block_until_ready(decoding.init_cache(
            module, params, encoded, tokens, max_decode_length=n, num_beams=beams))
        nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
        t2 = time.perf_counter()
        if method == "beam":
            result = decoding.beam_search(module, params, cache, encoded, tokens,
                                          max_decode_length=n, num_beams=beams,
                                          force_steps=True)
        else:
            result = decoding.decode_loop(module, params, cache, encoded, tokens,
                                          max_decode_length=n, force_steps=True)
        jax.block_until_ready(result.tokens)
        t3 = time.perf_counter()
        steps = int(result.steps)
        del result
        return {"encoder_s": t1 - t0, "cache_init_s": t2 - t1, "decode_s": t3 - t2,
                "steps": steps, "cache_bytes": nbytes}

    once()
    once()
    runs = [once() for _ in range(settings.repeats)]
    for r in runs:
        r["sample_s"] = (r["encoder_s"] + r["cache_init_s"] + r["decode_s"]) / len(tokens)
    keys = ("encoder_s", "cache_init_s", "decode_s")
    out = {key: statistics.median(r[key] for r in runs) for key in keys}
    out["steps"] = runs[0]["steps"]
    out["step_ms"] = 1e3 * out["decode_s"] / out["steps"]
    out["sample_s"] = (out["encoder_s"] + out["cache_init_s"] + out["decode_s"]) / len(tokens)
    out["cache_bytes"] = runs[0]["cache_bytes"]
    out["repeats"] = {key: [r[key] for r in runs] for key in keys + ("sample_s",)}
    return out


# ---- timing transformers' PyTorch T5 ------------------------------------------------------------


def time_hf(config: TransformerConfig, tokens: np.ndarray, settings: BenchmarkSettings
            ) -> dict[str, float]:
    """transformers' T5ForConditionalGeneration (MHA, random untied weights) on the same
    inputs: greedy `generate` of exactly `output_length` tokens, and its encoder alone."""
    import torch
    import transformers

    torch.set_flush_denormal(True)
    torch.manual_seed(settings.seed)
    hf_config = transformers.T5Config(**hf_mapping.hf_t5_config_dict(config))
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    mask = torch.ones_like(ids)
    n = settings.output_length

    all_times = {}

    def timed(fn, name):
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(settings.repeats):
                start = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - start)
        all_times[name] = times
        return statistics.median(times), out

    def generate(steps):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, num_beams=1)

    encoder_s, _ = timed(lambda: model.encoder(input_ids=ids, attention_mask=mask), "encoder_s")
    first_s, _ = timed(lambda: generate(1), "first_step_s")
    total_s, out = timed(lambda: generate(n), "total_s")
    steps = out.shape[1] - 1  # generate's output starts with the decoder start token
    # Per step from the difference of two lengths: robust to generate's fixed overheads.
    step_s = (total_s - first_s) / max(steps - 1, 1)
    return {"encoder_s": encoder_s, "decode_s": total_s - encoder_s, "steps": int(steps),
            "step_ms": 1e3 * step_s, "sample_s": total_s / len(ids),
            "repeats": {"encoder_s": all_times["encoder_s"],
                        "sample_s": [t / len(ids) for t in all_times["total_s"]]}}


# ---- the run ------------------------------------------------------------------------------------


def _row(name: str, groups: int | None, measured: dict, predicted: dict | None) -> dict:
    return {"name": name, "groups": groups, "measured": measured, "predicted": predicted}


def run_benchmark(config: TransformerConfig, settings: BenchmarkSettings, output_dir: str, *,
                  force: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark and write `benchmark.json` and `time_per_sample.png` to `output_dir`.

    Raises FileExistsError if results are already there and `force` is False.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = [os.path.join(output_dir, RESULTS_JSON), os.path.join(output_dir, RESULTS_PNG)]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass force=True (--force) to overwrite")
    groups = list(settings.groups or divisors(config.num_heads))
    bad = [g for g in groups if g < 1 or config.num_heads % g]
    if bad:
        raise ValueError(f"groups {bad} do not divide num_heads={config.num_heads}")
    os.makedirs(output_dir, exist_ok=True)
    results = _run(config, settings, groups, log)
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2)
    from gqa_t5x.experiments.benchmark_report import plot  # noqa: PLC0415 - it imports this

    plot(results, paths[1])
    results["paths"] = paths
    return results


def _run(config: TransformerConfig, settings: BenchmarkSettings, groups: list[int],
         log: Callable[[str], None]) -> dict:

    log("measuring memory bandwidth and matmul rate ...")
    bandwidth = measure_bandwidth()
    flops_rate = measure_matmul_rate()
    logits_s = measure_logits_step(config, settings.batch_size)
    weight_rate = logits_weight_bytes(config) / logits_s
    # Whether the config's choice takes the CPU kernels on this run (float32 operands assumed,
    # which a bfloat16 run's are not).
    kernels = config.dtype == "float32" and kernel_choice.cpu_kernels(config.kernels) is not None
    log(f"  bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flops_rate / 1e9:.1f} GFLOP/s, "
        f"logits projection {logits_s * 1e3:.1f} ms/step ({weight_rate / 1e9:.1f} GB/s of "
        f"weights); CPU decode kernels {'on' if kernels else 'off'}")
    tokens = random_inputs(config.vocab_size, settings.batch_size, settings.input_length,
                           settings.seed)

    variants = [(False, "greedy")]
    if settings.recompute_cross_kv:
        variants.append((True, "greedy"))
    if settings.num_beams > 0:
        variants.append((False, "beam"))
    rows = []
    for g in sorted(groups, reverse=True):
        cfg = config.replace(num_kv_heads=g)
        for recompute, method in variants:
            name = f"GQA-{g}" + (" recompute" if recompute else "") + (
                f" beam{settings.num_beams}" if method == "beam" else "")
            log(f"{name}: building and compiling ...")
            module = Transformer(cfg, recompute_cross_kv=recompute)
            params = random_params(module, settings.seed)
            start = time.perf_counter()
            measured = time_decoding(module, params, tokens, settings, method)
            predicted = (predict(cfg, settings, bandwidth, flops_rate, recompute, weight_rate)
                         if method == "greedy" else None)
            rows.append(_row(name, g, measured, predicted))
            log(f"{name}: {measured['sample_s']:.3f} s/sample, {measured['step_ms']:.1f} "
                f"ms/step ({time.perf_counter() - start:.0f} s)")
            del params
            # Drop this variant's executables and buffers before timing the next: variants timed
            # late in a long run otherwise ran up to 15% slower than in a fresh process.
            jax.clear_caches()
            gc.collect()
    if settings.compare_hf:
        log("transformers PyTorch T5 (MHA) ...")
        measured = time_hf(config.replace(num_kv_heads=config.num_heads), tokens, settings)
        rows.append(_row("transformers MHA", None, measured, None))
        log(f"transformers: {measured['sample_s']:.3f} s/sample")

    return {
        "config": config.to_dict(),
        "settings": {**dataclasses.asdict(settings), "groups": groups},
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops_rate,
        "logits_step_s": logits_s,
        "cpu_kernels": kernels,
        "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "rows": rows,
    }


def parse_groups(text: str | None) -> tuple[int, ...] | None:
    """'1,2,8' -> (1, 2, 8); None or '' -> None."""
    if not text:
        return None
    try:
        return tuple(int(g) for g in text.split(","))
    except ValueError as e:
        raise ValueError(f"--groups={text!r} is not a comma-separated list of integers") from e
