"""The GLARE objective: L = w_glob L_glob + w_reg L_reg + w_loc1 L_loc1 + w_loc2 L_loc2.

Views: G = 2 global crops (teacher and student) and L local crops (student only).
The student sees its globals once, with the patch augmentation of L_loc1 applied
(that single pass feeds every term), and its locals in a second backbone call; the
teacher sees the clean globals in one call. One projection head serves every
level; one centre per level ('global', 'region', 'local').

* L_glob (eq. 4): DINO loss on [CLS]: every (teacher global t, student view v) pair
  with v != t, averaged over pairs and images.
* L_reg (eqs. 5-7): M regions per student global view X (data/regions.py), each
  paired with the other global view X'. Student: z~_r = CA(q = student tokens of
  R's patches, k = v = all student patch tokens of X). Teacher (EMA CA, no
  gradient): z~'_r = CA(q = teacher tokens of X' interpolated bilinearly at the
  positions of R's patch centres, after the module's norm1 as in UDI's
  MaskedAttention, k = v = teacher tokens of the X' patches of R', the patches
  overlapping the area R covers). The loss is H(g'(z~'_r), g(z~_r))
  for every patch r of a kept region whose centre lies inside X', averaged over
  all such (image, view, region, patch) entries. Cross-attention inputs are the
  last block's tokens before the final LayerNorm, as UDI's module was trained.
* L_loc1 (eq. 8): on the student's distorted globals, H(teacher clean view, student)
  over the distorted patches: masked mean per view (denominator clamped at 1),
  then mean over views and images (iBOT).
* L_loc2 (eq. 9): every student patch of every view is carried into each teacher
  global that is not its own view; the target is the teacher distribution there,
  bilinear over the 4 neighbouring teacher patches; positions outside the teacher
  view are masked. Averaged over all matched (patch, teacher view) pairs.

A term with weight 0 is not computed (nor reported), and the patch augmentation is
applied only while L_loc1 is on; `patch_aug.kind = 'none'` drops L_loc1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.data import correspondence as corr
from glare_jax.data import patch_aug as paug
from glare_jax.data import regions as reg
from glare_jax.models.vit import cls_patch_attention
from glare_jax.objectives import chunked, common

Array = jax.Array
STUDENT_INPUTS = ("distorted", "clean")


def other(x: Array) -> Array:
  """[B, 2, ...] per-global-view arrays -> those of the other global view."""
  return x[:, ::-1]


# ---------------------------------------------------------------- loss terms

def glob_loss(s_cls: Array, t_cls: Array, centre: Array, t_temp, s_temp: float) -> Array:
  """s_cls [B, V, K] (globals first), t_cls [B, G, K] -> mean over pairs v != t."""
  tp = common.teacher_probs(t_cls, centre, t_temp)
  ls = common.student_log_probs(s_cls, s_temp)
  ce = -jnp.einsum("btk,bvk->btv", tp, ls)  # [B, G, V]
  g, v = t_cls.shape[1], s_cls.shape[1]
  pairs = (jnp.arange(g)[:, None] != jnp.arange(v)[None, :]).astype(jnp.float32)
  return jnp.mean(jnp.sum(ce * pairs, (1, 2))) / jnp.sum(pairs)


def loc1_loss(s_patch: Array, t_patch: Array, cells: Array, centre: Array, t_temp,
              s_temp: float) -> Array:
  """[B, G, N, K] student (distorted) / teacher (clean) patches, cells [B, G, N]."""
  ce = common.cross_entropy(t_patch, s_patch, centre, t_temp, s_temp)  # [B, G, N]
  m = cells.astype(jnp.float32)
  per_view = jnp.sum(ce * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
  return jnp.mean(per_view)


def loc2_sum(s_patch: Array, t_patch: Array, index: Array, weight: Array, centre: Array,
             t_temp, s_temp: float) -> Array:
  """Sum over student patches of H(teacher target, student).

  s_patch [..., Q, K] student logits; t_patch [..., N, K] teacher logits; index,
  weight [..., Q, J]: patch q's target is sum_j weight[q, j] p_t[index[q, j]] (its
  4 bilinear neighbours in one teacher view, or those of several views whose rows
  are stacked in t_patch; weights are 0 where q has no match). Leading axes
  broadcast. J rows are gathered per patch (Q x J x K work), not a dense [Q, N]
  interpolation matrix contracted over K (Q x N x K, ~50x more at N = 196).
  """
  tp = common.teacher_probs(t_patch, centre, t_temp)      # [..., N, K]
  ls = common.student_log_probs(s_patch, s_temp)          # [..., Q, K]
  rows = lambda j: jnp.take_along_axis(tp, index[..., j, None], axis=-2, mode="clip")
  target = sum(weight[..., j, None] * rows(j) for j in range(index.shape[-1]))  # [..., Q, K]
  return -jnp.sum(target * ls)


def matched(*correspondences: corr.Correspondence) -> Array:
  """How many student patches have a match, over all the given correspondences."""
  return sum(jnp.sum(c.valid.astype(jnp.float32)) for c in correspondences)


def reg_sums(s_out: Array, t_out: Array, mask: Array, centre: Array, t_temp,
             s_temp: float) -> tuple[Array, Array]:
  """Sum and count of the region loss: [..., K] student / teacher CA-head outputs,
  mask [...] (the regions that stay inside the other view)."""
  ce = common.cross_entropy(t_out, s_out, centre, t_temp, s_temp)
  m = mask.astype(jnp.float32)
  return jnp.sum(ce * m), jnp.sum(m)


def reg_loss(s_out: Array, t_out: Array, mask: Array, centre: Array, t_temp,
             s_temp: float) -> Array:
  """Region loss: the masked mean of `reg_sums`."""
  total, count = reg_sums(s_out, t_out, mask, centre, t_temp, s_temp)
  return total / jnp.maximum(count, 1.0)


def region_features(student_ca, teacher_ca, xs: Array, xt: Array, regions: reg.Regions,
                    mapped: reg.MappedRegions) -> tuple[Array, Array]:
  """Cross-attention features of regions (eqs. 5 and 6).

  Args:
    student_ca: `(q [B', Q, D], kv [B', N, D]) -> [B', Q, D]`, teacher_ca: `(q_map
      [B', Q, N], kv [B', N, D], kv_mask [B', Q, N]) -> [B', Q, D]` (the
      CrossAttention module with student / teacher parameters; q_map's rows mix
      the normalised kv tokens into queries, as UDI's maps do).
    xs: [B, G, N, D] student patch tokens of each view X.
    xt: [B, G, N, D] teacher patch tokens of the paired view X'.
    regions: regions of X, index/valid [B, G, M, S].
    mapped: the regions carried into X'.
  Returns:
    z_s: CA(q = tokens of R's patches, kv = all tokens of X)                  [B, G, M, S, D]
    z_t: CA(q = X' tokens interpolated at R's centres, kv = X' tokens of R')  [B, G, M, S, D]
  The teacher's queries are interpolated from X' tokens after the module's norm1.
  """
  b, g, n, d = xs.shape
  m, s = regions.index.shape[-2:]
  q_s = common.gather_tokens(xs, regions.index.reshape(b, g, m * s))  # [B, G, M*S, D]
  z_s = student_ca(q_s.reshape(b * g, m * s, d), xs.reshape(b * g, n, d))
  interp = corr.interpolation_matrix(mapped.index, mapped.weight, n)  # [B, G, M, S, N]
  ctx = jnp.broadcast_to(mapped.context[:, :, :, None, :], (b, g, m, s, n))
  z_t = teacher_ca(interp.reshape(b * g, m * s, n), xt.reshape(b * g, n, d),
                   ctx.reshape(b * g, m * s, n))
  shape = (b, g, m, s, d)
  return z_s.reshape(shape), z_t.reshape(shape)


# ---------------------------------------------------------------- the objective

@dataclasses.dataclass(frozen=True, eq=False)
class GlareObjective(common.ObjectiveBase):
  """GLARE; hyperparameters from `config.glare` (weights, regions, patch_aug)."""
  glare: mlc.ConfigDict = None
  patch_size: int = 16

  def init_centres(self) -> dict[str, Array]:
    return self.zero_centres("global", "region", "local")

  @property
  def use_loc1(self) -> bool:
    return self.glare.w_loc1 > 0 and self.glare.patch_aug.kind != "none"

  @property
  def clean_student(self) -> bool:
    """A second student pass on the clean globals (only when they are distorted)."""
    mode = self.glare.get("student_input", "distorted")
    if mode not in STUDENT_INPUTS:
      raise ValueError(f"config.glare.student_input={mode!r}: use one of {STUDENT_INPUTS}")
    return self.use_loc1 and mode == "clean"

  def __call__(self, student_params: Any, teacher_params: Any, centres: dict[str, Array],
               batch: dict[str, Array], rng: Array, step: Array):
    g_img, l_img = batch["global_crops"], batch["local_crops"]  # [B, G, ...], [B, L, ...]
    boxes, flips = batch["boxes"], batch["flips"]                 # [B, G + L, 4], [B, G + L]
    b, g = g_img.shape[:2]
    if g != 2:
      raise ValueError(f"GLARE pairs each global view with the other one: needs 2 global crops, got {g}")
    k_aug, k_reg, k_drop_g, k_drop_l = jax.random.split(rng, 4)
    t_temp = self.temperature(step)
    w = self.glare
    metrics = {"teacher_temp": t_temp}

    # --- backbones: teacher on clean globals, student on distorted globals + locals.
    t = self.teacher(teacher_params, g_img)
    if self.use_loc1:
      aug = paug.apply_patch_aug(k_aug, g_img, self.patch_size, w.patch_aug)
      s_in, cells, patch_mask = aug.images, aug.cells, aug.patch_mask
    else:
      s_in, cells, patch_mask = g_img, None, None
    s_g = self.student(student_params, s_in, k_drop_g, patch_mask)
    # L_glob, L_reg and L_loc2 read this single pass (iBOT's convention), or with
    # glare.student_input='clean' a second pass on the clean globals (eqs. 4, 5, 9).
    s_main = s_g
    if self.clean_student:
      s_main = self.student(student_params, g_img, jax.random.fold_in(k_drop_g, 1))
    s_l = self.student(student_params, l_img, k_drop_l)
    if t.num_prefix < 1:
      raise ValueError("GLARE needs a [CLS] token (model.num_prefix >= 1)")

    # --- region branch (cross-attention outputs, before the head).
    s_parts = [s_main.tokens[:, :, 0], s_l.tokens[:, :, 0]]  # [CLS] of every view
    t_parts = [t.tokens[:, :, 0]]
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      s_parts += [s_main.patches(), s_l.patches()]
      if self.clean_student:
        s_parts.append(s_g.patches())  # L_loc1's distorted patches (index 4)
      t_parts += [t.patches()]
    if w.w_reg > 0:
      z_s, z_t, reg_mask, kept = self._regions(student_params, teacher_params, t, s_main,
                                               boxes[:, :g], flips[:, :g], k_reg)
      s_parts.append(z_s)
      t_parts.append(z_t)
      metrics["reg/kept"] = jnp.mean(kept)

    # --- the head on every token set and the loss terms as sums over images; the
    # loss is sum_k coef[k] sums[k] (coef = weight / normaliser; the normalisers are
    # counts that need no head). Over the whole batch at once, or in chunks of
    # `head_chunk_size` images, each differentiated as it is computed
    # (objectives/chunked.py), so that only one chunk's [rows, K] logits,
    # probabilities and their gradients are alive at a time (the same sums).
    # L_loc2's correspondences and the two counts, once for the batch.
    matches = self._loc2_matches(boxes, flips, t.grid, s_l.grid) if w.w_loc2 > 0 else None
    loc2_count = matched(*matches) if w.w_loc2 > 0 else None
    reg_mask = reg_mask if w.w_reg > 0 else None
    reg_count = jnp.sum(reg_mask.astype(jnp.float32)) if w.w_reg > 0 else None
    rest = dict(t_parts=t_parts, matches=matches, cells=cells, reg_mask=reg_mask)
    consts = dict(head=teacher_params["head"], centres=centres, t_temp=t_temp)
    head_sums = lambda sp_head, s_in, r, c: self._head_sums(
        sp_head, c["head"], c["centres"], dict(r, s_parts=s_in), c["t_temp"])
    norm = self._normalisers(b, g, loc2_count, reg_count)
    weights = {"glob": w.w_glob, "loc1": w.w_loc1, "loc2": w.w_loc2, "reg": w.w_reg}
    coef = {k: jnp.asarray(weights[k] / v, jnp.float32) for k, v in norm.items()}
    size = w.head_chunk_size
    if 0 < size < b:
      if b % size:
        raise ValueError(f"config.glare.head_chunk_size={size} does not divide the batch of {b}")
      loss, sums = chunked.weighted_sums_in_chunks(head_sums, b // size, student_params["head"],
                                                   s_parts, rest, consts, coef)
    else:
      sums = head_sums(student_params["head"], s_parts, rest, consts)
      loss = chunked.weighted(sums, coef)

    # Each term is its sum over images divided by its normaliser.
    metrics.update({f"loss/{k}": sums[k] / v for k, v in norm.items()})
    new = dict(centres)
    n = t.grid[0] * t.grid[1]
    if w.w_glob > 0:
      new["global"] = common.update_centre(centres["global"], sums["c_global"] / (b * g),
                                           self.center_momentum)
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      if self.use_loc1:
        metrics["loc1/distorted"] = jnp.mean(cells)
      if w.w_loc2 > 0:
        possible = b * g * (n + l_img.shape[1] * s_l.grid[0] * s_l.grid[1])
        metrics["loc2/matched"] = loc2_count / possible
      new["local"] = common.update_centre(centres["local"], sums["c_local"] / (b * g * n),
                                          self.center_momentum)
    if w.w_reg > 0:
      new["region"] = common.update_centre(centres["region"], sums["c_region"] / norm["reg"],
                                           self.center_momentum)
    return loss, (metrics, new)

  def _normalisers(self, b, g, loc2_count, reg_count) -> dict[str, Any]:
    """{term: the number its sum over images is divided by} for each term that is
    on; none depends on a parameter, so the loss is sum_k w_k / norm_k * sums[k]."""
    w = self.glare
    norm = {}
    if w.w_glob > 0:
      norm["glob"] = b
    if self.use_loc1:
      norm["loc1"] = b * g
    if w.w_loc2 > 0:
      norm["loc2"] = jnp.maximum(loc2_count, 1.0)
    if w.w_reg > 0:
      norm["reg"] = jnp.maximum(reg_count, 1.0)
    return norm

  def _head_sums(self, sp_head, tp_head, centres, inp, t_temp):
    """The head on the token sets of `inp` (a batch or a chunk of b images) and each
    term's sum over those images: glob (b x mean), loc1 (b G x mean), loc2 and reg
    (sums of H), and the sums of teacher outputs the centres move towards."""
    w, s_temp = self.glare, self.student_temp
    s_out = common.apply_head(self.models.head, sp_head, inp["s_parts"])
    t_out = common.apply_head(self.models.head, tp_head, inp["t_parts"])
    t_out = [jax.lax.stop_gradient(x) for x in t_out]
    s_cls = jnp.concatenate(s_out[:2], axis=1)  # [b, G + L, K]
    t_cls = t_out[0]                            # [b, G, K]
    b, g = t_cls.shape[:2]
    rows = lambda x: jnp.sum(x.reshape(-1, x.shape[-1]), 0)  # [..., K] -> [K]
    out = {}
    if w.w_glob > 0:
      out["glob"] = b * glob_loss(s_cls, t_cls, centres["global"], t_temp, s_temp)
      out["c_global"] = rows(t_cls)
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      s_gp, s_lp, t_p = s_out[2], s_out[3], t_out[1]  # [b,G,N,K], [b,L,n,K], [b,G,N,K]
      c = centres["local"]
      if self.use_loc1:
        s_distorted = s_out[4] if self.clean_student else s_gp
        out["loc1"] = b * g * loc1_loss(s_distorted, t_p, inp["cells"], c, t_temp, s_temp)
      if w.w_loc2 > 0:
        out["loc2"] = self._loc2_sum(s_gp, s_lp, t_p, *inp["matches"], c, t_temp)
      out["c_local"] = rows(t_p)
    if w.w_reg > 0:
      z_s_out, z_t_out = s_out[-1], t_out[-1]  # [b, G, M, S, K]
      mask = inp["reg_mask"].astype(jnp.float32)
      out["reg"], _ = reg_sums(z_s_out, z_t_out, mask, centres["region"], t_temp, s_temp)
      out["c_region"] = rows(z_t_out * mask[..., None])
    return out

  def _regions(self, sp, tp, t: common.Views, s_g: common.Views, boxes, flips, key):
    """Student and teacher cross-attention outputs [B, G, M, S, D] of the regions."""
    cfg = self.glare.regions
    b, g = boxes.shape[:2]
    hw = t.grid
    cls_attn = cls_patch_attention(t.attn.reshape(b * g, *t.attn.shape[2:]), t.num_prefix)
    cls_attn = cls_attn.reshape(b, g, -1, hw[0] * hw[1])  # [B, G, heads, N]
    regions = reg.draw_regions(key, cfg, hw, (b, g), cls_attn)
    mapped = reg.map_regions(regions, boxes, flips, hw, other(boxes), other(flips), hw,
                             cfg.min_valid_fraction)
    ca = self.models.cross_attention
    z_s, z_t = region_features(
        lambda q, kv: ca.apply({"params": sp["cross_attention"]}, q, kv),
        lambda q_map, kv, mask: ca.apply({"params": tp["cross_attention"]}, None, kv, mask,
                                         q_map=q_map),
        s_g.last_patches(), other(t.last_patches()), regions, mapped)
    mask = mapped.inside & mapped.keep[..., None]  # [B, G, M, S]
    return z_s, jax.lax.stop_gradient(z_t), mask, mapped.keep

  @staticmethod
  def _loc2_matches(boxes, flips, g_grid, l_grid) -> tuple[corr.Correspondence, ...]:
    """Where L_loc2's student patches fall: each global view's in the other global
    view [B, G, N], each local view's in both global views [B, L, G, n]."""
    g = 2   # GLARE pairs the two global views (checked in __call__)
    bg, fg, bl, fl = boxes[:, :g], flips[:, :g], boxes[:, g:], flips[:, g:]
    cg = corr.match_patches(bg, fg, g_grid, other(bg), other(fg), g_grid)
    cl = corr.match_patches(bl[:, :, None], fl[:, :, None], l_grid, bg[:, None], fg[:, None],
                            g_grid)
    return cg, cl

  def _loc2_sum(self, s_gp, s_lp, t_p, cg, cl, centre, t_temp):
    """L_loc2's sum of H over student globals (-> the other global) and locals (-> both
    globals), at the correspondences cg, cl of `_loc2_matches` (count: `matched`)."""
    g = t_p.shape[1]
    # Globals: view v against the teacher's other global view.
    sum_g = loc2_sum(s_gp, other(t_p), cg.index, cg.weight, centre, t_temp,
                     self.student_temp)
    # Locals: every local view against both teacher views, one target per patch
    # from the 4 neighbours in each view (rows of the views stacked: 4 G weights).
    b, nl, _, q, _ = cl.index.shape
    n = t_p.shape[2]
    stacked = cl.index + n * jnp.arange(g)[:, None, None]                        # row in [G * N]
    fold = lambda x: jnp.moveaxis(x, 2, 3).reshape(b, nl, q, g * 4)             # [B, L, n, 4 G]
    sum_l = loc2_sum(s_lp, t_p.reshape(b, 1, g * n, -1), fold(stacked), fold(cl.weight),
                     centre, t_temp, self.student_temp)
    return sum_g + sum_l
