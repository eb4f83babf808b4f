"""Stored image bytes -> arrays (Pillow): the decoding every input pipeline shares.

Kept apart from the TFDS builders so that a pipeline fed with in-memory records
(`pipeline.pretrain_input(config, source=...)`, as `glare_jax.bench` does)
imports no tensorflow_datasets.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes) -> np.ndarray:
  """Stored image bytes -> [H, W, 3] uint8."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def decode_label(data: bytes) -> np.ndarray:
  """Stored label bytes -> [H, W] uint8."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im)
