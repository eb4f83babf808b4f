"""Random-pixel PNG files and the tests' own ImageNet normalisation (written
independently of glare_jax.embed, which the tests check against it)."""

import numpy as np
from PIL import Image

from glare_jax.configs.common import IMAGENET_MEAN, IMAGENET_STD


def write_png(path, h, w, seed):
  """Writes an [h, w, 3] image of random pixels; returns the pixels."""
  pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def normalise(pixels):
  return ((pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)
