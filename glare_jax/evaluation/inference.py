"""Whole-image and sliding-window inference, with mmsegmentation's semantics.

Both modes first resize the image keep-ratio to the dataset's test scale
(`SegTestTransform`) and score at the original label size:

- 'whole': the model sees the whole resized image (zero-padded to a multiple of
  the patch inside the Segmenter); its logits are resized bilinearly to the
  resized image size and then to the original size (mmseg's two resizes).
- 'slide': crop x crop windows every `stride` pixels; the last row/column of
  windows is shifted back to end at the border; windows of an image smaller
  than the crop are the image itself. Each window's logits are resized to the
  window, summed into the image and divided by the per-pixel window count,
  then resized to the original size.

The model call is jitted once per input shape (whole mode: one compilation per
distinct resized image size; a persistent cache, `jax_compilation_cache_dir`,
keeps them across runs); slide mode always runs windows of one shape in
batches of `window_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from glare_jax.data.datasets import DatasetInfo
from glare_jax.data.seg_transforms import (SegTestTransform, test_transform_from_config,
                                           to_train_ids)
from glare_jax.evaluation import metrics as metrics_lib
from glare_jax.models.fpn import resize_bilinear

Array = jax.Array
# (variables, images [B, H, W, 3]) -> logits [B, h, w, C]
ApplyFn = Callable[[Any, Array], Array]


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """mmseg's window placement: (y0, y1, x0, x1) for every window of an h x w image."""
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  boxes = []
  for r in range(rows):
    for c in range(cols):
      y1, x1 = min(r * stride + crop, h), min(c * stride + crop, w)
      boxes.append((max(y1 - crop, 0), y1, max(x1 - crop, 0), x1))
  return boxes


@dataclasses.dataclass
class Predictor:
  """Turns uint8 images into per-pixel class scores at their original size.

  Attributes:
    apply_fn: (variables, images) -> logits at feature resolution, e.g.
      `lambda v, x: model.apply(v, x, train=False)`.
    variables: the model's variables ({'params', 'batch_stats'}).
    transform: the test-time resize + normalisation.
    mode: 'whole' or 'slide'.
    crop_size, stride: sliding-window geometry (mmseg: 512, 341).
    window_batch: windows per model call in slide mode.
  """
  apply_fn: ApplyFn
  variables: Any
  transform: SegTestTransform
  mode: str = "whole"
  crop_size: int = 512
  stride: int = 341
  window_batch: int = 8
  _model: Callable = dataclasses.field(init=False, repr=False)
  _compiled_shapes: set = dataclasses.field(init=False, default_factory=set)

  def __post_init__(self):
    if self.mode not in ("whole", "slide"):
      raise ValueError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
    self._model = jax.jit(self.apply_fn)

  def _forward(self, images: Array) -> Array:
    self._compiled_shapes.add(tuple(images.shape))
    return self._model(self.variables, images)

  @property
  def num_compiled(self) -> int:
    """Distinct input shapes the model has been compiled for."""
    return len(self._compiled_shapes)

  def logits(self, image: np.ndarray) -> Array:
    """uint8 [H, W, 3] -> logits [H, W, C] float32 at the original size (on device)."""
    h, w = image.shape[:2]
    x = jnp.asarray(self.transform(image))          # [h', w', 3] at the test scale
    if self.mode == "whole":
      out = _resize_twice(self._forward(x[None]), tuple(x.shape[:2]), (h, w))
    else:
      out = resize_bilinear(self._slide(x), (h, w))
    return out[0]

  def predict(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> predicted train ids [H, W] (int32, host)."""
    return np.asarray(_argmax(self.logits(image)))

  def _slide(self, x: Array) -> Array:
    """[h, w, 3] -> summed-and-normalised window logits [1, h, w, C]."""
    h, w = x.shape[:2]
    boxes = slide_windows(h, w, self.crop_size, self.stride)
    crops = jnp.stack([x[y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # [N, ch, cw, 3]
    n, b = len(boxes), self.window_batch
    padded = jnp.concatenate([crops, jnp.repeat(crops[-1:], -n % b, axis=0)])
    logits = jnp.concatenate([self._forward(padded[i:i + b])
                              for i in range(0, len(padded), b)])[:n]
    return _assemble(logits, tuple(boxes), (h, w))


@jax.jit
def _argmax(logits: Array) -> Array:
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _score(logits: Array, label: Array, num_classes: int, ignore_index: int):
  """logits [H, W, C], label [H, W] -> (pred [H, W] int32, confusion [C, C] int32)."""
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return pred, metrics_lib.confusion_matrix(pred, label, num_classes, ignore_index)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize_twice(logits: Array, resized: tuple[int, int], original: tuple[int, int]) -> Array:
  return resize_bilinear(resize_bilinear(logits, resized), original)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _assemble(logits: Array, boxes: tuple, hw: tuple[int, int]) -> Array:
  """Window logits [N, h_f, w_f, C] -> [1, h, w, C]: resized to each window, summed, averaged."""
  (y0, y1, x0, x1) = boxes[0]
  up = resize_bilinear(logits, (y1 - y0, x1 - x0))
  total = jnp.zeros((*hw, logits.shape[-1]), jnp.float32)
  count = jnp.zeros((*hw, 1), jnp.float32)
  for k, (y0, y1, x0, x1) in enumerate(boxes):
    total = total.at[y0:y1, x0:x1].add(up[k])
    count = count.at[y0:y1, x0:x1].add(1.0)
  return (total / count)[None]


def save_prediction(pred: np.ndarray, path: str | pathlib.Path, info: DatasetInfo) -> None:
  """Write train-id predictions as an 8-bit PNG in the dataset's own label ids."""
  out = pred.astype(np.int64) + (1 if info.reduce_zero_label else 0)
  if out.min() < 0 or out.max() > 255:
    raise ValueError(f"prediction ids {out.min()}..{out.max()} do not fit an 8-bit PNG")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(out.astype(np.uint8), mode="L").save(path)


def evaluate(predictor: Predictor, records: Iterable[Mapping[str, Any]], info: DatasetInfo,
             *, save_dir: str | pathlib.Path | None = None) -> metrics_lib.ConfusionMatrix:
  """Score a validation set: accumulate the confusion matrix over `records`.

  Each record holds 'image' uint8 [H, W, 3], 'label' uint8 [H, W] in the
  dataset's own ids and, when predictions are saved, a 'name' (the PNG's stem).
  Returns the host-side confusion matrix; several processes each scoring a
  shard add theirs together (`ConfusionMatrix.merge`) before `metrics()`.
  """
  cm = metrics_lib.ConfusionMatrix(info.num_classes)
  for i, rec in enumerate(records):
    label = to_train_ids(np.asarray(rec["label"]), info)
    if label.shape != rec["image"].shape[:2]:
      raise ValueError(f"record {rec.get('name', i)}: label {label.shape} does not match "
                       f"image {rec['image'].shape}")
    pred, counts = _score(predictor.logits(rec["image"]), jnp.asarray(label),
                          info.num_classes, info.ignore_index)
    cm.add(counts)
    if save_dir is not None:
      if "name" not in rec:
        raise ValueError("saving predictions needs a 'name' in every record")
      save_prediction(np.asarray(pred), pathlib.Path(save_dir) / f"{rec['name']}.png", info)
  return cm


def predictor_from_config(config, apply_fn: ApplyFn, variables: Any,
                          info: DatasetInfo) -> Predictor:
  """A Predictor from `config.eval` (mode, crop_size, stride, window_batch, scale)."""
  e = config.eval
  return Predictor(apply_fn, variables, test_transform_from_config(config, info),
                   mode=e.mode, crop_size=e.crop_size, stride=e.stride,
                   window_batch=e.window_batch)
