"""Patch-level augmentation of the student's global views for L_loc1 (paper 4.3, Table 6).

A fraction r of the 16x16 cells of each view is distorted: r = 0 with probability
`zero_prob`, else r ~ U[ratio] (iBOT's 0.3 +- 0.2, drawn per view as iBOT does).
Cells are chosen at random (floor(r N) cells, uniformly) or blockwise (iBOT's
BEiT-style block masking: rectangles of random area and aspect ratio until r N
cells are covered). The chosen cells are then either

  'blur': Gaussian-blurred (sigma in pixels) on the normalised image, or
  'mask': replaced by the ViT's learned [MASK] embedding (pass the cells as
          `patch_mask` to a ViT built with `use_mask_token=True`).

Blur scope (`blur_scope`): with 'cell' (default) each chosen cell is blurred on its
own: the Gaussian is restricted to the cell's 16x16 pixels and renormalised, so a
distorted token depends only on its own pixels, exactly like a masked token. With
'image' the whole view is blurred once (Gaussian truncated at 3 sigma and
renormalised at the image border) and the chosen cells are copied from it, so
blurred cells also mix in their neighbours' pixels.

Everything runs on device from a `jax.random` key and is jittable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

Array = jax.Array

KINDS = ("blur", "mask", "none")
PLACEMENTS = ("random", "block")
BLUR_SCOPES = ("cell", "image")


def sample_ratios(key: Array, shape: tuple[int, ...], zero_prob: float,
                  ratio: tuple[float, float]) -> Array:
  """[*shape] float32: 0 with probability `zero_prob`, else U[ratio]."""
  k_zero, k_ratio = jax.random.split(key)
  zero = jax.random.bernoulli(k_zero, zero_prob, shape)
  r = jax.random.uniform(k_ratio, shape, minval=ratio[0], maxval=ratio[1])
  return jnp.where(zero, 0.0, r)


def random_cells(key: Array, ratios: Array, num_cells: int) -> Array:
  """[..., N] bool with floor(r N) cells chosen uniformly per row (iBOT 'rand')."""
  u = jax.random.uniform(key, ratios.shape + (num_cells,))
  rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
  count = jnp.floor(ratios * num_cells).astype(jnp.int32)
  return rank < count[..., None]


def _block_cells_one(key: Array, ratio: Array, grid: tuple[int, int],
                     log_aspect: tuple[float, float], min_area: float,
                     max_attempts: int) -> Array:
  """One [h*w] block mask: iBOT's loop of random rectangles, in lax control flow.

  All random numbers are drawn up front (at most h*w blocks, each with
  `max_attempts` tries of 4 uniforms), which keeps the loops free of RNG ops.
  """
  h, w = grid
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  high = ratio * h * w  # target number of cells (float, as in iBOT)
  draws = jax.random.uniform(key, (h * w, max_attempts, 4))

  def attempt(u, mask, remaining):
    # python's random.uniform(a, b) = a + (b - a) U, also when b < a.
    area = min_area + (remaining - min_area) * u[0]
    aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
    bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (bw < w) & (bh < h)
    top = jnp.floor(u[2] * (h - bh + 1)).astype(jnp.int32)  # randint(0, h - bh)
    left = jnp.floor(u[3] * (w - bw + 1)).astype(jnp.int32)
    rect = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    new = jnp.sum(rect & ~mask)
    ok = fits & (new > 0) & (new <= remaining)
    return ok, rect, new

  def one_block(state):
    # Up to `max_attempts` rectangles; the first acceptable one is added.
    block, mask, count, _ = state
    remaining = high - count

    def body(i, carry):
      found, add, delta = carry
      ok, rect, new = attempt(draws[block, i], mask, remaining)
      take = ok & ~found
      return found | ok, jnp.where(take, rect, add), jnp.where(take, new, delta)

    found, add, delta = jax.lax.fori_loop(
        0, max_attempts, body, (jnp.array(False), jnp.zeros_like(mask), jnp.array(0)))
    return block + 1, mask | add, count + delta, ~found

  def cond(state):
    block, _, count, stalled = state
    return (count < high) & ~stalled & (block < h * w)

  init = (jnp.array(0), jnp.zeros((h, w), bool), jnp.array(0), jnp.array(False))
  _, mask, _, _ = jax.lax.while_loop(cond, one_block, init)
  return mask.reshape(h * w)


def block_cells(key: Array, ratios: Array, grid: tuple[int, int],
                aspect: tuple[float, float], min_area: float,
                max_attempts: int = 10) -> Array:
  """[..., h*w] bool block masks, one per ratio (iBOT/BEiT block masking).

  Rectangles of area ~ U[min_area, remaining] and aspect ratio log-uniform in
  `aspect` are drawn; one that adds between 1 and `remaining` new cells is kept;
  this repeats until r h w cells are covered or `max_attempts` draws in a row fail.
  """
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  keys = jax.random.split(key, ratios.size)
  fn = lambda k, r: _block_cells_one(k, r, grid, log_aspect, min_area, max_attempts)
  flat = jax.vmap(fn)(keys, ratios.reshape(-1))
  return flat.reshape(ratios.shape + (grid[0] * grid[1],))


def blur_matrix(n: int, sigma: float, radius: int | None = None) -> Array:
  """[n, n] row-normalised Gaussian weights between pixel centres 0..n-1.

  Rows are renormalised over the pixels that exist (no padding), and weights
  beyond `radius` pixels are dropped (None keeps all n).
  """
  d = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
  k = jnp.exp(-0.5 * (d / sigma) ** 2)
  if radius is not None:
    k = jnp.where(jnp.abs(d) <= radius, k, 0.0)
  return k / k.sum(-1, keepdims=True)


def blur_cells(images: Array, cells: Array, patch: int, sigma: float,
               scope: str = "cell") -> Array:
  """Gaussian-blur the chosen cells of normalised images.

  Args:
    images: [..., H, W, C] float.
    cells: [..., (H/patch) * (W/patch)] bool, row-major.
    patch: cell side in pixels.
    sigma: Gaussian standard deviation in pixels.
    scope: 'cell' (blur inside each cell) or 'image' (blur the image, copy cells).
  Returns:
    [..., H, W, C] with unchosen cells untouched, bit for bit.
  """
  *lead, hh, ww, c = images.shape
  h, w = hh // patch, ww // patch
  x = images.reshape(*lead, h, patch, w, patch, c)
  if scope == "cell":
    k = blur_matrix(patch, sigma).astype(images.dtype)
    blurred = jnp.einsum("ab,cd,...hbwdz->...hawcz", k, k, x,
                         precision=jax.lax.Precision.HIGHEST)
  elif scope == "image":
    radius = int(math.ceil(3 * sigma))
    ky = blur_matrix(hh, sigma, radius).astype(images.dtype)
    kx = blur_matrix(ww, sigma, radius).astype(images.dtype)
    blurred = jnp.einsum("ab,cd,...bdz->...acz", ky, kx, images,
                         precision=jax.lax.Precision.HIGHEST)
    blurred = blurred.reshape(x.shape)
  else:
    raise ValueError(f"blur scope {scope!r} is not one of {BLUR_SCOPES}")
  sel = cells.reshape(*lead, h, 1, w, 1, 1)
  return jnp.where(sel, blurred, x).reshape(images.shape)


class PatchAug(NamedTuple):
  """Result of `apply_patch_aug` on views [..., H, W, C] with N = (H/p)(W/p) cells.

    images      [..., H, W, C]  the student's input (blurred cells for 'blur')
    cells       [..., N] bool   the distorted cells (L_loc1 averages over these)
    patch_mask  [..., N] bool   for the ViT's `patch_mask` ('mask' kind), else None
  """
  images: Array
  cells: Array
  patch_mask: Array | None


def check_config(cfg: mlc.ConfigDict) -> None:
  """Clear errors for a bad `config.glare.patch_aug`."""
  if cfg.kind not in KINDS:
    raise ValueError(f"config.glare.patch_aug.kind={cfg.kind!r}: use one of {KINDS}")
  if cfg.placement not in PLACEMENTS:
    raise ValueError(f"config.glare.patch_aug.placement={cfg.placement!r}: use one of {PLACEMENTS}")
  if cfg.blur_scope not in BLUR_SCOPES:
    raise ValueError(f"config.glare.patch_aug.blur_scope={cfg.blur_scope!r}: use one of {BLUR_SCOPES}")
  lo, hi = cfg.ratio
  if not 0 <= lo <= hi <= 1:
    raise ValueError(f"config.glare.patch_aug.ratio={tuple(cfg.ratio)} must satisfy 0 <= lo <= hi <= 1")


def select_cells(key: Array, shape: tuple[int, ...], grid: tuple[int, int],
                 cfg: mlc.ConfigDict) -> Array:
  """[*shape, h*w] bool: per-view ratio, then random or block placement."""
  k_ratio, k_place = jax.random.split(key)
  ratios = sample_ratios(k_ratio, shape, cfg.zero_prob, tuple(cfg.ratio))
  if cfg.placement == "random":
    return random_cells(k_place, ratios, grid[0] * grid[1])
  return block_cells(k_place, ratios, grid, tuple(cfg.block_aspect), cfg.block_min_patches)


def apply_patch_aug(key: Array, images: Array, patch: int, cfg: mlc.ConfigDict) -> PatchAug:
  """Distort a fraction of the cells of each view in `images` [..., H, W, C].

  `cfg` is `config.glare.patch_aug` (kind, placement, zero_prob, ratio,
  blur_sigma, blur_scope, block_aspect, block_min_patches).
  """
  check_config(cfg)
  *lead, hh, ww, _ = images.shape
  grid = (hh // patch, ww // patch)
  if cfg.kind == "none":
    return PatchAug(images, jnp.zeros((*lead, grid[0] * grid[1]), bool), None)
  cells = select_cells(key, tuple(lead), grid, cfg)
  if cfg.kind == "mask":
    return PatchAug(images, cells, cells)
  return PatchAug(blur_cells(images, cells, patch, cfg.blur_sigma, cfg.blur_scope), cells, None)
