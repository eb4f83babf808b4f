"""Patch correspondences between two views of one image, from their crop geometry.

Every view is a crop of the source image described by its box `(x0, y0, x1, y1)`
(source pixels, the image spans [0, W] x [0, H]) and a horizontal flip applied
after cropping (docs/DESIGN.md, "Views and boxes"). A view's patch grid has `h x w`
patches; positions in it are measured in *grid units*: row 0..h, col 0..w, with the
centre of patch (i, j) at (i + 0.5, j + 0.5). Grid units map to source pixels by

    y = y0 + (row / h) * (y1 - y0)
    x = x0 + (col' / w) * (x1 - x0),   col' = w - col if the view is flipped else col,

which is the continuous form of "pixel u samples x0 + (u + 0.5) (x1 - x0) / S" and
"a flipped view shows unflipped pixel S - 1 - u at u".

Everything here is jax.numpy, batched over any leading axes and jittable; the grids
are static Python ints.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Grid = int | tuple[int, int]


def grid_hw(grid: Grid) -> tuple[int, int]:
  """`14` or `(14, 14)` -> (14, 14)."""
  if isinstance(grid, int):
    return grid, grid
  h, w = grid
  return int(h), int(w)


def patch_centres(grid: Grid) -> Array:
  """[h*w, 2] (row, col) grid-unit centres of the patches, row-major."""
  h, w = grid_hw(grid)
  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  return jnp.stack([rows, cols], -1).reshape(h * w, 2).astype(jnp.float32) + 0.5


def grid_to_source(points: Array, box: Array, flip: Array, grid: Grid) -> Array:
  """Grid-unit (row, col) points [..., N, 2] of a view -> source (y, x) pixels."""
  h, w = grid_hw(grid)
  box = jnp.asarray(box, jnp.float32)[..., None, :]  # [..., 1, 4]
  fy = points[..., 0] / h
  fx = points[..., 1] / w
  fx = jnp.where(jnp.asarray(flip)[..., None], 1.0 - fx, fx)
  y = box[..., 1] + fy * (box[..., 3] - box[..., 1])
  x = box[..., 0] + fx * (box[..., 2] - box[..., 0])
  return jnp.stack([y, x], -1)


def source_to_grid(yx: Array, box: Array, flip: Array, grid: Grid) -> Array:
  """Source (y, x) pixels [..., N, 2] -> grid-unit (row, col) points of a view."""
  h, w = grid_hw(grid)
  box = jnp.asarray(box, jnp.float32)[..., None, :]
  fy = (yx[..., 0] - box[..., 1]) / (box[..., 3] - box[..., 1])
  fx = (yx[..., 1] - box[..., 0]) / (box[..., 2] - box[..., 0])
  fx = jnp.where(jnp.asarray(flip)[..., None], 1.0 - fx, fx)
  return jnp.stack([fy * h, fx * w], -1)


def map_points(points: Array, src_box: Array, src_flip: Array, src_grid: Grid,
               dst_box: Array, dst_flip: Array, dst_grid: Grid) -> Array:
  """Grid-unit points [..., N, 2] of the source view -> grid units of the destination."""
  yx = grid_to_source(points, src_box, src_flip, src_grid)
  return source_to_grid(yx, dst_box, dst_flip, dst_grid)


def inside(points: Array, grid: Grid) -> Array:
  """[..., N] bool: the grid-unit point lies in the view (closed [0, h] x [0, w])."""
  h, w = grid_hw(grid)
  r, c = points[..., 0], points[..., 1]
  return (r >= 0) & (r <= h) & (c >= 0) & (c <= w)


def bilinear_neighbours(points: Array, grid: Grid) -> tuple[Array, Array]:
  """Bilinear interpolation between patch centres at grid-unit points [..., N, 2].

  Returns (index [..., N, 4] int32, weight [..., N, 4] float32): flat row-major
  indices of the top-left, top-right, bottom-left, bottom-right neighbouring patch
  centres and their weights (summing to 1). Beyond the outer patch centres (the
  half-patch border of the view) the nearest patches are repeated, so a point
  still interpolates only patches of the view.
  """
  h, w = grid_hw(grid)
  ci = points[..., 0] - 0.5  # position in patch-index units
  cj = points[..., 1] - 0.5
  i0 = jnp.floor(ci)
  j0 = jnp.floor(cj)
  a = ci - i0  # weight of the lower row
  b = cj - j0  # weight of the right column
  i0 = i0.astype(jnp.int32)
  j0 = j0.astype(jnp.int32)
  ia, ib = jnp.clip(i0, 0, h - 1), jnp.clip(i0 + 1, 0, h - 1)
  ja, jb = jnp.clip(j0, 0, w - 1), jnp.clip(j0 + 1, 0, w - 1)
  index = jnp.stack([ia * w + ja, ia * w + jb, ib * w + ja, ib * w + jb], -1)
  weight = jnp.stack([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b], -1)
  return index.astype(jnp.int32), weight.astype(jnp.float32)


class Correspondence(NamedTuple):
  """Where the patch centres of a source view fall in a destination view.

  With N = h_src * w_src source patches (row-major) and leading batch axes `...`:
    pos     [..., N, 2] float32  (row, col) in destination grid units (centres at i + 0.5)
    valid   [..., N]    bool     the source patch centre lies inside the destination view
    index   [..., N, 4] int32    flat row-major destination indices of the 4 neighbours
                                 (top-left, top-right, bottom-left, bottom-right)
    weight  [..., N, 4] float32  their bilinear weights; they sum to 1 where `valid`
                                 and are all 0 where not, so a weighted gather gives 0
  """
  pos: Array
  valid: Array
  index: Array
  weight: Array


def match_patches(src_box: Array, src_flip: Array, src_grid: Grid,
                  dst_box: Array, dst_flip: Array, dst_grid: Grid, *,
                  align_corners: bool = False) -> Correspondence:
  """For every source patch centre, its position in the destination patch grid.

  Args:
    src_box, dst_box: [..., 4] float boxes (x0, y0, x1, y1) in source-image pixels.
    src_flip, dst_flip: [...] bool, the view is mirrored horizontally after cropping.
    src_grid, dst_grid: static patch grids, `g` or `(h, w)`.
    align_corners: UDI's geometry instead of patch centres (`_corner_aligned`).
  Returns:
    A `Correspondence` with leading axes broadcast from the boxes and flips.
  """
  if align_corners:
    return _corner_aligned(src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid)
  centres = patch_centres(src_grid)  # [N, 2]
  pos = map_points(centres, src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid)
  valid = inside(pos, dst_grid)
  index, weight = bilinear_neighbours(pos, dst_grid)
  weight = weight * valid[..., None]
  return Correspondence(pos, valid, index, weight)


def _corner_aligned(src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid) -> Correspondence:
  """UDI's correspondences (its udi_augmentation.py): token k of an F-token side
  sits at k / (F - 1) of the span between the centres of the crop's first and
  last pixels, so the corner tokens sit on the corner pixels; a token matches
  when it falls strictly inside the destination's span, and its target is
  bilinear between the destination's tokens at those positions. The spans are
  boxes in their own right, so `map_points` carries the tokens; `pos` is the
  position among the destination's tokens with token i at i + 0.5, as elsewhere."""
  (hs, ws), (hd, wd) = grid_hw(src_grid), grid_hw(dst_grid)
  span = lambda box: jnp.asarray(box, jnp.float32) + jnp.array([0.5, 0.5, -0.5, -0.5])
  rows, cols = jnp.meshgrid(jnp.linspace(0.0, hs, hs), jnp.linspace(0.0, ws, ws), indexing="ij")
  tokens = jnp.stack([rows, cols], -1).reshape(hs * ws, 2)     # grid units over the span
  at = map_points(tokens, span(src_box), src_flip, src_grid, span(dst_box), dst_flip, dst_grid)
  frac = at / jnp.array([hd, wd], jnp.float32)                 # [..., N, 2] of the dst span
  valid = jnp.all((frac > 0) & (frac < 1), -1)
  pos = frac * jnp.array([hd - 1, wd - 1], jnp.float32) + 0.5
  index, weight = bilinear_neighbours(pos, dst_grid)
  return Correspondence(pos, valid, index, weight * valid[..., None])


def interpolation_matrix(index: Array, weight: Array, n: int) -> Array:
  """Dense [..., Q, n] matrix from 4-neighbour (index, weight) pairs [..., Q, 4].

  `matrix @ values` ([..., n, D] -> [..., Q, D]) interpolates `values` at the Q
  points; as a matmul it needs far less memory than gathering 4 rows per point.
  """
  onehot = jax.nn.one_hot(index, n, dtype=weight.dtype)  # [..., Q, 4, n]
  return jnp.einsum("...qk,...qkn->...qn", weight, onehot)
