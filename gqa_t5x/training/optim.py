"""Optimizer and learning-rate schedules of the T5 recipe.

- Pre-training and uptraining: learning rate `base / sqrt(max(step, warmup_steps))` with
  `base = 1.0` and `warmup_steps = 10_000`, i.e. 0.01 for the first 10k steps, then 1/sqrt(step).
- Fine-tuning: a constant 1e-3.
- Adafactor as in T5 and t5x: factored second moments (for arrays with two dims of at least 128),
  decay rate 0.8 (beta2 = 1 - (t+1)^-0.8), update clipping at block RMS 1.0, updates scaled by the
  parameter's RMS (at least 1e-3), no momentum.

The learning rate is not part of the optax chain: `train.train_step` multiplies the Adafactor
direction by `schedule(step)` where `step` is the run's global step. That way an uptraining run
can start Adafactor afresh (new second-moment statistics) and still continue the source
checkpoint's step count, and hence its learning rate, as t5x does when it resets optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


@gin.configurable(module="gqa_t5x.optim")
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """`base / sqrt(max(step, warmup_steps))`: T5's pre-training schedule (constant warmup)."""
    if warmup_steps < 1:
        raise ValueError(f"rsqrt_schedule: warmup_steps={warmup_steps} must be >= 1")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))

    return schedule


@gin.configurable(module="gqa_t5x.optim")
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
    """A constant learning rate: T5's fine-tuning schedule (1e-3)."""

    def schedule(step):
        del step
        return jnp.asarray(learning_rate, jnp.float32)

    return schedule


@gin.configurable(module="gqa_t5x.optim")
def adafactor(
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    factored: bool = True,
    eps: float = 1e-30,
) -> optax.GradientTransformation:
    """T5's Adafactor without the learning rate: its updates are the descent *direction*
    (already negated); the caller scales them by the learning rate."""
    return optax.adafactor(
        learning_rate=None,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=None,
        factored=factored,
        eps=eps,
    )
