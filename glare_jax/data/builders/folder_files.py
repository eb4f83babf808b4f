"""A folder of your own images (and masks): finding, pairing and reading the files.

`find_items` lists the images under a folder (recursively), pairs each with its
mask by relative path and stem, and splits them; `read_image` / `read_mask` turn
one file into the arrays the records store, or raise a LayoutError that names the
file and says how to convert it. `ordered_map` runs such work on a few threads
(Pillow and NumPy release the GIL), a bounded window at a time, in input order,
and `Progress` logs the rate and an ETA. The builder is `folder.py`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import pathlib
import time
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging
import numpy as np
from PIL import Image

from glare_jax.data.builders import common

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
VAL_FOLDERS = ("val", "validation")   # a top-level folder of these names is the validation split
_GREY_OR_COLOUR = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112    # the EXIF tag
_CONVERT_16 = ("scale its values to 0..255 and save 8-bit RGB, e.g. `gdal_translate -ot "
               "Byte -scale -b 1 -b 2 -b 3 IN OUT.tif` or NumPy (x / x.max() * 255)")

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to store, its mask (None: unlabelled) and its record name."""
  image: pathlib.Path
  mask: pathlib.Path | None
  file_name: str            # the image's path relative to the images folder


def _files(root: pathlib.Path, suffixes: tuple[str, ...], skip: pathlib.Path | None
           ) -> list[pathlib.Path]:
  """Files under `root` with one of `suffixes`, sorted; hidden ones and `skip` left out."""
  out = []
  for p in root.rglob("*"):
    rel = p.relative_to(root).parts
    if any(part.startswith(".") for part in rel) or not p.is_file():
      continue
    if skip is not None and p.is_relative_to(skip):
      continue
    if p.suffix.lower() in suffixes:
      out.append(p)
  return sorted(out)


def _by_stem(root: pathlib.Path, files: list[pathlib.Path], what: str
             ) -> tuple[dict[str, pathlib.Path], list[str]]:
  """{relative path without suffix: file}, and the clashes (a.png beside a.jpg)."""
  keyed: dict[str, pathlib.Path] = {}
  problems = []
  for p in files:
    key = p.relative_to(root).with_suffix("").as_posix()
    if key in keyed:
      problems.append(f"{what}s {keyed[key]} and {p} share the name {key!r}; "
                      "rename one (records and masks pair by name)")
    keyed[key] = p
  return keyed, problems


def find_items(images: pathlib.Path, masks: pathlib.Path | None = None,
               val_fraction: float = 0.0, seed: int = 0
               ) -> tuple[dict[str, list[Item]], list[str]]:
  """({'train': items[, 'validation': items]}, pairing problems): an image
  without its mask is listed, and kept unlabelled so its pixels are checked too.

  The validation split is a top-level val/ (or validation/) folder, or with
  `val_fraction` > 0 that fraction of the images drawn by a permutation seeded
  with `seed`; otherwise there is none.
  """
  for folder, flag in ((images, "--images"), (masks, "--masks")):
    if folder is not None and not folder.is_dir():
      raise common.LayoutError(f"{flag}={folder} is not a folder")
  skip = masks if masks is not None and masks.resolve().is_relative_to(images.resolve()) else None
  files = _files(images, IMAGE_SUFFIXES, skip)
  if not files:
    raise common.LayoutError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                             "searched recursively)")
  by_key, problems = _by_stem(images, files, "image")
  mask_of: dict[str, pathlib.Path | None] = {k: None for k in by_key}
  if masks is not None:
    mask_files, mask_problems = _by_stem(masks, _files(masks, MASK_SUFFIXES, None), "mask")
    problems += mask_problems
    problems += [f"image {p} has no mask (expected {masks / key}.png)"
                 for key, p in by_key.items() if key not in mask_files]
    suffixes = "|".join(s[1:] for s in IMAGE_SUFFIXES)
    problems += [f"mask {m} has no image (expected {images / key}.<{suffixes}>)"
                 for key, m in mask_files.items() if key not in by_key]
    mask_of = {k: mask_files.get(k) for k in by_key}
  items = [Item(p, mask_of[k], p.relative_to(images).as_posix()) for k, p in by_key.items()]
  in_val = np.array([p.relative_to(images).parts[0].lower() in VAL_FOLDERS
                     and len(p.relative_to(images).parts) > 1 for p in by_key.values()])
  if in_val.any() and val_fraction > 0:
    raise common.LayoutError(f"{images} has a val/ folder and --val_fraction={val_fraction} "
                             "was given: use one of the two")
  if val_fraction > 0:
    if not val_fraction < 1:
      raise common.LayoutError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    count = max(1, round(val_fraction * len(items)))
    if count >= len(items):
      raise common.LayoutError(f"--val_fraction={val_fraction} of {len(items)} images "
                               "leaves none for training")
    in_val[np.random.default_rng(seed).permutation(len(items))[:count]] = True
  if in_val.all():
    raise common.LayoutError(f"every image of {images} is in its val/ folder: none to train on")
  splits = {"train": [it for it, v in zip(items, in_val) if not v]}
  if in_val.any():
    splits["validation"] = [it for it, v in zip(items, in_val) if v]
  return splits, problems


# ----------------------------------------------------------------------------
# Pixels: every refusal names the file and says how to convert it.
# ----------------------------------------------------------------------------


# EXIF orientation -> the turn that displays the pixels upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
  """The EXIF orientation in the file's header. (A PNG's eXIf chunk after its
  pixels is left out, in both passes alike: Pillow would decode the image to find it.)"""
  if im.format == "PNG" and "exif" not in im.info:
    return 1
  return im.getexif().get(_ORIENTATION, 1)


def _bits_per_sample(im: Image.Image) -> int:
  if im.mode.startswith("I;16") or any(";16" in str(t.args) for t in im.tile or ()):
    return 16
  return 32 if im.mode in ("I", "F") else 8


@contextlib.contextmanager
def _opened(path: pathlib.Path, what: str) -> Iterator[tuple[Image.Image, int]]:
  """(the decoded 8-bit image, its header's EXIF orientation): fully loaded, so a
  truncated file fails here; every failure inside the block becomes a LayoutError
  naming `path`."""
  try:
    with Image.open(path) as im:
      frames = getattr(im, "n_frames", 1)
      bits = _bits_per_sample(im)
      orientation = _orientation(im)     # before loading, as `as_is_hw` reads it
      im.load()
      if frames > 1:
        stack = (" (a multi-band stack? pick 3 bands, e.g. `gdal_translate -ot Byte "
                 "-scale -b 1 -b 2 -b 3 IN OUT.tif`)") if what == "image" else ""
        raise common.LayoutError(f"{path}: {frames} pages or bands in one file; save "
                                 f"each {what} as one 8-bit file{stack}")
      if bits != 8:
        hint = _CONVERT_16 if what == "image" else "save the label ids as an 8-bit PNG"
        raise common.LayoutError(f"{path}: {bits}-bit {what} (mode {im.mode}); {hint}")
      yield im, orientation
  except common.LayoutError:
    raise
  except Image.DecompressionBombError as e:
    raise common.LayoutError(f"{path}: too large for Pillow ({e}); cut it into tiles") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise common.LayoutError(
        f"{path}: unreadable or truncated {what} ({e}); if it opens elsewhere it may be "
        "a multi-band or 16-bit TIFF: " + _CONVERT_16) from None


def _to_rgb(path: pathlib.Path, im: Image.Image) -> np.ndarray:
  """[H, W, 3] uint8 from an 8-bit image; alpha only if it is opaque everywhere."""
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
  if im.mode in _WITH_ALPHA:
    alpha = np.asarray(im.getchannel("A"))
    if (alpha != 255).any():
      raise common.LayoutError(
          f"{path}: its alpha channel carries data ({np.mean(alpha != 255):.1%} of the "
          "pixels not opaque); flatten it onto a background or drop the alpha, e.g. "
          "`magick IN -background black -alpha remove -alpha off OUT.png`")
  elif im.mode not in _GREY_OR_COLOUR:
    raise common.LayoutError(f"{path}: pixel mode {im.mode!r} has no 8-bit RGB "
                             f"conversion; save it as 8-bit RGB ({_CONVERT_16})")
  return np.asarray(im.convert("RGB"))


def upsampled_hw(hw: tuple[int, int], min_size: int) -> tuple[int, int]:
  """(H, W) with the shorter side raised to `min_size` (aspect kept), if it is shorter."""
  h, w = hw
  if min(h, w) >= min_size:
    return h, w
  s = min_size / min(h, w)
  return max(min_size, round(h * s)), max(min_size, round(w * s))


def read_image(path: pathlib.Path, min_size: int = 0) -> np.ndarray:
  """[H, W, 3] uint8 RGB as stored: EXIF orientation applied, a shorter side
  under `min_size` upsampled (bicubic) to it."""
  with _opened(path, "image") as (im, orientation):
    turn = _UPRIGHT.get(orientation)
    rgb = _to_rgb(path, im.transpose(turn) if turn is not None else im)
  hw = upsampled_hw(rgb.shape[:2], min_size)
  if hw != rgb.shape[:2]:
    rgb = np.asarray(Image.fromarray(rgb).resize(hw[::-1], Image.Resampling.BICUBIC))
  return rgb


def as_is_hw(path: pathlib.Path, min_size: int = 0) -> tuple[int, int] | None:
  """(H, W) when the file's own bytes are the image to store (8-bit RGB PNG or
  JPEG, no EXIF turn, no upsampling), read from its header; else None."""
  with Image.open(path) as im:
    if (im.format in ("PNG", "JPEG") and im.mode == "RGB" and _bits_per_sample(im) == 8
        and _orientation(im) not in _UPRIGHT and min(im.size) >= min_size):
      return im.height, im.width
  return None


def read_mask(path: pathlib.Path, hw: tuple[int, int] | None = None
              ) -> tuple[np.ndarray, bool]:
  """([H, W] uint8 label ids, whether the file's own bytes are them: an 8-bit
  greyscale PNG); resized (nearest) to `hw` when given."""
  with _opened(path, "mask") as (im, _):
    if im.mode not in ("L", "P"):
      raise common.LayoutError(f"{path}: a mask must hold one 8-bit label id per pixel "
                               f"(greyscale or palette PNG), got mode {im.mode!r}")
    ids = np.asarray(im)        # a palette mask: its indices
    as_is = im.format == "PNG" and im.mode == "L"
  if hw is not None and ids.shape != hw:
    ids = np.asarray(Image.fromarray(ids).resize(hw[::-1], Image.Resampling.NEAREST))
    as_is = False
  return ids, as_is


# ----------------------------------------------------------------------------
# Parallel, streaming, with progress.
# ----------------------------------------------------------------------------


def ordered_map(fn: Callable[[T], R], items: Iterable[T], num_threads: int) -> Iterator[R]:
  """fn over items on `num_threads` threads, results in order, at most
  2 * num_threads in flight (so nothing piles up in memory)."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    window: collections.deque = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) >= 2 * num_threads:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


class Progress:
  """Logs `done/total`, the rate and an ETA every `every_s` seconds and at the end."""

  def __init__(self, what: str, total: int, every_s: float = 10.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.done = 0
    self.start = self.last = time.perf_counter()

  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)

  def step(self) -> None:
    self.done += 1
    now = time.perf_counter()
    if now - self.last >= self.every_s or self.done == self.total:
      self.last = now
      rate = self.rate()
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %s", self.what, self.done,
                   self.total, rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
