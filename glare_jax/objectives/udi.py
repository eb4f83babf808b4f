"""UDI's objective (the UDI -> UDI baseline of Tables 1, 2 and 4), after UDI's main_udi.py.

Three levels, averaged with equal weights, each with its own centre:

* 'cls': DINO loss on [CLS]: teacher globals vs every student view, pairs v != t.
* 'patch': stratified samples of each student global view (one token per
  `global_window`^2 window, the window grid in a random corner; the same sample
  positions for both globals of an image) go through the student cross-attention
  (query = the sampled tokens, keys/values = all patch tokens of the view) and the
  head. The target is the teacher cross-attention output at the bilinearly mapped
  position in the other global view (query interpolated there, keys/values = all
  teacher patch tokens of that view). Samples whose centre falls outside the other
  view are masked; masked mean over everything.
* 'cls_plus': the student's [CLS+] against a logit-space mixture
  `mix_weight * (masked mean of the teacher's patch logits at the view's samples)
  + (1 - mix_weight) * teacher [CLS] logits of that teacher view`. Local views
  are sampled too (`local_window`, the same positions for all locals of an image),
  mapped into both globals and passed through the teacher cross-attention for this
  mixture; they have no patch loss (UDI's `local_patch=False`). Pairs as for 'cls'.

Cross-attention inputs are the last block's tokens before the final LayerNorm;
the teacher's queries are interpolated from them after the module's norm1, as
UDI's maps are applied. Sample positions follow UDI's corner-aligned grid
(`udi.align_corners`, data/correspondence.py); False uses GLARE's patch centres.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.data import correspondence as corr
from glare_jax.objectives import common
from glare_jax.objectives.glare import glob_loss, other

Array = jax.Array


def _masked_rows_mean(x: Array, mask: Array, axis: int) -> Array:
  """Mean of [..., S, K] rows over `axis` where mask [..., S] holds (0 if none)."""
  m = mask[..., None].astype(jnp.float32)
  return jnp.sum(x * m, axis) / jnp.maximum(jnp.sum(m, axis), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class UdiObjective(common.ObjectiveBase):
  udi: mlc.ConfigDict = None

  def init_centres(self) -> dict[str, Array]:
    return self.zero_centres("cls", "cls_plus", "patch")

  def __call__(self, student_params: Any, teacher_params: Any, centres: dict[str, Array],
               batch: dict[str, Array], rng: Array, step: Array):
    cfg = self.udi
    g_img, l_img = batch["global_crops"], batch["local_crops"]
    boxes, flips = batch["boxes"], batch["flips"]
    b, g = g_img.shape[:2]
    nl = l_img.shape[1]
    if g != 2:
      raise ValueError(f"UDI pairs each global view with the other one: needs 2 global crops, got {g}")
    k_g, k_l, k_sg, k_sl = jax.random.split(rng, 4)
    t_temp, s_temp = self.temperature(step), self.student_temp

    t = self.teacher(teacher_params, g_img)
    s_g = self.student(student_params, g_img, k_g)
    s_l = self.student(student_params, l_img, k_l)
    if t.num_prefix != 2:
      raise ValueError("the UDI objective needs [CLS] and [CLS+] (model.num_prefix == 2)")
    gg, gl = t.grid[0], s_l.grid[0]
    n = gg * gg

    # Stratified samples; one draw per image and view kind, as UDI.
    idx_g = common.window_samples(k_sg, (b, 1), gg, cfg.global_window, cfg.random_sampling)
    idx_l = common.window_samples(k_sl, (b, 1), gl, cfg.local_window, cfg.random_sampling)
    sg, sl = idx_g.shape[-1], idx_l.shape[-1]
    idx_g = jnp.broadcast_to(idx_g, (b, g, sg))
    idx_l4 = jnp.broadcast_to(idx_l[:, :, None], (b, nl, g, sl))

    # Where the samples fall in the teacher's globals.
    bg, fg, bl, fl = boxes[:, :g], flips[:, :g], boxes[:, g:], flips[:, g:]
    corners = dict(align_corners=cfg.align_corners)
    cg = corr.match_patches(bg, fg, gg, other(bg), other(fg), gg, **corners)        # [B, G, N]
    valid_g = jnp.take_along_axis(cg.valid, idx_g, -1)                                # [B, G, Sg]
    take = common.gather_tokens
    interp_g = corr.interpolation_matrix(take(cg.index, idx_g), take(cg.weight, idx_g), n)
    cl = corr.match_patches(bl[:, :, None], fl[:, :, None], gl, bg[:, None], fg[:, None], gg,
                            **corners)
    valid_l = jnp.take_along_axis(cl.valid, idx_l4, -1)                               # [B, L, G, Sl]
    interp_l = corr.interpolation_matrix(take(cl.index, idx_l4), take(cl.weight, idx_l4), n)

    ca = self.models.cross_attention
    d = t.last.shape[-1]
    # Student cross-attention on the global samples.
    xs = s_g.last_patches()                                                           # [B, G, N, D]
    q_s = common.gather_tokens(xs, idx_g)
    z_s = ca.apply({"params": student_params["cross_attention"]},
                   q_s.reshape(b * g, sg, d), xs.reshape(b * g, n, d)).reshape(b, g, sg, d)
    # Teacher cross-attention per teacher view t: queries from the other global's
    # samples and from every local's samples, all interpolated in view t.
    # The maps mix the normalised teacher tokens (after the module's norm1, as UDI).
    xt = t.last_patches()                                                             # [B, G, N, D]
    map_g = other(interp_g)                                      # [B, G(t), Sg, N]
    map_l = jnp.moveaxis(interp_l, 2, 1).reshape(b, g, nl * sl, n)                   # [B, G(t), L Sl, N]
    map_t = jnp.concatenate([map_g, map_l], axis=2)
    z_t = ca.apply({"params": teacher_params["cross_attention"]}, None,
                   xt.reshape(b * g, n, d), q_map=map_t.reshape(b * g, sg + nl * sl, n))
    z_t = jax.lax.stop_gradient(z_t).reshape(b, g, sg + nl * sl, d)
    z_tg = other(z_t[:, :, :sg])                                                      # [B, G(v), Sg, D]
    z_tl = z_t[:, :, sg:].reshape(b, g, nl, sl, d).transpose(0, 2, 1, 3, 4)           # [B, L, G, Sl, D]

    head = self.models.head
    s_gc, s_lc, s_patch = common.apply_head(
        head, student_params["head"], [s_g.tokens[:, :, :2], s_l.tokens[:, :, :2], z_s])
    t_cls, t_pg, t_pl = [jax.lax.stop_gradient(x) for x in common.apply_head(
        head, teacher_params["head"], [t.tokens[:, :, 0], z_tg, z_tl])]
    s_cls = jnp.concatenate([s_gc[:, :, 0], s_lc[:, :, 0]], 1)                       # [B, V, K]
    s_plus = jnp.concatenate([s_gc[:, :, 1], s_lc[:, :, 1]], 1)                      # [B, V, K]

    l_cls = glob_loss(s_cls, t_cls, centres["cls"], t_temp, s_temp)
    l_patch = common.masked_mean(
        common.cross_entropy(t_pg, s_patch, centres["patch"], t_temp, s_temp), valid_g)
    a = cfg.mix_weight
    mix_g = a * _masked_rows_mean(t_pg, valid_g, 2) + (1 - a) * other(t_cls)         # [B, G, K]
    mix_l = a * _masked_rows_mean(t_pl, valid_l, 3) + (1 - a) * t_cls[:, None]       # [B, L, G, K]
    ce_g = common.cross_entropy(mix_g, s_plus[:, :g], centres["cls_plus"], t_temp, s_temp)
    ce_l = common.cross_entropy(mix_l, s_plus[:, g:, None], centres["cls_plus"], t_temp, s_temp)
    l_plus = jnp.mean(ce_g.sum(1) + ce_l.sum((1, 2))) / (g + nl * g)
    loss = (l_cls + l_plus + l_patch) / 3.0

    mix_rows = jnp.concatenate([mix_g.reshape(-1, mix_g.shape[-1]), mix_l.reshape(-1, mix_l.shape[-1])])
    patch_rows = jnp.concatenate([t_pg.reshape(-1, t_pg.shape[-1]), t_pl.reshape(-1, t_pl.shape[-1])])
    patch_mask = jnp.concatenate([valid_g.reshape(-1), valid_l.reshape(-1)])
    m = self.center_momentum
    new = {
        "cls": common.update_centre(centres["cls"], common.masked_vector_mean(t_cls), m),
        "cls_plus": common.update_centre(centres["cls_plus"], common.masked_vector_mean(mix_rows), m),
        "patch": common.update_centre(centres["patch"],
                                      common.masked_vector_mean(patch_rows, patch_mask), m),
    }
    metrics = {"loss/cls": l_cls, "loss/cls_plus": l_plus, "loss/patch": l_patch,
               "teacher_temp": t_temp, "patch/matched": jnp.mean(valid_g)}
    return loss, (metrics, new)
