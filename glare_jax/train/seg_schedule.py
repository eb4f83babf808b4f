"""The fine-tuning learning-rate schedule: mmcv's 'poly' policy with linear warm-up.

    regular(t) = (base_lr - min_lr) * (1 - t / total_steps) ** power + min_lr
    lr(t)      = regular(t) * (1 - (1 - t / warmup_steps) * (1 - warmup_ratio))  if t < warmup
               = regular(t)                                                 otherwise

mmcv's linear warm-up scales the already-decayed lr (not the peak), starting at
warmup_ratio times it; `t` is the number of updates done before this one.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def poly_warmup_schedule(base_lr: float, total_steps: int, *, power: float = 1.0,
                         min_lr: float = 0.0, warmup_steps: int = 0,
                         warmup_ratio: float = 1e-6) -> optax.Schedule:
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}")

  def schedule(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    regular = (base_lr - min_lr) * ((total_steps - t) / total_steps) ** power + min_lr
    if warmup_steps == 0:
      return regular
    # 1 - (1 - t / w) * (1 - r), written without float32 cancellation at t = 0.
    factor = warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps
    return jnp.where(t < warmup_steps, regular * factor, regular)

  return schedule


def schedule_from_config(config) -> optax.Schedule:
  """From a fine-tuning config: `config.optim` and `config.total_steps`."""
  o = config.optim
  return poly_warmup_schedule(o.lr, config.total_steps, power=o.power, min_lr=o.min_lr,
                              warmup_steps=o.warmup_steps, warmup_ratio=o.warmup_ratio)
