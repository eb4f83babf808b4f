"""mmsegmentation's segmentation pipelines in NumPy, one record at a time.

Train (per record, deterministic given an `np.random.Generator`):
    reduce_zero_label -> Resize(scale * U(0.5, 2.0), keep ratio) -> RandomCrop(512,
    cat_max_ratio 0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize ->
    Pad(512; image 0, label 255)
Test: Resize(scale, keep ratio) -> Normalize (labels stay at the original size).

Resampling follows OpenCV, which mmseg uses: bilinear for images with half-pixel
centres and no antialiasing (computed in float and rounded, so within one grey
level of OpenCV's fixed-point result), floor(dst * in / out) nearest for labels.
Only the crop window of the resized image is ever computed, which gives the
same pixels as resizing the whole image first.

Images are RGB uint8 [H, W, 3]; mmseg reads BGR, but every step here is
channel-symmetric or goes through HSV, so the order does not matter. Labels are
uint8 [H, W] in the dataset's own ids.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glare_jax.data.datasets import IGNORE_INDEX, DatasetInfo

# mmseg's img_norm_cfg (ImageNet statistics in 0..255).
MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)

SegTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                        tuple[np.ndarray, np.ndarray]]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
  out = label.astype(np.int16) - 1
  out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
  return out.astype(np.uint8)


def to_train_ids(label: np.ndarray, info: DatasetInfo) -> np.ndarray:
  return reduce_zero_label(label) if info.reduce_zero_label else label


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv.rescale_size: the largest keep-ratio size with long side <= max(scale) and
  short side <= min(scale); sides rounded with int(x + 0.5). Returns (h, w)."""
  h, w = hw
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def _linear_taps(n_in: int, n_out: int, start: int, stop: int):
  """Source taps (i0, i1, w1) of output pixels [start, stop) of an n_in -> n_out resize."""
  src = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int],
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """OpenCV INTER_LINEAR resize of uint8 [H, W, C] to `size` (h, w).

  `window` = (y0, y1, x0, x1) returns only that part of the resized image.
  """
  h_out, w_out = size
  y0, y1, x0, x1 = window if window is not None else (0, h_out, 0, w_out)
  r0, r1, wy = _linear_taps(image.shape[0], h_out, y0, y1)
  c0, c1, wx = _linear_taps(image.shape[1], w_out, x0, x1)
  img = image.astype(np.float32)
  rows = img[r0] * (1 - wy)[:, None, None] + img[r1] * wy[:, None, None]
  out = rows[:, c0] * (1 - wx)[None, :, None] + rows[:, c1] * wx[None, :, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """OpenCV INTER_NEAREST source index of each output pixel: floor(dst * in / out)."""
  return np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  rows = nearest_indices(label.shape[0], size[0])
  return label[rows][:, nearest_indices(label.shape[1], size[1])]


# --- photometric distortion ------------------------------------------------------

def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> uint8 HSV in OpenCV's ranges (H in [0, 180), S and V in [0, 255])."""
  rgb = image.astype(np.float32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = rgb.max(-1)
  diff = v - rgb.min(-1)
  safe = np.where(diff > 0, diff, 1.0)
  s = np.where(v > 0, diff * 255.0 / np.where(v > 0, v, 1.0), 0.0)
  h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe,
                                                   4.0 + (r - g) / safe)) * 30.0
  h = np.where(diff > 0, np.floor(h + 0.5), 0.0)
  h = np.where(h < 0, h + 180.0, h)
  return np.stack([h, np.floor(s + 0.5), v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """Inverse of `rgb_to_hsv` (OpenCV's float formula, rounded to the nearest level)."""
  h = hsv[..., 0].astype(np.float32) * (6.0 / 180.0)
  s = hsv[..., 1].astype(np.float32) / 255.0
  v = hsv[..., 2].astype(np.float32)
  sector = np.floor(h).astype(np.int64) % 6
  f = h - np.floor(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
  table = np.stack([v, q, p, t], -1)  # indices 0=v 1=q 2=p 3=t
  order = np.array([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]])
  rgb = np.take_along_axis(table, order[sector], axis=-1)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg's `convert`: x * alpha + beta, clipped to [0, 255], truncated to uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
  """mmseg's PhotoMetricDistortion; each step applies with probability 0.5.

  Order: brightness; contrast here (mode 1) or last (mode 0); saturation; hue.
  The random draws happen in mmseg's order, so a seed fixes the outcome.
  """
  brightness_delta: float = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18

  def _contrast(self, img, rng):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*self.contrast_range))
    return img

  def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
      img = _convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
      img = self._contrast(img, rng)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
      img = hsv_to_rgb(hsv)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      shift = rng.integers(-self.hue_delta, self.hue_delta)  # high excluded, as in mmseg
      hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
      img = hsv_to_rgb(hsv)
    if mode == 0:
      img = self._contrast(img, rng)
    return img


# --- geometry ---------------------------------------------------------------------

def random_crop_box(label: np.ndarray, crop: int, cat_max_ratio: float,
                    rng: np.random.Generator, max_tries: int = 10,
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
  """mmseg RandomCrop: (y0, y1, x0, x1) of a crop x crop window (clipped to the image).

  With cat_max_ratio < 1 the box is re-drawn (up to `max_tries` times) until the
  crop holds at least two classes and the largest non-ignored class covers less
  than cat_max_ratio of the non-ignored pixels; after the last failure the box
  drawn next is used unchecked, exactly as mmseg does.
  """
  h, w = label.shape

  def draw():
    y = rng.integers(0, max(h - crop, 0) + 1)
    x = rng.integers(0, max(w - crop, 0) + 1)
    return int(y), int(min(y + crop, h)), int(x), int(min(x + crop, w))

  box = draw()
  if cat_max_ratio < 1.0:
    for _ in range(max_tries):
      y0, y1, x0, x1 = box
      classes, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
      counts = counts[classes != ignore_index]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = draw()
  return box


def normalize(image: np.ndarray, mean=MMSEG_MEAN, std=MMSEG_STD) -> np.ndarray:
  return (image.astype(np.float32) - np.float32(mean)) / np.float32(std)


def pad_to(image: np.ndarray, label: np.ndarray, size: int, image_value: float = 0.0,
           label_value: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """Pad bottom/right to size x size (mmseg Pad: after Normalize, so 0 is the mean colour)."""
  ph, pw = size - image.shape[0], size - image.shape[1]
  image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=image_value)
  label = np.pad(label, ((0, ph), (0, pw)), constant_values=label_value)
  return image, label


@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
  """transform(image uint8 [H, W, 3], label uint8 [H, W], rng) ->
  (image float32 [crop, crop, 3] normalised, label uint8 [crop, crop] train ids)."""
  scale: tuple[int, int]                  # dataset scale (long, short)
  reduce_zero_label: bool
  crop_size: int = 512
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  max_crop_tries: int = 10
  flip_p: float = 0.5
  photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()
  mean: tuple[float, float, float] = MMSEG_MEAN
  std: tuple[float, float, float] = MMSEG_STD
  ignore_index: int = IGNORE_INDEX

  def __call__(self, image: np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _check_record(image, label)
    if self.reduce_zero_label:
      label = reduce_zero_label(label)
    lo, hi = self.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    size = rescale_size(image.shape[:2], (int(self.scale[0] * ratio),
                                          int(self.scale[1] * ratio)))
    label = resize_nearest(label, size)
    box = random_crop_box(label, self.crop_size, self.cat_max_ratio, rng,
                          self.max_crop_tries, self.ignore_index)
    y0, y1, x0, x1 = box
    image = resize_bilinear(image, size, window=box)
    label = label[y0:y1, x0:x1]
    if rng.random() < self.flip_p:
      image, label = image[:, ::-1], label[:, ::-1]
    if self.photometric is not None:
      image = self.photometric(image, rng)
    image = normalize(image, self.mean, self.std)
    return pad_to(image, np.ascontiguousarray(label), self.crop_size,
                  label_value=self.ignore_index)


@dataclasses.dataclass(frozen=True)
class SegTestTransform:
  """image uint8 [H, W, 3] -> normalised float32 [h, w, 3] at the keep-ratio test scale."""
  scale: tuple[int, int]
  mean: tuple[float, float, float] = MMSEG_MEAN
  std: tuple[float, float, float] = MMSEG_STD

  def __call__(self, image: np.ndarray) -> np.ndarray:
    size = rescale_size(image.shape[:2], self.scale)
    if size != image.shape[:2]:
      image = resize_bilinear(image, size)
    return normalize(image, self.mean, self.std)


def _check_record(image: np.ndarray, label: np.ndarray) -> None:
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  if label.shape != image.shape[:2] or label.dtype != np.uint8:
    raise ValueError(f"label must be uint8 {image.shape[:2]}, got {label.dtype} {label.shape}")


def train_transform_from_config(config, info: DatasetInfo) -> SegTrainTransform:
  """From a fine-tuning config (`config.aug`, `config.crop_size`) and the dataset info."""
  a = config.aug
  photometric = PhotoMetricDistortion(
      a.brightness_delta, tuple(a.contrast_range), tuple(a.saturation_range),
      a.hue_delta) if a.photometric else None
  return SegTrainTransform(
      scale=tuple(a.scale or info.train_scale), reduce_zero_label=info.reduce_zero_label,
      crop_size=config.crop_size, ratio_range=tuple(a.ratio_range),
      cat_max_ratio=a.cat_max_ratio, max_crop_tries=a.max_crop_tries, flip_p=a.flip_p,
      photometric=photometric, mean=tuple(a.mean), std=tuple(a.std),
      ignore_index=info.ignore_index)


def test_transform_from_config(config, info: DatasetInfo) -> SegTestTransform:
  return SegTestTransform(scale=tuple(config.eval.scale or info.test_scale),
                          mean=tuple(config.aug.mean), std=tuple(config.aug.std))
