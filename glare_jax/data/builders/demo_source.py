"""The demo's source domain: the same five classes as `demo`, drawn differently.

The miniature Table 1 (scripts/mini_table.py) pre-trains a ViT from scratch on
this domain (the stand-in for UDI on ImageNet) and continues on `demo` (the
target, the stand-in for LoveDA). A segmenter must adapt to four changes:

- palettes: every class has another base colour (grass olive-yellow, water teal,
  sand pink, forest violet, road brown) and a stronger per-image jitter;
- textures: dots, concentric rings, coarse mottling, cells and bricks instead
  of grain, ripples, dunes, canopy and lanes;
- scales: each image scales its textures by a random factor in [0.5, 2];
- shapes: a background class with 3 to 7 hard-edged objects (rectangles, discs,
  triangles) of the others, instead of a smooth partition.

Example `i` of a split comes from `numpy.random.default_rng([seed, 100 + split_id,
i])`: deterministic, and never an image of the target domain.
"""

from __future__ import annotations

import numpy as np

from glare_jax.data import datasets
from glare_jax.data.builders import demo

PALETTE = ((0.70, 0.68, 0.22), (0.20, 0.62, 0.60), (0.86, 0.52, 0.62),
           (0.34, 0.22, 0.50), (0.50, 0.34, 0.20))
assert len(PALETTE) == len(datasets.DEMO_CLASSES)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  y, x = np.mgrid[:size, :size].astype(np.float32)
  return y, x


def _dots(rng, size, scale):             # grass: sparse bright dots on a flat field
  cell = max(2, int(round(6 * scale)))
  dots = (rng.random((size // cell + 1, size // cell + 1)) < 0.3).astype(np.float32)
  dots = np.kron(dots, np.ones((cell, cell), np.float32))[:size, :size]
  return 0.8 + 0.35 * dots


def _rings(rng, size, scale):            # water: concentric rings around a random centre
  y, x = _grid(size)
  cy, cx = rng.uniform(0, size, 2)
  r = np.hypot(y - cy, x - cx)
  return 0.85 + 0.2 * np.sin(2 * np.pi * r / (10 * scale))


def _mottle(rng, size, scale):           # sand: coarse mottling
  cells = max(2, int(round(size / (24 * scale))))
  return 0.7 + 0.5 * demo.value_noise(rng, size, cells)


def _cells(rng, size, scale):            # forest: dark-edged cells
  n = max(2, int(round(size / (20 * scale))))
  noise = demo.value_noise(rng, size, n)
  return 0.6 + 0.8 * (np.abs(np.sin(6 * np.pi * noise)) > 0.3)


def _bricks(rng, size, scale):           # road: a brick wall
  y, x = _grid(size)
  h = max(3.0, 8 * scale)
  row = np.floor(y / h)
  xs = x + (row % 2) * h
  mortar = (np.mod(y, h) < 1.2) | (np.mod(xs, 2 * h) < 1.2)
  return np.where(mortar, 0.55, 1.0 + 0.1 * rng.standard_normal((size, size))).astype(np.float32)


TEXTURES = (_dots, _rings, _mottle, _cells, _bricks)


def layout(rng: np.random.Generator, size: int) -> np.ndarray:
  """[S, S] uint8 class ids: a background class and hard-edged objects of the others."""
  classes = rng.permutation(len(TEXTURES))
  label = np.full((size, size), classes[0], np.uint8)
  y, x = _grid(size)
  for _ in range(rng.integers(3, 8)):
    c = rng.choice(classes[1:])
    cy, cx = rng.uniform(0, size, 2)
    half = rng.uniform(0.06, 0.25) * size
    kind = rng.integers(3)
    if kind == 0:                        # rectangle
      aspect = rng.uniform(0.5, 2.0)
      inside = (np.abs(y - cy) < half * aspect ** 0.5) & (np.abs(x - cx) < half / aspect ** 0.5)
    elif kind == 1:                      # disc
      inside = np.hypot(y - cy, x - cx) < half
    else:                                # triangle, apex up
      inside = (y < cy + half) & (np.abs(x - cx) < (y - cy + half) / 2)
      inside &= y > cy - half
    label[inside] = c
  return label


def make_example(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(image [S, S, 3] uint8, label [S, S] uint8): one source-domain scene."""
  label = layout(rng, size)
  scale = rng.uniform(0.5, 2.0)
  image = 0.03 * rng.standard_normal((size, size, 3), dtype=np.float32)
  for c in np.unique(label):
    jitter = 1.0 + 0.15 * rng.standard_normal(3, dtype=np.float32)
    shade = TEXTURES[c](rng, size, scale)[..., None]
    colour = np.asarray(PALETTE[c], np.float32) * jitter
    image += np.where((label == c)[..., None], shade * colour, 0)
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), label


def example(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Example `index` of `split`, independent of every other (and of the target's)."""
  split_id = 100 + demo.SPLIT_IDS[split]
  return make_example(np.random.default_rng([seed, split_id, index]), size)


class DemoSource(demo.Demo, skip_registration=True):
  """The demo's source domain: the five demo classes in other palettes, textures,
  scales and shapes (module doc)."""

  name = "demo_source"
  make = staticmethod(example)
