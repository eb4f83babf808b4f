"""DINO: the global [CLS] loss alone (L_glob of GLARE, Table 5's first row as its own objective).

The teacher sees the clean global crops, the student every view; every (teacher
global t, student view v != t) pair is averaged. One centre, 'global'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from glare_jax.objectives import common
from glare_jax.objectives.glare import glob_loss

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class DinoObjective(common.ObjectiveBase):

  def init_centres(self) -> dict[str, Array]:
    return self.zero_centres("global")

  def __call__(self, student_params: Any, teacher_params: Any, centres: dict[str, Array],
               batch: dict[str, Array], rng: Array, step: Array):
    k_g, k_l = jax.random.split(rng)
    t_temp = self.temperature(step)
    t = self.teacher(teacher_params, batch["global_crops"])
    s_g = self.student(student_params, batch["global_crops"], k_g)
    s_l = self.student(student_params, batch["local_crops"], k_l)
    if t.num_prefix < 1:
      raise ValueError("the DINO objective needs a [CLS] token (model.num_prefix >= 1)")
    head = self.models.head
    s_g_cls, s_l_cls = common.apply_head(head, student_params["head"],
                                         [s_g.tokens[:, :, 0], s_l.tokens[:, :, 0]])
    (t_cls,) = common.apply_head(head, teacher_params["head"], [t.tokens[:, :, 0]])
    t_cls = jax.lax.stop_gradient(t_cls)
    s_cls = jnp.concatenate([s_g_cls, s_l_cls], axis=1)  # [B, G + L, K]
    loss = glob_loss(s_cls, t_cls, centres["global"], t_temp, self.student_temp)
    new = {"global": common.update_centre(centres["global"], common.masked_vector_mean(t_cls),
                                          self.center_momentum)}
    return loss, ({"loss/glob": loss, "teacher_temp": t_temp}, new)
