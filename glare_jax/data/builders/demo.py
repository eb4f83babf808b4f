"""A generated segmentation dataset: textured scenes that need no download.

Each image is a smooth random partition of the plane into regions of 2 to 4 of
the five `DEMO_CLASSES` (grass, water, sand, forest, road): one smooth random
field per chosen class, each pixel taking the class whose field is largest.
Every region is filled with its class's procedural texture (fine grain for
grass, ripples for water, dunes and speckle for sand, canopy clumps for forest,
lane markings on asphalt for road) under a per-image colour jitter, plus pixel
noise. The label map is exactly the partition. Example `i` of a split is drawn
from `numpy.random.default_rng([seed, split_id, i])`: the dataset is the same
on every machine, whatever the order of generation.

A few hundred 256x256 images generate in seconds; the README's command
pre-trains on them on a laptop.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from glare_jax.data import datasets
from glare_jax.data.builders import base
from glare_jax.data.builders import common

NUM_TRAIN = 256
NUM_VALIDATION = 64
IMAGE_SIZE = 256
SEED = 0
SPLIT_IDS = {"train": 0, "validation": 1}

Texture = Callable[[np.random.Generator, int], np.ndarray]   # -> [S, S, 3] in [0, 1]


def _upsample_rows(grid: np.ndarray, size: int) -> np.ndarray:
  """[cells + 1, K] -> [size, K]: smoothstep interpolation between grid rows."""
  cells = grid.shape[0] - 1
  t = (np.arange(size) + 0.5) * cells / size
  i = np.minimum(t.astype(int), cells - 1)
  f = (t - i).astype(np.float32)
  f = (f * f * (3 - 2 * f))[:, None]
  return grid[i] * (1 - f) + grid[i + 1] * f


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """[S, S] smooth noise in [0, 1] with `cells` random values per side."""
  grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
  return _upsample_rows(_upsample_rows(grid, size).T, size).T


def fractal_noise(rng: np.random.Generator, size: int, cells: int,
                  octaves: int) -> np.ndarray:
  """[S, S] sum of value noise at doubling frequencies, normalised to [0, 1]."""
  total = sum(0.5 ** o * value_noise(rng, size, cells * 2 ** o)
              for o in range(octaves))
  return total / sum(0.5 ** o for o in range(octaves))


def _stripes(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
  """[S, S] phase in [0, 1) of parallel stripes at a random angle."""
  theta = rng.uniform(0, np.pi)
  y = np.arange(size, dtype=np.float32)[:, None]
  x = np.arange(size, dtype=np.float32)[None, :]
  along = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0, period)
  return (along / period) % 1.0


def _shade(rgb, intensity: np.ndarray) -> np.ndarray:
  return np.asarray(rgb, np.float32) * intensity[..., None]


def _grass(rng, size):
  grain = fractal_noise(rng, size, size // 4, 2)
  patches = value_noise(rng, size, 6)
  return _shade((0.34, 0.60, 0.20), 0.75 + 0.35 * grain + 0.15 * patches)


def _water(rng, size):
  y = np.arange(size, dtype=np.float32)[:, None]
  warp = 6.0 * value_noise(rng, size, 4)
  waves = np.sin(2 * np.pi * y / rng.uniform(6, 12) + warp)
  return _shade((0.12, 0.33, 0.64), 0.9 + 0.12 * waves)


def _sand(rng, size):
  dunes = np.sin(2 * np.pi * _stripes(rng, size, rng.uniform(20, 40)))
  speckle = rng.random((size, size), dtype=np.float32)
  return _shade((0.88, 0.70, 0.38), 0.92 + 0.06 * dunes + 0.08 * speckle)


def _forest(rng, size):
  canopy = fractal_noise(rng, size, max(2, size // 16), 3)
  return _shade((0.10, 0.32, 0.12), 0.45 + 1.1 * canopy)


def _road(rng, size):
  asphalt = 0.9 + 0.12 * rng.random((size, size), dtype=np.float32)
  image = _shade((0.42, 0.42, 0.45), asphalt)
  phase = _stripes(rng, size, rng.uniform(24, 48))
  lane = np.abs(phase - 0.5) < 0.05
  image[lane] = (0.88, 0.88, 0.82)
  return image


TEXTURES: tuple[Texture, ...] = (_grass, _water, _sand, _forest, _road)
assert len(TEXTURES) == len(datasets.DEMO_CLASSES)


def partition(rng: np.random.Generator, size: int) -> np.ndarray:
  """[S, S] uint8 class ids: smooth regions of 2 to 4 distinct classes."""
  num = rng.integers(2, 5)
  classes = rng.choice(len(TEXTURES), size=num, replace=False)
  fields = np.stack([value_noise(rng, size, rng.integers(2, 5)) for _ in classes])
  return classes[np.argmax(fields, axis=0)].astype(np.uint8)


def make_example(rng: np.random.Generator, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(image [S, S, 3] uint8, label [S, S] uint8): one textured scene."""
  label = partition(rng, size)
  image = 0.02 * rng.standard_normal((size, size, 3), dtype=np.float32)  # noise
  for c in np.unique(label):
    jitter = 1.0 + 0.08 * rng.standard_normal(3, dtype=np.float32)
    image += np.where((label == c)[..., None], TEXTURES[c](rng, size) * jitter, 0)
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), label


def example(seed: int, split: str, index: int, size: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Example `index` of `split`, independent of every other example."""
  return make_example(np.random.default_rng([seed, SPLIT_IDS[split], index]), size)


class Demo(base.RecordBuilder, skip_registration=True):
  """Generated textured scenes, 5 region classes (grass, water, sand, forest, road)."""

  name = "demo"
  make = staticmethod(example)   # (seed, split, index, size) -> (image, label)

  def __init__(self, *, num_train: int = NUM_TRAIN,
               num_validation: int = NUM_VALIDATION,
               image_size: int = IMAGE_SIZE, seed: int = SEED, **kwargs):
    if min(num_train, num_validation) < 1 or image_size < 16:
      raise ValueError("demo needs num_train, num_validation >= 1 and image_size "
                       f">= 16; got {num_train}, {num_validation}, {image_size}")
    super().__init__(**kwargs)
    self._sizes = {"train": num_train, "validation": num_validation}
    self._image_size = image_size
    self._seed = seed

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in self._sizes}

  def _generate_examples(self, split: str):
    for i in range(self._sizes[split]):
      image, label = self.make(self._seed, split, i, self._image_size)
      name = f"{i:05d}.png"
      yield name, {"image": common.encode_png(image, compress_level=1),
                   "label": common.encode_png(label, compress_level=1),
                   "file_name": name}
