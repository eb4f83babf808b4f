"""Patch augmentation for L_loc1: ratios, cell placement, blur, mask (Table 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.configs import common
from glare_jax.data import patch_aug

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def numpy_blur(img, sigma, radius=None):
  """Separable Gaussian over pixel centres, renormalised over existing pixels."""
  def k(n):
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    w = np.exp(-0.5 * (d / sigma) ** 2)
    if radius is not None:
      w = w * (np.abs(d) <= radius)
    return w / w.sum(1, keepdims=True)
  h, w = img.shape[:2]
  return np.einsum("ab,bdz->adz", k(h), np.einsum("cd,bdz->bcz", k(w), img))


def test_ratios():
  r = np.asarray(patch_aug.sample_ratios(jax.random.key(0), (4000,), 0.5, (0.1, 0.5)))
  zero = r == 0
  assert 0.45 < zero.mean() < 0.55
  assert r[~zero].min() >= 0.1 and r[~zero].max() <= 0.5


def test_random_cells_count():
  ratios = jnp.array([0.0, 0.1, 0.3, 0.5])
  cells = np.asarray(patch_aug.random_cells(jax.random.key(1), ratios, 196))
  np.testing.assert_array_equal(cells.sum(-1), np.floor(np.asarray(ratios) * 196))


def test_block_cells_sizes():
  ratios = jnp.concatenate([jnp.zeros(4), jnp.linspace(0.1, 0.5, 60)])
  block = jax.jit(lambda k, r: patch_aug.block_cells(k, r, (14, 14), (0.3, 1 / 0.3), 16),
                  compiler_options=FAST_COMPILE)
  cells = np.asarray(block(jax.random.key(2), ratios))
  counts = cells.sum(-1)
  high = np.asarray(ratios) * 196
  assert (counts[:4] == 0).all()
  assert (counts <= high + 1e-6).all()
  # The loop fills most of the target (iBOT's masks stop when a block cannot fit).
  assert (counts[4:] >= 0.5 * high[4:]).all() and counts[4:].mean() >= 0.8 * high[4:].mean()
  # Blocks, not scattered cells: most masked cells have a masked 4-neighbour.
  m = cells[4:].reshape(-1, 14, 14)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  nb = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
  assert (m & nb).sum() / m.sum() > 0.95


@pytest.mark.parametrize("scope", ["cell", "image"])
def test_blur_changes_exactly_the_selected_cells(scope):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 64, 48, 3)).astype(np.float32)
  cells = rng.random((2, 12)) < 0.4
  out = np.asarray(patch_aug.blur_cells(jnp.asarray(images), jnp.asarray(cells), 16, 5.0, scope))
  diff = np.abs(out - images).reshape(2, 4, 16, 3, 16, 3).max((2, 4, 5)).reshape(2, 12)
  assert (diff[~cells] == 0).all()
  assert (diff[cells] > 1e-3).all()
  b, k = np.argwhere(cells)[0]
  i, j = divmod(k, 3)
  if scope == "cell":
    want = numpy_blur(images[b, 16 * i:16 * i + 16, 16 * j:16 * j + 16], 5.0)
  else:
    want = numpy_blur(images[b], 5.0, radius=15)[16 * i:16 * i + 16, 16 * j:16 * j + 16]
  np.testing.assert_allclose(out[b, 16 * i:16 * i + 16, 16 * j:16 * j + 16], want, atol=1e-5)


def test_every_table6_row_is_a_config():
  seen = set()
  for name, (kind, placement) in common.PATCH_AUGS.items():
    c = common.pretrain_config("loveda", f"tiny,patch_aug={name}")
    cfg = c.glare.patch_aug
    assert (cfg.kind, cfg.placement) == (kind, placement)
    assert c.model.use_mask_token == (kind == "mask")
    images = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 64, 64, 3)), jnp.float32)
    out = jax.jit(lambda k, x: patch_aug.apply_patch_aug(k, x, 16, cfg),
                  compiler_options=FAST_COMPILE)(jax.random.key(3), images)
    assert out.cells.shape == (3, 2, 16)
    if kind == "mask":
      assert out.patch_mask is not None and (np.asarray(out.images) == np.asarray(images)).all()
    elif kind == "none":
      assert not np.asarray(out.cells).any() and out.patch_mask is None
    else:
      assert out.patch_mask is None
    seen.add((kind, placement))
  assert len(seen) == 5


def test_bad_config_is_reported():
  cfg = common.glare_config().patch_aug
  cfg.kind = "rotate"
  with pytest.raises(ValueError, match="patch_aug.kind"):
    patch_aug.apply_patch_aug(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), 16, cfg)
