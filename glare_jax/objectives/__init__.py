"""Pre-training objectives, selected by `config.objective`.

    objective = build_objective(config, models, steps_per_epoch)
    centres = objective.init_centres()          # {level: [K]} (empty for FLSL)
    loss, (metrics, new_centres) = objective(student_params, teacher_params,
                                             centres, batch, rng, step)

`student_params` / `teacher_params` are {'backbone', 'head', 'cross_attention'}
trees (glare_jax.models.init_params); `batch` holds the rendered views
(docs/DESIGN.md, "The pre-training batch"): global_crops [B, G, Sg, Sg, 3],
local_crops [B, L, Sl, Sl, 3], boxes [B, G + L, 4], flips [B, G + L]; `rng` is a
jax.random key (stochastic depth, patch augmentation, region and token sampling);
`step` the global step (teacher temperature). Differentiate with respect to the
first argument; the teacher is an EMA copy (common.ema_momentum / ema_update).

Metrics: one scalar per loss term ('loss/glob', 'loss/reg', 'loss/loc1',
'loss/loc2' for GLARE; 'loss/cls', 'loss/cls_plus', 'loss/patch' for UDI;
'loss/meanshift', 'loss/kmeans', 'loss/vmr' for FLSL; 'loss/glob' for DINO),
'teacher_temp', and a few diagnostics ('reg/kept', 'loc1/distorted',
'loc2/matched', 'patch/matched').
"""

from __future__ import annotations

import ml_collections as mlc

from glare_jax.data import patch_aug
from glare_jax.models import Models, vit_from_config
from glare_jax.objectives.common import ObjectiveBase, ema_momentum, ema_update
from glare_jax.objectives.dino import DinoObjective
from glare_jax.objectives.flsl import FlslObjective
from glare_jax.objectives.glare import GlareObjective
from glare_jax.objectives.udi import UdiObjective

OBJECTIVES = ("glare", "udi", "flsl", "dino")


def _loss_kwargs(loss: mlc.ConfigDict, models: Models, steps_per_epoch: int) -> dict:
  return dict(models=models, student_temp=loss.student_temp, teacher_temp=loss.teacher_temp,
              warmup_teacher_temp=loss.warmup_teacher_temp,
              warmup_teacher_temp_epochs=loss.warmup_teacher_temp_epochs,
              center_momentum=loss.center_momentum, steps_per_epoch=steps_per_epoch)


def build_objective(config: mlc.ConfigDict, models: Models, steps_per_epoch: int) -> ObjectiveBase:
  """The objective named by `config.objective`, with its hyperparameters from `config`."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  kw = _loss_kwargs(config.loss, models, steps_per_epoch)
  name = config.objective
  if name == "glare":
    pa = config.glare.patch_aug
    patch_aug.check_config(pa)
    weights = [config.glare[k] for k in ("w_glob", "w_reg", "w_loc1", "w_loc2")]
    if min(weights) < 0 or max(weights) <= 0:
      raise ValueError(f"config.glare.w_glob/w_reg/w_loc1/w_loc2 = {weights}: need >= 0, one > 0")
    if (pa.kind == "mask") != bool(config.model.use_mask_token):
      raise ValueError(
          f"config.glare.patch_aug.kind={pa.kind!r} needs config.model.use_mask_token="
          f"{pa.kind == 'mask'} (got {config.model.use_mask_token})")
    return GlareObjective(**kw, glare=config.glare, patch_size=config.model.patch_size)
  if name == "dino":
    return DinoObjective(**kw)
  if name == "udi":
    if config.udi.num_heads != config.cross_attention.num_heads:
      raise ValueError(
          f"config.udi.num_heads={config.udi.num_heads} must equal "
          f"config.cross_attention.num_heads={config.cross_attention.num_heads} (one module)")
    return UdiObjective(**kw, udi=config.udi)
  if name == "flsl":
    f = config.flsl
    kw.update(teacher_temp=f.teacher_temp, warmup_teacher_temp=f.warmup_teacher_temp,
              warmup_teacher_temp_epochs=f.warmup_teacher_temp_epochs)
    prefix = 0 if f.drop_prefix else config.model.num_prefix
    return FlslObjective(
        **kw, flsl=f,
        student_vit=vit_from_config(config.model, num_prefix=prefix),
        teacher_vit=vit_from_config(config.model, num_prefix=prefix, drop_path=0.0))
  raise ValueError(f"config.objective={name!r}: use one of {OBJECTIVES}")


__all__ = ("build_objective", "ema_momentum", "ema_update", "OBJECTIVES",
           "GlareObjective", "UdiObjective", "FlslObjective", "DinoObjective")
