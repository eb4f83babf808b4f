"""Pieces shared by every objective.

* H(t, s): DINO's cross-entropy between a centred, sharpened teacher distribution
  softmax((t - c) / T_t) and the student's log_softmax(s / T_s).
* Centres: one [K] vector per level, moved with momentum towards the batch mean of
  the teacher's outputs (inside jit the batch is global, so this mean is already
  the cross-device mean).
* Schedules: the teacher temperature (linear warm-up per epoch, then constant) and
  the EMA momentum (per-step cosine 0.996 -> 1), plus `ema_update`.
* Forward helpers: the backbone on [B, V, H, W, 3] views, one head call on many
  token sets, stratified window sampling (UDI / FLSL).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

from glare_jax.models import Models

Array = jax.Array


# ---------------------------------------------------------------- H(t, s)

def teacher_probs(t_logits: Array, centre: Array | None, temp: Array | float) -> Array:
  """softmax((t - c) / T_t) over the last axis, without gradient."""
  t = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
  if centre is not None:
    t = t - centre
  return jax.nn.softmax(t / temp, axis=-1)


def student_log_probs(s_logits: Array, temp: float) -> Array:
  return jax.nn.log_softmax(s_logits.astype(jnp.float32) / temp, axis=-1)


def cross_entropy(t_logits: Array, s_logits: Array, centre: Array | None,
                  t_temp: Array | float, s_temp: float) -> Array:
  """H(t, s) = -sum_k softmax((t - c) / T_t)_k log_softmax(s / T_s)_k, per row [...]."""
  return -jnp.sum(teacher_probs(t_logits, centre, t_temp)
                  * student_log_probs(s_logits, s_temp), axis=-1)


def masked_mean(x: Array, mask: Array) -> Array:
  """sum(x * mask) / max(sum(mask), 1) over all elements."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_vector_mean(x: Array, mask: Array | None = None) -> Array:
  """Mean of the [..., K] vectors `x` (over rows where `mask` [...] holds) -> [K]."""
  x = jax.lax.stop_gradient(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
  if mask is None:
    return x.mean(0)
  m = mask.reshape(-1, 1).astype(jnp.float32)
  return jnp.sum(x * m, 0) / jnp.maximum(jnp.sum(m), 1.0)


def update_centre(centre: Array, batch_mean: Array, momentum: float) -> Array:
  """c <- m c + (1 - m) mean(teacher outputs)."""
  return centre * momentum + batch_mean * (1.0 - momentum)


# ---------------------------------------------------------------- schedules

def teacher_temperature(step: Array | int, steps_per_epoch: int, warmup_temp: float,
                        temp: float, warmup_epochs: int) -> Array:
  """DINO's schedule: linspace(warmup_temp, temp, warmup_epochs)[epoch], then temp.

  The epoch is the integer `step // steps_per_epoch`, as in the per-epoch tables of
  DINO / UDI (the value changes at epoch boundaries, not every step).
  """
  epoch = jnp.asarray(step) // steps_per_epoch
  frac = epoch / max(warmup_epochs - 1, 1)
  warm = warmup_temp + (temp - warmup_temp) * frac
  return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def ema_momentum(step: Array | int, total_steps: int, base: float = 0.996,
                 final: float = 1.0) -> Array:
  """Per-step cosine from `base` (step 0) towards `final` (step `total_steps`)."""
  progress = jnp.asarray(step, jnp.float32) / total_steps
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(math.pi * progress))


def ema_update(teacher: Any, student: Any, momentum: Array | float) -> Any:
  """teacher <- m teacher + (1 - m) student, leaf by leaf (same tree structure).

  Written as t + (1 - m)(s - t) so that leaves the student shares with the teacher
  (frozen parameters) stay bit-identical.
  """
  return jax.tree.map(lambda t, s: t + (1.0 - momentum) * (s - t), teacher, student)


# ---------------------------------------------------------------- sampling

def window_samples(key: Array, lead: tuple[int, ...], grid: int, window: int,
                   random: bool) -> Array:
  """UDI / FLSL stratified sampling: one token per `window x window` window.

  The (grid // window)^2 windows tile a square of side `span = (grid // window) *
  window`, placed in one of the four corners of the grid at random when `span <
  grid`. Inside each window the token is uniform (`random`) or the first one.
  Returns [*lead, (grid // window)^2] flat row-major token indices.
  """
  n = grid // window
  if n == 0:
    raise ValueError(f"sampling window {window} is larger than the {grid}x{grid} grid")
  span = n * window
  u = jax.random.uniform(key, (*lead, n * n + 2))  # window offsets, then the corner
  if random:
    off = jnp.floor(u[..., : n * n] * window * window).astype(jnp.int32)
  else:
    off = jnp.zeros((*lead, n * n), jnp.int32)
  corner = (u[..., n * n:] < 0.5).astype(jnp.int32) * (grid - span)  # [*lead, 2]
  wi, wj = jnp.arange(n * n) // n, jnp.arange(n * n) % n
  rows = corner[..., :1] + wi * window + off // window
  cols = corner[..., 1:] + wj * window + off % window
  return (rows * grid + cols).astype(jnp.int32)


def gather_tokens(x: Array, index: Array) -> Array:
  """x [..., N, D], index [..., Q] -> [..., Q, D]."""
  return jnp.take_along_axis(x, index[..., None], axis=-2)


# ---------------------------------------------------------------- forward

@dataclasses.dataclass(frozen=True)
class Views:
  """Backbone outputs on [B, V] views (T = P + N tokens).

    tokens  [B, V, T, D]   after the final LayerNorm (head inputs)
    last    [B, V, T, D]   last block output before the final norm (cross-attention inputs)
    attn    [B, V, H, T, T] last block's softmax attention
  """
  tokens: Array
  last: Array
  attn: Array
  num_prefix: int
  grid: tuple[int, int]

  def patches(self) -> Array:
    return self.tokens[:, :, self.num_prefix:]

  def last_patches(self) -> Array:
    return self.last[:, :, self.num_prefix:]


def run_backbone(model: Any, params: Any, images: Array, *, train: bool,
                 rng: Array | None = None, patch_mask: Array | None = None) -> Views:
  """Apply a ViT to views [B, V, H, W, 3] as one [B*V] batch."""
  b, v = images.shape[:2]
  flat = images.reshape(b * v, *images.shape[2:])
  mask = None if patch_mask is None else patch_mask.reshape(b * v, -1)
  rngs = {"dropout": rng} if train and rng is not None else {}
  tokens, aux = model.apply({"params": params}, flat, train=train, patch_mask=mask, rngs=rngs)
  split = lambda x: x.reshape(b, v, *x.shape[1:])
  return Views(split(tokens), split(aux["blocks"][-1]), split(aux["attn"]),
               aux["num_prefix"], tuple(aux["grid"]))


def apply_head(head: Any, params: Any, parts: list[Array]) -> list[Array]:
  """One head call on several token sets [B, ..., D] -> [B, ..., K] each."""
  b = parts[0].shape[0]
  sizes = [math.prod(p.shape[1:-1]) for p in parts]
  flat = jnp.concatenate([p.reshape(b, n, p.shape[-1]) for p, n in zip(parts, sizes)], axis=1)
  out = head.apply({"params": params}, flat)  # [B, sum(sizes), K]
  splits = jnp.split(out, list(itertools.accumulate(sizes))[:-1], axis=1)
  return [o.reshape(*p.shape[:-1], o.shape[-1]) for o, p in zip(splits, parts)]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a jit static
class ObjectiveBase:
  """What every objective holds: the modules, the loss settings, the epoch length.

  Subclasses implement `init_centres()` and
  `__call__(student_params, teacher_params, centres, batch, rng, step)
   -> (loss, (metrics, new_centres))`.
  """
  models: Models
  student_temp: float
  teacher_temp: float
  warmup_teacher_temp: float
  warmup_teacher_temp_epochs: int
  center_momentum: float
  steps_per_epoch: int

  @property
  def out_dim(self) -> int:
    return self.models.head.out_dim

  def temperature(self, step: Array | int) -> Array:
    return teacher_temperature(step, self.steps_per_epoch, self.warmup_teacher_temp,
                               self.teacher_temp, self.warmup_teacher_temp_epochs)

  def zero_centres(self, *names: str) -> dict[str, Array]:
    return {n: jnp.zeros((self.out_dim,), jnp.float32) for n in names}

  def student(self, params: Any, images: Array, rng: Array,
              patch_mask: Array | None = None) -> Views:
    return run_backbone(self.models.student, params["backbone"], images, train=True,
                        rng=rng, patch_mask=patch_mask)

  def teacher(self, params: Any, images: Array) -> Views:
    v = run_backbone(self.models.teacher, params["backbone"], images, train=False)
    sg = jax.lax.stop_gradient
    return dataclasses.replace(v, tokens=sg(v.tokens), last=sg(v.last), attn=sg(v.attn))
