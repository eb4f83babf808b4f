"""What every segmentation builder shares: features, image I/O and the input check.

Records hold three features:

    image      tfds.features.Image  [H, W, 3] uint8
    label      tfds.features.Image  [H, W, 1] uint8, the dataset's own label ids
    file_name  tfds.features.Text   the image path relative to its split folder

Building and reading need no TensorFlow. tfds encodes a NumPy image with
`tf.image.encode_png`, so the builders never hand it arrays: they hand it encoded
bytes, which `tfds.features.Image` stores untouched. Source files that already
are 8-bit RGB PNG/JPEG (or 8-bit greyscale PNG masks) are stored byte for byte;
anything else is decoded, converted and re-encoded as PNG with Pillow here. The
records are written with `file_format='array_record'`, read back with
`builder.as_data_source(split)`, and decoded with `decode_image` /
`decode_label` (Pillow, `glare_jax/data/codec.py`), never by tfds' decoder (which would need
TensorFlow, or OpenCV that would turn a palette mask into colours).

Before anything is written, `check_pairs` decodes every image and mask once and
reports every problem it finds (unreadable file, size mismatch, label values
outside the dataset's ids), each naming its path.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

import tensorflow_datasets as tfds

from glare_jax.data.codec import decode_image, decode_label, encode_png  # noqa: F401  (re-exported)

# How many problems an error message lists before it summarises the rest.
_MAX_LISTED = 20


class LayoutError(ValueError):
  """The manual dir is not what the builder expects (layout, files or pixels)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
  """One example to write: an image and its mask in the dataset's own ids."""
  image: pathlib.Path
  mask: pathlib.Path | None     # None: a split without labels, stored as zeros
  file_name: str                # unique within its split; the record key
  label_map: np.ndarray | None = None   # [256] uint8 lookup applied to the mask


def segmentation_features(image_encoding: str) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3),
                                   encoding_format=image_encoding),
      "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png",
                                   use_colormap=True),
      "file_name": tfds.features.Text(),
  })


# ----------------------------------------------------------------------------
# Layout helpers: every failure names the path and what was expected there.
# ----------------------------------------------------------------------------


def check_manual_dir(manual_dir: os.PathLike | str | None, layout: str
                     ) -> pathlib.Path:
  """The manual dir as a Path, or a LayoutError if it is missing or empty."""
  if manual_dir is None or not str(manual_dir):
    raise LayoutError(f"no manual dir given; it should hold:\n{layout}")
  root = pathlib.Path(manual_dir).expanduser()
  if not root.is_dir():
    raise LayoutError(f"manual dir {root} does not exist; it should hold:\n{layout}")
  if not any(root.iterdir()):
    raise LayoutError(f"manual dir {root} is empty; it should hold:\n{layout}")
  return root


def require_dir(path: pathlib.Path, layout: str) -> pathlib.Path:
  if not path.is_dir():
    raise LayoutError(f"{path} is missing (wrong layout?); expected:\n{layout}")
  return path


def list_files(folder: pathlib.Path, pattern: str) -> list[pathlib.Path]:
  """Files in `folder` matching `pattern`, sorted; an error if there are none."""
  files = sorted(p for p in folder.glob(pattern) if p.is_file())
  if not files:
    raise LayoutError(f"{folder} holds no files matching {pattern!r}")
  return files


def pair_folders(image_dir: pathlib.Path, mask_dir: pathlib.Path | None,
                 image_suffix: str, name_prefix: str = "") -> list[Pair]:
  """Pairs `image_dir/STEM.<suffix>` with `mask_dir/STEM.png` (LoveDA, ADE20k).

  Images without a mask and masks without an image are both errors.
  """
  images = list_files(image_dir, f"*{image_suffix}")
  if mask_dir is None:
    return [Pair(p, None, name_prefix + p.name) for p in images]
  masks = {p.stem: p for p in mask_dir.glob("*.png")}
  problems = [f"image {p} has no mask (expected {mask_dir / (p.stem + '.png')})"
              for p in images if p.stem not in masks]
  image_stems = {p.stem for p in images}
  problems += [f"mask {m} has no image (expected {image_dir / (s + image_suffix)})"
               for s, m in sorted(masks.items()) if s not in image_stems]
  raise_problems(problems)
  return [Pair(p, masks[p.stem], name_prefix + p.name) for p in images]


def raise_problems(problems: Sequence[str]) -> None:
  if not problems:
    return
  listed = "\n  ".join(problems[:_MAX_LISTED])
  more = len(problems) - _MAX_LISTED
  tail = f"\n  ... and {more} more" if more > 0 else ""
  raise LayoutError(f"{len(problems)} problem(s) in the input:\n  {listed}{tail}")


# ----------------------------------------------------------------------------
# Pixels.
# ----------------------------------------------------------------------------


def load_image(path: pathlib.Path) -> np.ndarray:
  """[H, W, 3] uint8 RGB from any image file Pillow reads."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:
    raise LayoutError(f"{path}: unreadable or corrupt image ({e})") from None


def load_mask(path: pathlib.Path, label_map: np.ndarray | None = None
              ) -> np.ndarray:
  """[H, W] uint8 label ids from a single-channel 8-bit (or palette) PNG."""
  try:
    with Image.open(path) as im:
      mode = im.mode
      mask = np.asarray(im) if mode in ("L", "P") else None  # palette: indices
  except (OSError, SyntaxError, ValueError) as e:
    raise LayoutError(f"{path}: unreadable or corrupt mask ({e})") from None
  if mask is None:
    raise LayoutError(f"{path}: a mask must be a single-channel 8-bit PNG of "
                      f"label ids, got mode {mode!r}")
  return mask if label_map is None else label_map[mask]


def image_bytes(path: pathlib.Path) -> bytes:
  """The bytes to store for an image: the file itself when already 8-bit RGB."""
  with Image.open(path) as im:
    if im.format in ("PNG", "JPEG") and im.mode == "RGB":
      return path.read_bytes()
  return encode_png(load_image(path))


def label_bytes(pair: Pair, image_hw: tuple[int, int] | None = None) -> bytes:
  """The bytes to store for a mask (zeros of `image_hw` when there is none)."""
  if pair.mask is None:
    return encode_png(np.zeros(image_hw, np.uint8))
  if pair.label_map is None:
    with Image.open(pair.mask) as im:
      if im.format == "PNG" and im.mode == "L":
        return pair.mask.read_bytes()
  return encode_png(load_mask(pair.mask, pair.label_map))


def image_hw(path: pathlib.Path) -> tuple[int, int]:
  with Image.open(path) as im:
    return im.height, im.width


# ----------------------------------------------------------------------------
# The check that runs before anything is written.
# ----------------------------------------------------------------------------


def _pair_problems(pair: Pair, allowed: np.ndarray) -> list[str]:
  try:
    image = load_image(pair.image)
    if pair.mask is None:
      return []
    mask = load_mask(pair.mask, pair.label_map)
  except LayoutError as e:
    return [str(e)]
  if mask.shape != image.shape[:2]:
    (h, w), (mh, mw) = image.shape[:2], mask.shape
    return [f"size mismatch: image {pair.image} is {w}x{h} but mask "
            f"{pair.mask} is {mw}x{mh}"]
  present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
  bad = present[~allowed[present]]
  if bad.size:
    return [f"mask {pair.mask} holds label values {bad.tolist()} outside the "
            f"dataset's ids {describe_ids(allowed)}"]
  return []


def describe_ids(allowed: np.ndarray) -> str:
  ids = np.flatnonzero(allowed)
  plain = ids[ids != 255]
  text = f"0..{plain.max()}" if plain.size else "none"
  return text + (" and 255" if allowed[255] else "")


def allowed_ids(max_id: int) -> np.ndarray:
  """[256] bool: label ids 0..max_id and 255 (ignore)."""
  allowed = np.zeros(256, bool)
  allowed[:max_id + 1] = True
  allowed[255] = True
  return allowed


def check_pairs(splits: dict[str, list[Pair]], allowed: np.ndarray,
                num_threads: int | None = None) -> None:
  """Decodes every image and mask; raises one LayoutError listing all problems."""
  pairs: Iterable[Pair] = [p for split in splits.values() for p in split]
  num_threads = num_threads or min(16, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    found = pool.map(lambda p: _pair_problems(p, allowed), pairs)
    problems = [msg for msgs in found for msg in msgs]
  raise_problems(problems)
