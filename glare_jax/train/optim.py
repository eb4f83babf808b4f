"""Parameter rules -> the pre-training optimizer (optax), and its lr schedule.

Which parameters train, which are weight-decayed and which get another learning
rate is decided by (regex, value) lists matched (fullmatch) against '/'-joined
paths such as 'backbone/block_3/adapter/up/kernel'; the first match wins
(`config.optim`: `param_rules` are tried before `PARAM_PRESETS[param_preset]`).

    tx, schedule = build_optimizer(config.optim, params, batch_size, steps_per_epoch,
                                   config.num_epochs,
                                   norm_last_layer=config.head.norm_last_layer)

Frozen parameters get `optax.set_to_zero()` and no optimizer state. Trainable
ones follow UDI's / DINO's training loop:

  clip      per parameter (DINO's clip_gradients, the default) or by global norm,
            over the trainable parameters only
  AdamW     b1, b2, eps 1e-8, decoupled weight decay except `no_decay` paths and
            1-D parameters not matched by `decay_1d`
  lr        linear warm-up from 0, then cosine to min_lr (DINO's cosine_scheduler),
            peak = base_lr * batch / base_batch, times a per-path `lr_mults` factor
  last layer  the head's weight-normalised layer gets no update and no optimizer
            state change during the first `freeze_last_layer_epochs` epochs (DINO
            sets its gradient to None), so its Adam moments and bias correction
            start when it unfreezes. Decided from the step count inside the state.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from glare_jax.configs.common import PARAM_PRESETS
from glare_jax.train.sharding import path_str  # re-exported: optim.path_str

LAST_LAYER = r"head/weight_[gv]"   # DINO's `last_layer` (freeze_last_layer)
ADAM_EPS = 1e-8                    # torch.optim.AdamW's default
CLIP_EPS = 1e-6                    # DINO's clip_gradients: clip / (norm + 1e-6)
LABELS = ("train", "freeze")


def _first_match(path: str, rules: Sequence[tuple[str, Any]]) -> tuple[int, Any] | None:
  for i, (pattern, value) in enumerate(rules):
    if re.fullmatch(pattern, path):
      return i, value
  return None


def param_rules(optim_cfg: Any, *, norm_last_layer: bool = False
                ) -> tuple[tuple[str, str], ...]:
  """`param_rules`, then `head/weight_g` frozen if `norm_last_layer` (config.head's:
  DINO keeps the weight-normalised layer's g at 1), then the preset's rules (first
  match wins)."""
  if optim_cfg.param_preset not in PARAM_PRESETS:
    raise ValueError(f"unknown optim.param_preset {optim_cfg.param_preset!r}; "
                     f"known: {sorted(PARAM_PRESETS)}")
  fixed_g = (("head/weight_g", "freeze"),) if norm_last_layer else ()
  return (tuple(tuple(r) for r in optim_cfg.param_rules) + fixed_g
          + PARAM_PRESETS[optim_cfg.param_preset])


def param_labels(params: Any, rules: Sequence[tuple[str, str]]) -> Any:
  """Tree of 'train' / 'freeze' labels; every path must match a rule."""
  for pattern, rule in rules:
    if rule not in LABELS:
      raise ValueError(f"parameter rule ({pattern!r}, {rule!r}): the rule must be one of {LABELS}")

  def label(kp, _):
    path = path_str(kp)
    hit = _first_match(path, rules)
    if hit is None:
      raise ValueError(f"parameter {path!r} matches no rule in {[p for p, _ in rules]}")
    return hit[1]
  return jax.tree_util.tree_map_with_path(label, params)


def decays(path: str, ndim: int, no_decay: Sequence[str], decay_1d: Sequence[str] = ()) -> bool:
  """Weight decay applies unless a `no_decay` pattern matches; a 1-D array decays
  only if a `decay_1d` pattern matches (DINO's rule: no decay on 1-D parameters;
  mmseg's, where only the names decide: decay_1d=('.*',))."""
  if any(re.fullmatch(p, path) for p in no_decay):
    return False
  return ndim > 1 or any(re.fullmatch(p, path) for p in decay_1d)


def decay_mask(no_decay: Sequence[str], decay_1d: Sequence[str] = ()) -> Callable[[Any], Any]:
  """tree -> the bool tree of `decays` (optax's weight-decay mask)."""
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda kp, x: decays(path_str(kp), x.ndim, no_decay, decay_1d), tree)


def lr_mult(path: str, lr_mults: Sequence[tuple[str, float]]) -> float:
  hit = _first_match(path, lr_mults)
  return 1.0 if hit is None else float(hit[1])


def scale_by_lr_mult(lr_mults: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by the lr factor of its path (as a PyTorch param-group lr)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda kp, u: u * lr_mult(path_str(kp), lr_mults), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_per_param(max_norm: float) -> optax.GradientTransformation:
  """DINO's clip_gradients: each array whose L2 norm exceeds `max_norm` is scaled
  by max_norm / (norm + 1e-6)."""
  def clip(g):
    coef = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + CLIP_EPS)
    return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class HoldState(NamedTuple):
  count: jax.Array  # updates seen so far
  inner: Any


def hold_for_steps(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """Zero updates and an untouched `inner` state for the first `steps` updates.

  Equivalent to PyTorch skipping parameters whose gradient is None: no moment
  update, no weight decay, and Adam's bias correction starts at the first real step.
  """
  def init(params):
    return HoldState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    active = state.count >= steps
    new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    return new_updates, HoldState(optax.safe_increment(state.count), new_inner)
  return optax.GradientTransformation(init, update)


def warmup_cosine(peak: float, final: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """DINO's cosine_scheduler per step: np.linspace(0, peak, warmup_steps), then
  final + (peak - final) / 2 * (1 + cos(pi * i / (total - warmup)))."""
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps - 1, 1)
    t = jnp.clip(step - warmup_steps, 0, decay_steps)
    cos = final + 0.5 * (peak - final) * (1.0 + jnp.cos(jnp.pi * t / decay_steps))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


def build_optimizer(optim_cfg: Any, params: Any, batch_size: int, steps_per_epoch: int,
                    num_epochs: int, *, norm_last_layer: bool = False
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The pre-training optimizer over `params` ({'backbone', 'head', ...}) and its lr
  schedule (for logging); `norm_last_layer` as in `param_rules`."""
  c = optim_cfg
  train = param_labels(params, param_rules(c, norm_last_layer=norm_last_layer))
  hold_steps = int(c.freeze_last_layer_epochs * steps_per_epoch)
  labels = jax.tree_util.tree_map_with_path(
      lambda kp, lab: "last_layer" if (lab == "train" and hold_steps > 0
                                       and re.fullmatch(LAST_LAYER, path_str(kp))) else lab,
      train)
  peak = c.base_lr * batch_size / c.base_batch
  schedule = warmup_cosine(peak, c.min_lr, int(c.warmup_epochs * steps_per_epoch),
                           int(num_epochs * steps_per_epoch))

  def adamw(hold: int) -> optax.GradientTransformation:
    core = optax.chain(optax.scale_by_adam(c.b1, c.b2, eps=ADAM_EPS),
                       optax.add_decayed_weights(c.weight_decay,
                                                 mask=decay_mask(c.no_decay, c.decay_1d)))
    if hold:
      core = hold_for_steps(core, hold)
    return optax.chain(core, optax.scale_by_learning_rate(schedule),
                       scale_by_lr_mult(tuple(c.lr_mults)))

  if c.clip_mode == "per_param":
    clip = clip_per_param(c.clip_grad)
  elif c.clip_mode == "global":
    clip = optax.clip_by_global_norm(c.clip_grad)
  else:
    raise ValueError(f"unknown optim.clip_mode {c.clip_mode!r} (use 'per_param' or 'global')")
  trainable = jax.tree.map(lambda lab: lab == "train", train)
  tx = optax.chain(
      optax.masked(clip, trainable) if c.clip_grad else optax.identity(),
      optax.multi_transform({"train": adamw(0), "last_layer": adamw(hold_steps),
                             "freeze": optax.set_to_zero()}, labels))
  return tx, schedule


def _fmt(n: int) -> str:
  """1234567 -> '1.23M', 12345 -> '12.3K', 123 -> '123'."""
  if n >= 1e5:
    return f"{n / 1e6:.2f}M"
  return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def describe_params(params: Any, optim_cfg: Any, *, norm_last_layer: bool = False
                    ) -> list[str]:
  """What the rules matched, one line each: trainable count, per-rule groups,
  no-decay and lr-multiplier groups."""
  rules = param_rules(optim_cfg, norm_last_layer=norm_last_layer)
  param_labels(params, rules)  # every path matches a rule, or a clear error
  leaves = [(path_str(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(params)]
  total = sum(math.prod(x.shape) for _, x in leaves)
  by_rule = collections.defaultdict(lambda: [0, 0])
  trainable, no_decay, mults = 0, [0, 0], collections.defaultdict(lambda: [0, 0])
  held = []
  for path, x in leaves:
    i, rule = _first_match(path, rules)
    n = math.prod(x.shape)
    by_rule[i][0] += 1
    by_rule[i][1] += n
    if rule == "train":
      trainable += n
      if not decays(path, x.ndim, optim_cfg.no_decay, optim_cfg.decay_1d):
        no_decay[0] += 1
        no_decay[1] += n
      if re.fullmatch(LAST_LAYER, path) and optim_cfg.freeze_last_layer_epochs > 0:
        held.append(path)
      m = lr_mult(path, optim_cfg.lr_mults)
      if m != 1.0:
        mults[m][0] += 1
        mults[m][1] += n
  lines = [f"trainable: {_fmt(trainable)} of {_fmt(total)} parameters "
           f"({100 * trainable / max(total, 1):.1f}%)"]
  for i, (arrays, n) in sorted(by_rule.items(), key=lambda kv: kv[0]):
    pattern, rule = rules[i]
    lines.append(f"  {rule:6s} {pattern}: {arrays} arrays, {_fmt(n)}")
  lines.append(f"  no weight decay: {no_decay[0]} trainable arrays, {_fmt(no_decay[1])}")
  lines += [f"  lr x{m:g}: {a} arrays, {_fmt(n)}" for m, (a, n) in sorted(mults.items())]
  if held:
    lines.append(f"  held for the first {optim_cfg.freeze_last_layer_epochs} epoch(s): "
                 + ", ".join(held))
  return lines
