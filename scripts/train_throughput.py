#!/usr/bin/env python
"""Training throughput: tokens/s of one compiled train step (forward, backward, optimizer update).

Measures gqa_t5x's `train.train_step` (Adafactor, T5 loss with z-loss) for the `tiny` preset and
for config B ("small": `configs/config_b.toml`, its [model] and [train] tables: T5.1.1-small
width, 4+4 layers, inputs 512 / targets 128, batch 8, float32), and Hugging Face transformers'
PyTorch T5 on the same shapes (with its Adafactor step) in the same process. Tokens count inputs
and targets (batch x (inputs + targets) per step).

  python scripts/train_throughput.py                  # both configs, jax and torch
  python scripts/train_throughput.py --configs=small --steps=5 --no-torch
  python scripts/train_throughput.py --configs=small --t5x   # also t5x, where it is installed

Figures measured with it are in docs/measurements.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.experiments import configs
from gqa_t5x.model.config import TransformerConfig, get_config
from gqa_t5x.training import models, optim, partitioning, train, train_state

# t5x on config B, for the ratio where t5x is not installed (docs/measurements.md).
T5X_REFERENCE_TOKENS_PER_SEC = 643.0

_B_TRAIN = configs.load("config_b")["train"]
SHAPES = {
    # name: (config, batch, inputs length, targets length)
    "tiny": (get_config("tiny"), 8, 64, 16),
    "small": (configs.model_config("config_b"), _B_TRAIN["batch_size"],
              _B_TRAIN["inputs_length"], _B_TRAIN["targets_length"]),
}


def _batch(config: TransformerConfig, batch: int, inputs: int, targets: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, config.vocab_size, size=(batch, inputs)).astype(np.int32)
    tgt = rng.integers(2, config.vocab_size, size=(batch, targets)).astype(np.int32)
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


def _median_step_seconds(step, state, data, steps: int) -> float:
    """Median seconds of `steps` calls of `step(state, data) -> (state, aux)` after a compiling
    call, threading the state through."""
    state, aux = step(state, data)  # compile
    jax.block_until_ready(aux)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, aux = step(state, data)
        jax.block_until_ready((state, aux))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_jax(config, batch, inputs, targets, steps: int) -> float:
    """Seconds per train step after compilation (median of `steps`)."""
    model = models.build_model(config)
    tx = optim.adafactor()
    mesh = partitioning.create_mesh(1)
    shapes = {"encoder_input_tokens": (1, inputs), "decoder_input_tokens": (1, targets)}
    state, _ = train_state.create_train_state(model, tx, mesh, shapes, seed=0)
    step = jax.jit(functools.partial(train.train_step, model, tx, optim.rsqrt_schedule(),
                                     jax.random.PRNGKey(1)), donate_argnums=0)
    data = {k: jnp.asarray(v) for k, v in _batch(config, batch, inputs, targets).items()}
    return _median_step_seconds(step, state, data, steps)


def time_t5x(config, batch, inputs, targets, steps: int) -> float:
    """Seconds per train step of t5x's EncoderDecoderModel around its T5.1.1 example network
    (one-hot embedding) with t5x's Adafactor: loss, gradients, `apply_gradient`. Needs t5x
    importable (it is not on PyPI)."""
    import seqio  # noqa: PLC0415
    from t5x import adafactor  # noqa: PLC0415
    from t5x import models as t5x_models  # noqa: PLC0415
    from t5x import train_state as t5x_train_state  # noqa: PLC0415
    from t5x.examples.t5 import network as t5x_network  # noqa: PLC0415

    module = t5x_network.Transformer(t5x_network.T5Config(
        vocab_size=config.vocab_size, dtype=jnp.float32, emb_dim=config.emb_dim,
        num_heads=config.num_heads, num_encoder_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, head_dim=config.head_dim,
        mlp_dim=config.mlp_dim, mlp_activations=("gelu", "linear"), dropout_rate=0.0,
        logits_via_embedding=False))
    vocabulary = seqio.PassThroughVocabulary(size=config.vocab_size)
    optimizer = adafactor.Adafactor(
        decay_rate=0.8, step_offset=0,
        logical_factor_rules=adafactor.standard_logical_factor_rules())
    model = t5x_models.EncoderDecoderModel(module, vocabulary, vocabulary, optimizer)
    shapes = {"encoder_input_tokens": (batch, inputs), "decoder_input_tokens": (batch, targets)}
    variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
    state = t5x_train_state.FlaxOptimTrainState.create(optimizer, variables)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
            state.params, batch, None)
        return state.apply_gradient(grads, learning_rate=1e-2), loss

    data = {k: jnp.asarray(v) for k, v in _batch(config, batch, inputs, targets).items()}
    return _median_step_seconds(step, state, data, steps)


def time_torch(config, batch, inputs, targets, steps: int, optimizer: str) -> float:
    """Seconds per step of transformers' T5ForConditionalGeneration (loss, backward, update)."""
    import torch  # noqa: PLC0415
    from transformers import T5Config, T5ForConditionalGeneration  # noqa: PLC0415

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    hf = T5Config(**hf_mapping.hf_t5_config_dict(config))
    model = T5ForConditionalGeneration(hf)
    model.train()
    if optimizer == "adafactor":
        from transformers.optimization import Adafactor  # noqa: PLC0415

        opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False,
                        warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = _batch(config, batch, inputs, targets)
    enc = torch.from_numpy(b["encoder_input_tokens"]).long()
    labels = torch.from_numpy(b["decoder_target_tokens"]).long()

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=enc, labels=labels).loss
        loss.backward()
        opt.step()

    one_step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--torch_optimizer", default="adafactor", choices=("adafactor", "adamw"))
    parser.add_argument("--t5x", action="store_true",
                        help="also time t5x's example T5.1.1 network (t5x must be importable)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for name in args.configs.split(","):
        config, batch, inputs, targets = SHAPES[name]
        tokens = batch * (inputs + targets)
        row = {"config": name, "batch": batch, "inputs": inputs, "targets": targets}
        row["jax_s_per_step"] = time_jax(config, batch, inputs, targets, args.steps)
        row["jax_tokens_per_sec"] = tokens / row["jax_s_per_step"]
        if args.torch:
            row["torch_s_per_step"] = time_torch(config, batch, inputs, targets, args.steps,
                                                 args.torch_optimizer)
            row["torch_tokens_per_sec"] = tokens / row["torch_s_per_step"]
            row["ratio_vs_torch"] = row["jax_tokens_per_sec"] / row["torch_tokens_per_sec"]
        if args.t5x:
            row["t5x_s_per_step"] = time_t5x(config, batch, inputs, targets, args.steps)
            row["t5x_tokens_per_sec"] = tokens / row["t5x_s_per_step"]
            row["ratio_vs_t5x"] = row["jax_tokens_per_sec"] / row["t5x_tokens_per_sec"]
        if name == "small":
            row["ratio_vs_t5x_reference"] = row["jax_tokens_per_sec"] / \
                T5X_REFERENCE_TOKENS_PER_SEC
        results.append(row)
        line = (f"{name:6s} batch {batch} x ({inputs} + {targets}): gqa_t5x "
                f"{row['jax_s_per_step']:.3f} s/step {row['jax_tokens_per_sec']:,.0f} tokens/s")
        if args.torch:
            line += (f" | torch T5 {row['torch_s_per_step']:.3f} s/step "
                     f"{row['torch_tokens_per_sec']:,.0f} tokens/s | ratio "
                     f"{row['ratio_vs_torch']:.2f}x")
        if args.t5x:
            line += (f" | t5x {row['t5x_s_per_step']:.3f} s/step "
                     f"{row['t5x_tokens_per_sec']:,.0f} tokens/s | ratio "
                     f"{row['ratio_vs_t5x']:.2f}x")
        if "ratio_vs_t5x_reference" in row:
            line += f" | vs t5x reference {row['ratio_vs_t5x_reference']:.2f}x"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
