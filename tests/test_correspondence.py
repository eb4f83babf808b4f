"""Geometry of match_patches against analytic cases and rendered crops."""

import functools

import jax
import numpy as np
import pytest

from glare_jax.data import correspondence as corr


@functools.partial(jax.jit, static_argnums=(2, 5),
                   compiler_options={"xla_backend_optimization_level": 0})
def match(src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid):
  return corr.match_patches(src_box, src_flip, src_grid, dst_box, dst_flip, dst_grid)


def render(image, box, flip, size):
  """Bilinear crop-and-resize with the box convention of docs/DESIGN.md (NumPy).

  Output pixel (v, u) samples source (y0 + (v + .5) (y1 - y0) / S, x0 + (u + .5) (x1 - x0) / S);
  a flipped view shows unflipped column S - 1 - u at u.
  """
  x0, y0, x1, y1 = box
  v = np.arange(size) + 0.5
  ys = y0 + v * (y1 - y0) / size - 0.5  # pixel-index coordinates
  xs = x0 + v * (x1 - x0) / size - 0.5
  h, w = image.shape[:2]

  def taps(c, n):
    c = np.clip(c, 0, n - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, c - lo

  ya, yb, fy = taps(ys, h)
  xa, xb, fx = taps(xs, w)
  top = image[ya][:, xa] * (1 - fx)[None, :, None] + image[ya][:, xb] * fx[None, :, None]
  bot = image[yb][:, xa] * (1 - fx)[None, :, None] + image[yb][:, xb] * fx[None, :, None]
  out = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
  return out[:, ::-1] if flip else out


def patch_means(view, patch):
  s = view.shape[0] // patch
  return view.reshape(s, patch, s, patch, -1).mean((1, 3)).reshape(s * s, -1)


def coordinate_image(h, w):
  """Pixel (y, x) holds its own centre (y + .5, x + .5)."""
  yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  return np.stack([yy, xx], -1)


def test_identity():
  box = np.array([10.0, 20.0, 130.0, 140.0])
  c = match(box, False, 6, box, False, 6)
  np.testing.assert_allclose(c.pos, corr.patch_centres(6), atol=1e-5)
  assert c.valid.all()
  # Each patch interpolates only itself.
  own = np.arange(36)
  np.testing.assert_allclose(np.asarray(c.weight)[:, 0], 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(c.index)[:, 0], own)


def test_crop_of_a_crop():
  # Destination = top-left quarter of the source view: the source's top-left
  # 2x2 patches of a 4x4 grid land on destination centres scaled by 2.
  src = np.array([0.0, 0.0, 64.0, 64.0])
  dst = np.array([0.0, 0.0, 32.0, 32.0])
  c = match(src, False, 4, dst, False, 4)
  pos = np.asarray(c.pos).reshape(4, 4, 2)
  np.testing.assert_allclose(pos[0, 0], [1.0, 1.0])
  np.testing.assert_allclose(pos[1, 1], [3.0, 3.0])
  np.testing.assert_allclose(pos[3, 2], [7.0, 5.0])
  valid = np.asarray(c.valid).reshape(4, 4)
  np.testing.assert_array_equal(valid, (np.arange(4)[:, None] < 2) & (np.arange(4)[None, :] < 2))
  # (1.0, 1.0) lies halfway between destination centres 0.5 and 1.5.
  np.testing.assert_allclose(np.asarray(c.weight)[0], [0.25] * 4)
  np.testing.assert_array_equal(np.asarray(c.index)[0], [0, 1, 4, 5])


@pytest.mark.parametrize("src_flip,dst_flip", [(True, False), (False, True), (True, True)])
def test_flips(src_flip, dst_flip):
  box = np.array([5.0, 5.0, 85.0, 85.0])
  c = match(box, src_flip, 5, box, dst_flip, 5)
  centres = np.asarray(corr.patch_centres(5))
  expect = centres.copy()
  if src_flip != dst_flip:
    expect[:, 1] = 5 - centres[:, 1]
  np.testing.assert_allclose(c.pos, expect, atol=1e-5)
  assert c.valid.all()


def test_disjoint_boxes_are_invalid():
  c = match(np.array([0.0, 0, 50, 50]), False, 4,
                         np.array([60.0, 0, 110, 50]), True, 4)
  assert not np.asarray(c.valid).any()
  assert np.asarray(c.weight).sum() == 0


def test_local_inside_global_batched():
  # [B=2] boxes: a local crop strictly inside the global one.
  glob = np.array([[0.0, 0, 224, 224], [100.0, 50, 324, 274]])
  loc = np.array([[32.0, 48, 128, 144], [132.0, 98, 228, 194]])
  c = match(loc, np.array([False, True]), 6, glob, np.array([False, False]), 14)
  assert c.pos.shape == (2, 36, 2) and c.index.shape == (2, 36, 4)
  assert np.asarray(c.valid).all()
  # Local patch (i, j) centre in source pixels = box origin + (i + .5) * 16; global
  # grid units are source pixels / 16 relative to the global box.
  i, j = 2, 4
  k = i * 6 + j
  np.testing.assert_allclose(c.pos[0, k], [(48 + 16 * (i + .5)) / 16, (32 + 16 * (j + .5)) / 16])
  # Flipped local: its column j shows unflipped column 5 - j.
  np.testing.assert_allclose(c.pos[1, k], [(48 + 16 * (i + .5)) / 16, (32 + 16 * (5 - j + .5)) / 16])


@pytest.mark.parametrize("src_flip,dst_flip", [(False, False), (True, False), (False, True)])
def test_matched_patches_hold_the_same_pixels(src_flip, dst_flip):
  """Views offset by whole patches at equal scale: matched patches are pixel-identical."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(160, 160, 3))
  src_box, dst_box = (16.0, 32.0, 112.0, 128.0), (48.0, 0.0, 144.0, 96.0)
  src = render(image, src_box, src_flip, 96)
  dst = render(image, dst_box, dst_flip, 96)
  c = match(np.array(src_box), src_flip, 6, np.array(dst_box), dst_flip, 6)
  src_cells = src.reshape(6, 16, 6, 16, 3).transpose(0, 2, 1, 3, 4).reshape(36, 16, 16, 3)
  dst_cells = dst.reshape(6, 16, 6, 16, 3).transpose(0, 2, 1, 3, 4).reshape(36, 16, 16, 3)
  valid, index, weight = map(np.asarray, (c.valid, c.index, c.weight))
  assert 0 < valid.sum() < 36
  for k in np.flatnonzero(valid):
    q = index[k, np.argmax(weight[k])]
    np.testing.assert_allclose(weight[k].max(), 1.0, atol=1e-5)
    cell = dst_cells[q][:, ::-1] if src_flip != dst_flip else dst_cells[q]
    np.testing.assert_allclose(src_cells[k], cell, atol=1e-6)


def test_rendered_coordinates_interpolate_exactly():
  """General scales and flips: interpolating the destination's patch-mean source
  coordinates at `pos` recovers the source patch's mean coordinate."""
  image = coordinate_image(300, 300)
  src_box, dst_box = (40.0, 60.0, 200.0, 180.0), (20.0, 30.0, 260.0, 250.0)
  src = render(image, src_box, True, 96)   # 6x6 patches
  dst = render(image, dst_box, False, 224)  # 14x14 patches
  m_src, m_dst = patch_means(src, 16), patch_means(dst, 16)
  c = match(np.array(src_box), True, 6, np.array(dst_box), False, 14)
  pos, index, weight = map(np.asarray, (c.pos, c.index, c.weight))
  assert np.asarray(c.valid).all()
  interior = ((pos >= 0.5) & (pos <= 13.5)).all(-1)
  got = (m_dst[index] * weight[..., None]).sum(1)
  np.testing.assert_allclose(got[interior], m_src[interior], atol=1e-3)


def test_interpolation_matrix_matches_gather():
  rng = np.random.default_rng(1)
  values = rng.normal(size=(2, 16, 5))
  pos = rng.uniform(0, 4, size=(2, 7, 2))
  index, weight = corr.bilinear_neighbours(pos, 4)
  m = np.asarray(corr.interpolation_matrix(index, weight, 16))
  gathered = np.stack([(values[b][np.asarray(index)[b]] * np.asarray(weight)[b][..., None]).sum(1)
                       for b in range(2)])
  np.testing.assert_allclose(m @ values, gathered, atol=1e-5)
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)


def udi_maps(src, src_flip, dst, dst_flip, shape, fs, fd):
  """UDI's correspondence maps in NumPy, written from its udi_augmentation.py:
  crops (i, j, h, w) of an image `shape`, normalised corner coordinates
  (first / last pixel index over size - 1, the column pair swapped when
  flipped), token k at k / (F - 1) of that span; a token matches when strictly
  inside the destination's span, its map is bilinear over destination tokens.
  Returns (valid [Fs^2], maps [Fs^2, Fd^2])."""
  hh, ww = shape

  def coord(crop, flip):
    i, j, h, w = crop
    c = np.array([i / (hh - 1), j / (ww - 1), (i + h - 1) / (hh - 1), (j + w - 1) / (ww - 1)])
    return c[[0, 3, 2, 1]] if flip else c

  cs, cd = coord(src, src_flip), coord(dst, dst_flip)
  mesh = np.stack(np.meshgrid(np.linspace(0, 1, fs), np.linspace(0, 1, fs), indexing="ij"),
                  -1).reshape(-1, 2)
  ij = cs[:2] + mesh * (cs[2:] - cs[:2])
  lo, hi = np.minimum(cd[:2], cd[2:]), np.maximum(cd[:2], cd[2:])
  valid = ((ij > lo) & (ij < hi)).all(-1)
  t = (ij - cd[:2]) * (fd - 1) / (cd[2:] - cd[:2])
  maps = np.zeros((fs * fs, fd, fd))
  for q in np.nonzero(valid)[0]:
    (a, b), (a0, b0) = t[q], np.floor(t[q]).astype(int)
    a1, b1 = min(a0 + 1, fd - 1), min(b0 + 1, fd - 1)
    maps[q, a0, b0] += (a0 + 1 - a) * (b0 + 1 - b)
    maps[q, a0, b1] += (a0 + 1 - a) * (b - b0)
    maps[q, a1, b0] += (a - a0) * (b0 + 1 - b)
    maps[q, a1, b1] += (a - a0) * (b - b0)
  return valid, maps.reshape(fs * fs, fd * fd)


def test_corner_aligned_matches_follow_udi():
  """`align_corners=True` (the UDI objective's default) gives UDI's maps, flips included."""
  rng = np.random.default_rng(7)
  shape = (300, 400)
  match_c = jax.jit(functools.partial(corr.match_patches, align_corners=True),
                    static_argnums=(2, 5))
  stats = []
  for trial in range(8):
    fs = 6 if trial % 2 else 14
    dh, dw = (int(x) for x in rng.integers(150, 280, size=2))
    dst = (int(rng.integers(0, shape[0] - dh)), int(rng.integers(0, shape[1] - dw)), dh, dw)
    sh, sw = (int(x) for x in rng.integers(60, 150, size=2))   # overlapping dst
    src = (int(np.clip(dst[0] + rng.integers(-sh // 2, dh - sh // 2), 0, shape[0] - sh)),
           int(np.clip(dst[1] + rng.integers(-sw // 2, dw - sw // 2), 0, shape[1] - sw)), sh, sw)
    flips = rng.random(2) < 0.5
    box = lambda c: np.array([c[1], c[0], c[1] + c[3], c[0] + c[2]], np.float32)  # noqa: E731
    c = match_c(box(src), flips[0], fs, box(dst), flips[1], 14)
    valid, maps = udi_maps(src, flips[0], dst, flips[1], shape, fs, 14)
    assert valid.any()
    stats.append((valid.all(), *flips))
    np.testing.assert_array_equal(np.asarray(c.valid), valid)
    got = np.asarray(corr.interpolation_matrix(c.index, c.weight, 196))
    np.testing.assert_allclose(got, maps, atol=1e-4)
  assert {s[0] for s in stats} == {True, False}     # whole and partial overlaps
  assert {s[1] for s in stats} == {s[2] for s in stats} == {True, False}   # both flips
  # and differs from the patch-centre geometry the other objectives use
  centre = match(box(src), flips[0], fs, box(dst), flips[1], 14)
  assert np.abs(np.asarray(corr.interpolation_matrix(centre.index, centre.weight, 196))
                - maps).max() > 0.1
