"""UDI's objective (the UDI -> UDI baseline of Tables 1, 2 and 4), after UDI's training code:
(L_cls + L_cls+ + L_patch) / 3, one centre per level. What each level pairs,
samples and masks: docs/DESIGN.md, "UDI's terms"; sample positions follow UDI's
corner-aligned grid (`udi.align_corners`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.data import correspondence as corr
from glare_jax.objectives import common
from glare_jax.objectives.glare import cross_view_matches, glob_loss, other

Array = jax.Array


def _masked_rows_mean(x: Array, mask: Array, axis: int) -> Array:
  """Mean of [..., S, K] rows over `axis` where mask [..., S] holds (0 if none)."""
  m = mask[..., None].astype(jnp.float32)
  return jnp.sum(x * m, axis) / jnp.maximum(jnp.sum(m, axis), 1.0)


class Samples(NamedTuple):
  """Where the stratified samples of one step sit and fall (`UdiObjective._samples`)."""
  global_index: Array     # [B, G, Sg] sampled patch of each student global view
  global_valid: Array     # [B, G, Sg] the sample's centre falls inside the other global
  global_map: Array       # [B, G, Sg, N] its bilinear weights over the other global's patches
  local_valid: Array      # [B, L, G, Sl] a local sample falls inside global view g
  local_map: Array        # [B, L, G, Sl, N] its weights over global view g's patches


class Heads(NamedTuple):
  """Head logits of one step (`UdiObjective._heads`); K = the head's output size."""
  student_cls: Array        # [B, V, K] [CLS] of every view, globals first
  student_cls_plus: Array   # [B, V, K] [CLS+] of every view
  student_patch: Array      # [B, G, Sg, K] student cross-attention at the global samples
  teacher_cls: Array        # [B, G, K] teacher [CLS] of the globals
  teacher_global: Array     # [B, G(v), Sg, K] teacher targets of global view v's samples
  teacher_local: Array      # [B, L, G, Sl, K] teacher outputs of the local samples in view g


@dataclasses.dataclass(frozen=True, eq=False)
class UdiObjective(common.ObjectiveBase):
  udi: mlc.ConfigDict = None

  def init_centres(self) -> dict[str, Array]:
    return self.zero_centres("cls", "cls_plus", "patch")

  def __call__(self, student_params: Any, teacher_params: Any, centres: dict[str, Array],
               batch: dict[str, Array], rng: Array, step: Array):
    """(l_cls + l_cls_plus + l_patch) / 3 -> (loss, (metrics, new centres)), in steps:
    backbones -> samples -> cross-attention -> heads -> the three terms -> centres."""
    g = batch["global_crops"].shape[1]
    if g != 2:
      raise ValueError(f"UDI pairs each global view with the other one: needs 2 global crops, got {g}")
    k_drop_g, k_drop_l, k_sample_g, k_sample_l = jax.random.split(rng, 4)
    t_temp = self.temperature(step)
    teacher_global = self.teacher(teacher_params, batch["global_crops"])     # [B, G]
    student_global = self.student(student_params, batch["global_crops"], k_drop_g)
    student_local = self.student(student_params, batch["local_crops"], k_drop_l)  # [B, L]
    if teacher_global.num_prefix != 2:
      raise ValueError("the UDI objective needs [CLS] and [CLS+] (model.num_prefix == 2)")
    samples = self._samples(batch["boxes"], batch["flips"], teacher_global.grid[0],
                            student_local.grid[0], k_sample_g, k_sample_l)
    student_ca, teacher_ca_global, teacher_ca_local = self._cross_attention(
        student_params, teacher_params, student_global, teacher_global, samples)
    heads = self._heads(student_params, teacher_params, student_global, student_local,
                        teacher_global, student_ca, teacher_ca_global, teacher_ca_local)
    terms, mixtures = self._terms(heads, samples, centres, t_temp)
    loss = (terms["cls"] + terms["cls_plus"] + terms["patch"]) / 3.0
    new = self._new_centres(centres, heads, samples, mixtures)
    metrics = {**{f"loss/{k}": v for k, v in terms.items()}, "teacher_temp": t_temp,
               "patch/matched": jnp.mean(samples.global_valid)}
    return loss, (metrics, new)

  def _samples(self, boxes, flips, global_grid: int, local_grid: int, key_global,
               key_local) -> Samples:
    """One stratified draw per image and view kind (the same positions for both
    globals, and for all locals, of an image, as UDI), and where each sample falls
    in the teacher's globals: global samples in the other global, local samples in
    both."""
    cfg = self.udi
    b, nl = boxes.shape[0], boxes.shape[1] - 2
    n = global_grid * global_grid
    global_index = common.window_samples(key_global, (b, 1), global_grid, cfg.global_window,
                                         cfg.random_sampling)
    local_index = common.window_samples(key_local, (b, 1), local_grid, cfg.local_window,
                                        cfg.random_sampling)
    sg, sl = global_index.shape[-1], local_index.shape[-1]
    global_index = jnp.broadcast_to(global_index, (b, 2, sg))                   # [B, G, Sg]
    local_index = jnp.broadcast_to(local_index[:, :, None], (b, nl, 2, sl))     # [B, L, G, Sl]
    take = common.gather_tokens
    in_other, in_globals = cross_view_matches(boxes, flips, global_grid, local_grid,
                                              align_corners=cfg.align_corners)
    return Samples(
        global_index=global_index,
        global_valid=jnp.take_along_axis(in_other.valid, global_index, -1),
        global_map=corr.interpolation_matrix(take(in_other.index, global_index),
                                             take(in_other.weight, global_index), n),
        local_valid=jnp.take_along_axis(in_globals.valid, local_index, -1),
        local_map=corr.interpolation_matrix(take(in_globals.index, local_index),
                                            take(in_globals.weight, local_index), n))

  def _cross_attention(self, sp, tp, student_global: common.Views,
                       teacher_global: common.Views, samples: Samples):
    """Student cross-attention at its global samples (query = the sampled tokens,
    keys/values = all patch tokens of the view) -> [B, G, Sg, D]; teacher
    cross-attention per teacher view t, queries interpolated in t from the other
    global's samples -> [B, G(v), Sg, D] and from every local's -> [B, L, G, Sl, D].
    The teacher's maps mix its tokens after the module's norm1, as UDI's."""
    ca = self.models.cross_attention
    student_tokens = student_global.last_patches()                           # [B, G, N, D]
    teacher_tokens = teacher_global.last_patches()                           # [B, G, N, D]
    b, g, n, d = teacher_tokens.shape
    sg = samples.global_index.shape[-1]
    nl, sl = samples.local_map.shape[1], samples.local_map.shape[3]
    queries = common.gather_tokens(student_tokens, samples.global_index)     # [B, G, Sg, D]
    student_ca = ca.apply({"params": sp["cross_attention"]}, queries.reshape(b * g, sg, d),
                          student_tokens.reshape(b * g, n, d)).reshape(b, g, sg, d)
    map_global = other(samples.global_map)                                   # [B, G(t), Sg, N]
    map_local = jnp.moveaxis(samples.local_map, 2, 1).reshape(b, g, nl * sl, n)
    maps = jnp.concatenate([map_global, map_local], axis=2)                  # [B, G(t), Q, N]
    teacher_ca = ca.apply({"params": tp["cross_attention"]}, None,
                          teacher_tokens.reshape(b * g, n, d),
                          q_map=maps.reshape(b * g, sg + nl * sl, n))
    teacher_ca = jax.lax.stop_gradient(teacher_ca).reshape(b, g, sg + nl * sl, d)
    teacher_ca_global = other(teacher_ca[:, :, :sg])                         # [B, G(v), Sg, D]
    teacher_ca_local = teacher_ca[:, :, sg:].reshape(b, g, nl, sl, d).transpose(0, 2, 1, 3, 4)
    return student_ca, teacher_ca_global, teacher_ca_local

  def _heads(self, sp, tp, student_global, student_local, teacher_global, student_ca,
             teacher_ca_global, teacher_ca_local) -> Heads:
    """The shared head on the prefix tokens and the cross-attention outputs."""
    head = self.models.head
    s_global, s_local, s_patch = common.apply_head(
        head, sp["head"], [student_global.tokens[:, :, :2], student_local.tokens[:, :, :2],
                           student_ca])
    t_cls, t_global, t_local = [jax.lax.stop_gradient(x) for x in common.apply_head(
        head, tp["head"], [teacher_global.tokens[:, :, 0], teacher_ca_global,
                           teacher_ca_local])]
    return Heads(student_cls=jnp.concatenate([s_global[:, :, 0], s_local[:, :, 0]], 1),
                 student_cls_plus=jnp.concatenate([s_global[:, :, 1], s_local[:, :, 1]], 1),
                 student_patch=s_patch, teacher_cls=t_cls, teacher_global=t_global,
                 teacher_local=t_local)

  def _terms(self, heads: Heads, samples: Samples, centres, t_temp):
    """The three levels -> ({'cls', 'cls_plus', 'patch'}: scalar), and the [CLS+]
    targets (mixtures of the global views [B, G, K] and of the locals [B, L, G, K]).

    cls: DINO on [CLS], pairs v != t. patch: masked mean of H over the global samples
    that fall inside the other view. cls_plus: [CLS+] of view v against
    a * (masked mean of the teacher's sample logits of v in t) + (1 - a) * teacher
    [CLS] of t, over the pairs v != t (locals: against both globals)."""
    s_temp, a = self.student_temp, self.udi.mix_weight
    g, nl = heads.teacher_cls.shape[1], heads.teacher_local.shape[1]
    l_cls = glob_loss(heads.student_cls, heads.teacher_cls, centres["cls"], t_temp, s_temp)
    l_patch = common.masked_mean(
        common.cross_entropy(heads.teacher_global, heads.student_patch, centres["patch"],
                             t_temp, s_temp), samples.global_valid)
    mix_global = (a * _masked_rows_mean(heads.teacher_global, samples.global_valid, 2)
                  + (1 - a) * other(heads.teacher_cls))                        # [B, G, K]
    mix_local = (a * _masked_rows_mean(heads.teacher_local, samples.local_valid, 3)
                 + (1 - a) * heads.teacher_cls[:, None])                       # [B, L, G, K]
    plus = heads.student_cls_plus
    ce_global = common.cross_entropy(mix_global, plus[:, :g], centres["cls_plus"], t_temp,
                                     s_temp)                                   # [B, G]
    ce_local = common.cross_entropy(mix_local, plus[:, g:, None], centres["cls_plus"], t_temp,
                                    s_temp)                                    # [B, L, G]
    l_plus = jnp.mean(ce_global.sum(1) + ce_local.sum((1, 2))) / (g + nl * g)
    return {"cls": l_cls, "cls_plus": l_plus, "patch": l_patch}, (mix_global, mix_local)

  def _new_centres(self, centres, heads: Heads, samples: Samples, mixtures):
    """Each level's centre moved towards the mean of its teacher targets: [CLS] over
    the globals, [CLS+] over every mixture, patches over the samples inside."""
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  [..., K] -> [rows, K]
    mix_rows = jnp.concatenate([flat(m) for m in mixtures])
    patch_rows = jnp.concatenate([flat(heads.teacher_global), flat(heads.teacher_local)])
    patch_mask = jnp.concatenate([samples.global_valid.reshape(-1),
                                  samples.local_valid.reshape(-1)])
    m = self.center_momentum
    return {
        "cls": common.update_centre(centres["cls"],
                                    common.masked_vector_mean(heads.teacher_cls), m),
        "cls_plus": common.update_centre(centres["cls_plus"],
                                         common.masked_vector_mean(mix_rows), m),
        "patch": common.update_centre(centres["patch"],
                                      common.masked_vector_mean(patch_rows, patch_mask), m),
    }
