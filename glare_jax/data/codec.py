"""Image bytes <-> arrays (Pillow): the coding the builders and every input pipeline share.

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


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (zlib level 0-9: speed vs size)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="png", compress_level=compress_level)
  return buffer.getvalue()
