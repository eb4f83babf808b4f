"""The GLARE objective, eq. 10 with weights:
L = w_glob L_glob + w_reg L_reg + w_loc1 L_loc1 + w_loc2 L_loc2.

The teacher sees the two clean global views, the student the globals (with L_loc1's
patch augmentation) and the locals; one projection head, one centre per level
('global', 'region', 'local'). What each term pairs, masks and averages:
docs/DESIGN.md, "GLARE's terms"; switches: "Readings of the paper".
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

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


def cross_view_matches(boxes: Array, flips: Array, global_grid, local_grid, *,
                       align_corners: bool = False) -> tuple[corr.Correspondence, ...]:
  """boxes [B, 2 + L, 4], flips [B, 2 + L] (globals first) -> where each global
  view's patches fall in the other global view [B, G, N] and each local view's in
  both global views [B, L, G, n] (L_loc2's and UDI's sample maps)."""
  bg, fg, bl, fl = boxes[:, :2], flips[:, :2], boxes[:, 2:], flips[:, 2:]
  corners = dict(align_corners=align_corners)
  in_other = corr.match_patches(bg, fg, global_grid, other(bg), other(fg), global_grid,
                                **corners)
  in_globals = corr.match_patches(bl[:, :, None], fl[:, :, None], local_grid, bg[:, None],
                                  fg[:, None], global_grid, **corners)
  return in_other, in_globals


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

class Backbones(NamedTuple):
  """The backbone passes of one step."""
  teacher_global: common.Views     # teacher on the clean globals [B, G]
  student_global: common.Views     # student globals read by L_glob, L_reg, L_loc2
  student_distorted: common.Views  # student on the distorted globals (L_loc1); the
                                   # same pass unless glare.student_input='clean'
  student_local: common.Views      # student on the locals [B, L]
  cells: Array | None              # [B, G, N] distorted cells, None without L_loc1


class TokenSets(NamedTuple):
  """The head's inputs and what normalises the terms (`_token_sets`)."""
  student: list[Array]    # [CLS] globals, [CLS] locals[, patches, locals' patches
                          # [, distorted patches]][, region CA outputs]
  teacher: list[Array]    # [CLS] globals[, patches][, region CA outputs]
  matches: tuple | None   # L_loc2's correspondences
  cells: Array | None
  reg_mask: Array | None  # [B, G, M, S] kept region patches inside the other view
  loc2_count: Array | None
  reg_count: Array | None
  metrics: dict[str, Array]


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
    """Eq. 10 with weights, sum_k w_k L_k -> (loss, (metrics, new centres)), in four
    steps: backbones -> token sets -> head sums -> centres."""
    boxes, flips = batch["boxes"], batch["flips"]                 # [B, G + L, 4], [B, G + L]
    b, g = batch["global_crops"].shape[:2]
    if g != 2:
      raise ValueError(f"GLARE pairs each global view with the other one: needs 2 global "
                       f"crops, got {g}")
    k_aug, k_reg, k_drop_g, k_drop_l = jax.random.split(rng, 4)
    t_temp = self.temperature(step)
    views = self._backbones(student_params, teacher_params, batch, k_aug, k_drop_g, k_drop_l)
    sets = self._token_sets(student_params, teacher_params, views, boxes, flips, k_reg)
    loss, sums, norm = self._weighted_head_sums(student_params, teacher_params, centres, sets,
                                                t_temp, b)
    metrics = {"teacher_temp": t_temp, **sets.metrics,
               **{f"loss/{k}": sums[k] / v for k, v in norm.items()}}
    new = self._new_centres(centres, sums, norm, b * g, views.teacher_global.grid)
    return loss, (metrics, new)

  def _backbones(self, sp, tp, batch, k_aug, k_drop_g, k_drop_l) -> Backbones:
    """Teacher on the clean globals; student on the globals distorted for L_loc1
    (eq. 8), on the clean globals too with glare.student_input='clean', and on the
    locals."""
    clean_global, local = batch["global_crops"], batch["local_crops"]  # [B, G, ...], [B, L, ...]
    teacher_global = self.teacher(tp, clean_global)
    if teacher_global.num_prefix < 1:
      raise ValueError("GLARE needs a [CLS] token (model.num_prefix >= 1)")
    student_input, cells, patch_mask = clean_global, None, None
    if self.use_loc1:
      aug = paug.apply_patch_aug(k_aug, clean_global, self.patch_size, self.glare.patch_aug)
      student_input, cells, patch_mask = aug.images, aug.cells, aug.patch_mask
    student_distorted = self.student(sp, student_input, k_drop_g, patch_mask)
    student_global = student_distorted   # one pass for every term (iBOT's convention)
    if self.clean_student:
      student_global = self.student(sp, clean_global, jax.random.fold_in(k_drop_g, 1))
    student_local = self.student(sp, local, k_drop_l)
    return Backbones(teacher_global, student_global, student_distorted, student_local, cells)

  def _token_sets(self, sp, tp, views: Backbones, boxes, flips, key) -> TokenSets:
    """The head's inputs: [CLS] of every view (eq. 4), patch tokens (eqs. 8, 9) and
    the regions' cross-attention outputs (eqs. 5, 6), with the counts that
    normalise L_loc2 and L_reg (they need no head)."""
    w = self.glare
    teacher, student, local = views.teacher_global, views.student_global, views.student_local
    student_sets = [student.tokens[:, :, 0], local.tokens[:, :, 0]]  # [B, G, D], [B, L, D]
    teacher_sets = [teacher.tokens[:, :, 0]]                         # [B, G, D]
    metrics, matches, loc2_count, reg_mask, reg_count = {}, None, None, None, None
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      student_sets += [student.patches(), local.patches()]          # [B, G, N, D], [B, L, n, D]
      if self.clean_student:
        student_sets.append(views.student_distorted.patches())     # L_loc1's, index 4
      teacher_sets.append(teacher.patches())                        # [B, G, N, D]
    if self.use_loc1:
      metrics["loc1/distorted"] = jnp.mean(views.cells)
    if w.w_loc2 > 0:
      matches = self._loc2_matches(boxes, flips, teacher.grid, local.grid)
      loc2_count = matched(*matches)
      metrics["loc2/matched"] = loc2_count / sum(c.valid.size for c in matches)
    if w.w_reg > 0:
      region_student, region_teacher, reg_mask, kept = self._regions(
          sp, tp, teacher, student, boxes[:, :2], flips[:, :2], key)  # [B, G, M, S, D]
      student_sets.append(region_student)
      teacher_sets.append(region_teacher)
      reg_count = jnp.sum(reg_mask.astype(jnp.float32))
      metrics["reg/kept"] = jnp.mean(kept)
    return TokenSets(student_sets, teacher_sets, matches, views.cells, reg_mask, loc2_count,
                     reg_count, metrics)

  def _weighted_head_sums(self, sp, tp, centres, sets: TokenSets, t_temp, b):
    """The head on every token set and each term's sum over images; the loss is
    sum_k coef[k] sums[k] with coef = weight / normaliser. Over the batch at once or
    in chunks of `head_chunk_size` images (objectives/chunked.py: the same sums,
    one chunk's [rows, K] logits alive at a time)."""
    w = self.glare
    rest = dict(t_parts=sets.teacher, matches=sets.matches, cells=sets.cells,
                reg_mask=sets.reg_mask)
    consts = dict(head=tp["head"], centres=centres, t_temp=t_temp)
    head_sums = lambda sp_head, s_in, r, c: self._head_sums(
        sp_head, c["head"], c["centres"], dict(r, s_parts=s_in), c["t_temp"])
    norm = self._normalisers(b, 2, sets.loc2_count, sets.reg_count)
    weights = {"glob": w.w_glob, "loc1": w.w_loc1, "loc2": w.w_loc2, "reg": w.w_reg}
    coef = {k: jnp.asarray(weights[k] / v, jnp.float32) for k, v in norm.items()}
    size = w.head_chunk_size
    if 0 < size < b:
      if b % size:
        raise ValueError(f"config.glare.head_chunk_size={size} does not divide the batch of {b}")
      loss, sums = chunked.weighted_sums_in_chunks(head_sums, b // size, sp["head"],
                                                   sets.student, rest, consts, coef)
    else:
      sums = head_sums(sp["head"], sets.student, rest, consts)
      loss = chunked.weighted(sums, coef)
    return loss, sums, norm

  def _new_centres(self, centres, sums, norm, views, grid) -> dict[str, Array]:
    """Each level's centre moved towards the mean of its teacher outputs: [CLS] over
    the `views` = B G teacher globals, patches over their N patches each, regions
    over the kept region patches."""
    w, m = self.glare, self.center_momentum
    new = dict(centres)
    if w.w_glob > 0:
      new["global"] = common.update_centre(centres["global"], sums["c_global"] / views, m)
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      patches = views * grid[0] * grid[1]
      new["local"] = common.update_centre(centres["local"], sums["c_local"] / patches, m)
    if w.w_reg > 0:
      new["region"] = common.update_centre(centres["region"], sums["c_region"] / norm["reg"], m)
    return new

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
    student_out = common.apply_head(self.models.head, sp_head, inp["s_parts"])
    teacher_out = common.apply_head(self.models.head, tp_head, inp["t_parts"])
    teacher_out = [jax.lax.stop_gradient(x) for x in teacher_out]
    student_cls = jnp.concatenate(student_out[:2], axis=1)  # [b, G + L, K]
    teacher_cls = teacher_out[0]                            # [b, G, K]
    b, g = teacher_cls.shape[:2]
    rows = lambda x: jnp.sum(x.reshape(-1, x.shape[-1]), 0)  # [..., K] -> [K]
    out = {}
    if w.w_glob > 0:   # eq. 4
      out["glob"] = b * glob_loss(student_cls, teacher_cls, centres["global"], t_temp, s_temp)
      out["c_global"] = rows(teacher_cls)
    if w.w_loc1 > 0 or w.w_loc2 > 0:
      student_patches, local_patches = student_out[2], student_out[3]  # [b,G,N,K], [b,L,n,K]
      teacher_patches = teacher_out[1]                                 # [b, G, N, K]
      c = centres["local"]
      if self.use_loc1:   # eq. 8
        distorted = student_out[4] if self.clean_student else student_patches
        out["loc1"] = b * g * loc1_loss(distorted, teacher_patches, inp["cells"], c, t_temp,
                                        s_temp)
      if w.w_loc2 > 0:    # eq. 9
        out["loc2"] = self._loc2_sum(student_patches, local_patches, teacher_patches,
                                     *inp["matches"], c, t_temp)
      out["c_local"] = rows(teacher_patches)
    if w.w_reg > 0:       # eq. 7
      region_student, region_teacher = student_out[-1], teacher_out[-1]  # [b, G, M, S, K]
      mask = inp["reg_mask"].astype(jnp.float32)
      out["reg"], _ = reg_sums(region_student, region_teacher, mask, centres["region"], t_temp,
                               s_temp)
      out["c_region"] = rows(region_teacher * mask[..., None])
    return out

  def _regions(self, sp, tp, teacher: common.Views, student: common.Views, boxes, flips, key):
    """Eqs. 5 and 6: student and teacher cross-attention outputs [B, G, M, S, D] of
    the regions R of each global view X and their counterparts in X' = the other,
    the mask of kept region patches inside X' and the kept regions."""
    cfg = self.glare.regions
    b, g = boxes.shape[:2]
    hw = teacher.grid
    attn = teacher.attn.reshape(b * g, *teacher.attn.shape[2:])
    cls_attn = cls_patch_attention(attn, teacher.num_prefix)
    cls_attn = cls_attn.reshape(b, g, -1, hw[0] * hw[1])  # [B, G, heads, N]
    regions = reg.draw_regions(key, cfg, hw, (b, g), cls_attn)
    mapped = reg.map_regions(regions, boxes, flips, hw, other(boxes), other(flips), hw,
                             cfg.min_valid_fraction)
    ca = self.models.cross_attention
    z_s, z_t = region_features(
        lambda q, kv: ca.apply({"params": sp["cross_attention"]}, q, kv),
        lambda q_map, kv, mask: ca.apply({"params": tp["cross_attention"]}, None, kv, mask,
                                         q_map=q_map),
        student.last_patches(), other(teacher.last_patches()), regions, mapped)
    mask = mapped.inside & mapped.keep[..., None]  # [B, G, M, S]
    return z_s, jax.lax.stop_gradient(z_t), mask, mapped.keep

  _loc2_matches = staticmethod(cross_view_matches)   # where L_loc2's patches fall

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
