"""FLSL's objective (the UDI -> FLSL baseline of Tables 1 and 2), after FLSL's training code:
one mean-shift step of sampled patch tokens, then a cosine term, a teacher/student
cross-entropy and a volume term. The views, the mean-shift and the loss:
docs/DESIGN.md, "FLSL's terms".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.models.vit import ViT
from glare_jax.objectives import common

Array = jax.Array


def _normalise(x: Array) -> Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def meanshift(x: Array, keys: Array, scale: float) -> Array:
  """One mean-shift step: softmax(scale x keys^T) keys; x [..., S, D], keys [..., N, D]."""
  attn = jax.nn.softmax(jnp.einsum("...sd,...nd->...sn", x, keys) * scale, axis=-1)
  return jnp.einsum("...sn,...nd->...sd", attn, keys)


def volume_maximisation(probs: Array) -> Array:
  """KL(mean of the rows of probs [..., K] || uniform) = sum p log p + log K."""
  p_bar = probs.reshape(-1, probs.shape[-1]).mean(0)
  return jnp.sum(jax.scipy.special.xlogy(p_bar, p_bar)) + math.log(probs.shape[-1])


@dataclasses.dataclass(frozen=True, eq=False)
class FlslObjective(common.ObjectiveBase):
  flsl: mlc.ConfigDict = None
  student_vit: ViT | None = None  # the backbones FLSL runs (without prefix tokens)
  teacher_vit: ViT | None = None

  def init_centres(self) -> dict[str, Array]:
    return {}

  def backbone_params(self, params: Any) -> Any:
    """The backbone tree as the prefix-free ViT expects it (cls_token and prefix rows dropped)."""
    p = params["backbone"]
    prefix = self.models.teacher.num_prefix
    if not self.flsl.drop_prefix or prefix == 0:
      return p
    out = {k: v for k, v in p.items() if k != "cls_token"}
    out["pos_embed"] = p["pos_embed"][:, prefix:]
    return out

  def __call__(self, student_params: Any, teacher_params: Any, centres: dict[str, Array],
               batch: dict[str, Array], rng: Array, step: Array):
    cfg = self.flsl
    g_img, l_img = batch["global_crops"], batch["local_crops"]
    b = g_img.shape[0]
    k_g, k_l, k_sg, k_sl = jax.random.split(rng, 4)
    t_temp, s_temp = self.temperature(step), self.student_temp

    t = common.run_backbone(self.teacher_vit, self.backbone_params(teacher_params),
                            g_img[:, :1], train=False)
    s_g = common.run_backbone(self.student_vit, self.backbone_params(student_params),
                              g_img[:, 1:], train=True, rng=k_g)
    s_l = common.run_backbone(self.student_vit, self.backbone_params(student_params),
                              l_img, train=True, rng=k_l)
    enc_t = jax.lax.stop_gradient(t.patches()[:, 0])  # [B, N, D]
    tau_sa, tau_ca = cfg.meanshift_sa_scale, cfg.meanshift_ca_scale

    xs, mode_s, mode_t = [], [], []
    for views, window, key in ((s_g, cfg.global_window, k_sg), (s_l, cfg.local_window, k_sl)):
      enc = views.patches()  # [B, V, N, D]
      idx = common.window_samples(key, enc.shape[:2], views.grid[0], window, cfg.random_sampling)
      x = common.gather_tokens(enc, idx)  # [B, V, S, D]
      xs.append(x)
      mode_s.append(meanshift(x, enc, tau_sa))
      mode_t.append(meanshift(jax.lax.stop_gradient(x), enc_t[:, None], tau_ca))

    head = self.models.head
    s_pred = common.apply_head(head, student_params["head"], mode_s)
    t_pred = [jax.lax.stop_gradient(p) for p in
              common.apply_head(head, teacher_params["head"], mode_t)]
    flat = lambda parts: jnp.concatenate([p.reshape(b, -1) for p in parts], 1)  # [B, tokens]
    cos = flat([jnp.sum(_normalise(x) * _normalise(m), -1) for x, m in zip(xs, mode_s)])
    l_ms = 2.0 - 2.0 * jnp.mean(cos)
    ce = flat([common.cross_entropy(tp, sp, None, t_temp, s_temp) for tp, sp in zip(t_pred, s_pred)])
    l_ce = jnp.mean(ce)
    probs = jnp.concatenate([jax.nn.softmax(p / s_temp, -1).reshape(-1, p.shape[-1]) for p in s_pred])
    l_vol = volume_maximisation(probs)
    loss = cfg.w_ms * l_ms + cfg.w_ce * l_ce + cfg.w_vol * l_vol
    metrics = {"loss/meanshift": l_ms, "loss/kmeans": l_ce, "loss/vmr": l_vol, "teacher_temp": t_temp}
    return loss, (metrics, dict(centres))
