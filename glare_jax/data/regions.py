"""Candidate regions for L_reg (paper 4.2, Table 8) and their counterparts in another view.

A region is a rectangle of `rows x cols` patches, each side drawn uniformly from
[min_p, max_p] (clipped to the grid), placed around a start patch:

  * 'attention' sampling: one region per head of the teacher's last block, the
    start patch being the argmax of that head's [CLS] -> patch attention;
  * 'random' sampling: M start patches drawn uniformly over the grid.

"Around": the start patch sits at a uniformly random offset inside the region
(offset_r ~ U{0..rows-1}, offset_c ~ U{0..cols-1}); the rectangle is then shifted,
not shrunk, to lie inside the grid. The start patch is always part of its region.

Static shapes: a region is stored in `max_p x max_p` slots (row-major inside the
region) with a validity mask, so every region of every image has the same shape.

Mapping (`map_regions`): the slot patch centres of a region of view X are carried
into view X' with the crop geometry (`correspondence`). A region with fewer than
`min_valid_fraction` of its patches inside X' is dropped (masked, not re-drawn).
Its counterpart R' in X' is the set of X' patches whose cells overlap the image
area covered by R (R's patch cells, mapped into X' and clipped to it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from glare_jax.data import correspondence as corr

Array = jax.Array


class Regions(NamedTuple):
  """M regions per view, in S = max_p * max_p slots (leading axes `...`).

    index  [..., M, S] int32  flat row-major patch index of each slot (clipped
                              into the grid for unused slots)
    valid  [..., M, S] bool   the slot is one of the region's rows x cols patches
    box    [..., M, 4] int32  (top, left, rows, cols) in patches
    start  [..., M]    int32  flat index of the start patch
  """
  index: Array
  valid: Array
  box: Array
  start: Array


def attention_starts(cls_attn: Array) -> Array:
  """[..., heads, N] [CLS] -> patch attention -> [..., heads] argmax patches."""
  return jnp.argmax(cls_attn, axis=-1).astype(jnp.int32)


def random_starts(key: Array, shape: tuple[int, ...], num_patches: int) -> Array:
  """[*shape] start patches drawn uniformly."""
  u = jax.random.uniform(key, shape)
  return jnp.minimum(jnp.floor(u * num_patches), num_patches - 1).astype(jnp.int32)


def sample_regions(key: Array, starts: Array, grid: corr.Grid,
                   min_p: int, max_p: int) -> Regions:
  """Rectangles of [min_p, max_p]^2 patches around each start patch [..., M]."""
  h, w = corr.grid_hw(grid)
  if not 1 <= min_p <= max_p:
    raise ValueError(f"region sizes need 1 <= min_patches <= max_patches, got {min_p}, {max_p}")
  u = jax.random.uniform(key, starts.shape + (4,))  # one draw: sizes and offsets
  uniform_int = lambda u, lo, n: lo + jnp.floor(u * n).astype(jnp.int32)  # U{lo..lo+n-1}
  rows = jnp.minimum(uniform_int(u[..., 0], min_p, max_p - min_p + 1), h)
  cols = jnp.minimum(uniform_int(u[..., 1], min_p, max_p - min_p + 1), w)
  sr, sc = starts // w, starts % w
  off_r = uniform_int(u[..., 2], 0, rows)
  off_c = uniform_int(u[..., 3], 0, cols)
  top = jnp.clip(sr - off_r, 0, h - rows)
  left = jnp.clip(sc - off_c, 0, w - cols)

  a = jnp.arange(max_p * max_p) // max_p  # slot row inside the region
  b = jnp.arange(max_p * max_p) % max_p   # slot column
  valid = (a < rows[..., None]) & (b < cols[..., None])
  r = jnp.minimum(top[..., None] + a, h - 1)
  c = jnp.minimum(left[..., None] + b, w - 1)
  box = jnp.stack([top, left, rows, cols], -1).astype(jnp.int32)
  return Regions((r * w + c).astype(jnp.int32), valid, box, starts.astype(jnp.int32))


class MappedRegions(NamedTuple):
  """Regions of view X carried into view X' (N' = patches of X').

    pos      [..., M, S, 2] float32  slot centres in X' grid units
    inside   [..., M, S]    bool     valid slot whose centre lies inside X'
    index    [..., M, S, 4] int32    bilinear neighbours in X' (see Correspondence)
    weight   [..., M, S, 4] float32  bilinear weights (0 where not `inside`)
    keep     [..., M]       bool     at least `min_valid_fraction` of the region is inside X'
    context  [..., M, N']   bool     R': X' patches overlapping the area covered by R
  """
  pos: Array
  inside: Array
  index: Array
  weight: Array
  keep: Array
  context: Array


def map_regions(regions: Regions, src_box: Array, src_flip: Array, src_grid: corr.Grid,
                dst_box: Array, dst_flip: Array, dst_grid: corr.Grid,
                min_valid_fraction: float) -> MappedRegions:
  """Carry regions [..., M, S] of a view with box/flip [..., 4]/[...] into another view."""
  hs, ws = corr.grid_hw(src_grid)
  hd, wd = corr.grid_hw(dst_grid)
  # Slot centres -> X' grid units.
  centres = jnp.stack([regions.index // ws, regions.index % ws], -1).astype(jnp.float32) + 0.5
  lead = centres.shape[:-3]  # [...]
  m, s = regions.index.shape[-2:]
  flat = centres.reshape(*lead, m * s, 2)
  pos = corr.map_points(flat, src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid)
  pos = pos.reshape(*lead, m, s, 2)
  inside = corr.inside(pos, dst_grid) & regions.valid
  index, weight = corr.bilinear_neighbours(pos, dst_grid)
  weight = weight * inside[..., None]
  frac = inside.sum(-1) / jnp.maximum(regions.valid.sum(-1), 1)
  keep = frac >= min_valid_fraction

  # R': map the region's outer corners (its patch cells) and clip to X'.
  top, left, rows, cols = (regions.box[..., i].astype(jnp.float32) for i in range(4))
  corners = jnp.stack([jnp.stack([top, left], -1), jnp.stack([top + rows, left + cols], -1)], -2)
  mapped = corr.map_points(corners.reshape(*lead, m * 2, 2), src_box, src_flip, src_grid,
                           dst_box, dst_flip, dst_grid).reshape(*lead, m, 2, 2)
  lo = jnp.clip(mapped.min(-2), 0, jnp.array([hd, wd], jnp.float32))  # [..., M, 2]
  hi = jnp.clip(mapped.max(-2), 0, jnp.array([hd, wd], jnp.float32))
  i = jnp.arange(hd, dtype=jnp.float32)[:, None]
  j = jnp.arange(wd, dtype=jnp.float32)[None, :]
  lo_r, lo_c = lo[..., 0, None, None], lo[..., 1, None, None]
  hi_r, hi_c = hi[..., 0, None, None], hi[..., 1, None, None]
  eps = 1e-3  # overlaps thinner than this are float round-off of touching edges
  overlap = ((i < hi_r - eps) & (i + 1 > lo_r + eps)
             & (j < hi_c - eps) & (j + 1 > lo_c + eps))  # [..., M, hd, wd]
  context = overlap.reshape(*lead, m, hd * wd)
  return MappedRegions(pos, inside, index, weight, keep, context)


SAMPLINGS = ("attention", "random")


def draw_regions(key: Array, cfg, grid: corr.Grid, lead: tuple[int, ...],
                 cls_attn: Array | None = None) -> Regions:
  """Regions [*lead, M, S] from `config.glare.regions` (sampling, num_regions,
  min_patches, max_patches); 'attention' needs `cls_attn` [*lead, heads, N]."""
  h, w = corr.grid_hw(grid)
  k_start, k_shape = jax.random.split(key)
  if cfg.sampling == "attention":
    if cls_attn is None:
      raise ValueError("attention-aware region sampling needs the teacher's [CLS] attention")
    if cls_attn.shape[-2] != cfg.num_regions:
      raise ValueError(
          f"config.glare.regions.num_regions={cfg.num_regions} must equal the number of "
          f"attention heads ({cls_attn.shape[-2]}) with sampling='attention' (one region per head)")
    starts = attention_starts(cls_attn)
  elif cfg.sampling == "random":
    starts = random_starts(k_start, (*lead, cfg.num_regions), h * w)
  else:
    raise ValueError(f"config.glare.regions.sampling={cfg.sampling!r}: use one of {SAMPLINGS}")
  return sample_regions(k_shape, starts, grid, cfg.min_patches, cfg.max_patches)
