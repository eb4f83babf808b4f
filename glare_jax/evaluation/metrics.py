"""Segmentation metrics from a confusion matrix, as mmsegmentation computes them.

The confusion matrix `cm[g, p]` counts pixels of ground-truth class g predicted
as p over the whole validation set; pixels labelled `ignore_index` (or any value
outside [0, C), which mmseg's histograms also drop) are not counted.

    aAcc      = trace(cm) / cm.sum()                  (correct / labelled pixels)
    IoU_c     = TP / (TP + FP + FN)                   NaN when the union is empty
    Acc_c     = TP / (TP + FN)                        NaN when class c has no pixels
    mIoU/mAcc = NaN-ignoring means of IoU_c / Acc_c

A class absent from both labels and predictions has IoU NaN and is left out of
mIoU; a class predicted but absent from the labels has IoU 0 and counts. Metrics
are reported in percent, like mmseg's tables and the paper.

Counting runs on device (`confusion_matrix`, jittable, int32 per batch); the
running total lives on the host in int64 (`ConfusionMatrix`), since a large
validation set (LoveDA: 1.7e9 pixels) can overflow int32.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glare_jax.data.datasets import IGNORE_INDEX

Array = jax.Array


def confusion_matrix(pred: Array, label: Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> Array:
  """Jittable: [C, C] int32 counts of (label, pred) pairs over the valid pixels.

  pred and label: integer arrays of one shape, [B, H, W] (or [H, W]); pred in
  [0, C). Each sample is counted on its own and the counts summed over B, so
  a batch sharded along B (Auto or Explicit mesh axes) needs no gather; under
  jit the sum runs over the global batch.
  """
  if pred.shape != label.shape:
    raise ValueError(f"confusion_matrix: pred {pred.shape} and label {label.shape} differ")
  b = label.shape[0] if label.ndim >= 3 else 1
  label = label.astype(jnp.int32).reshape(b, -1)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  index = jnp.where(valid, label * num_classes + pred.astype(jnp.int32).reshape(b, -1), 0)
  count = lambda i, w: jnp.bincount(i, w, length=num_classes * num_classes)
  counts = jax.vmap(count)(index, valid.astype(jnp.int32))   # [B, C*C]
  return counts.sum(0).astype(jnp.int32).reshape(num_classes, num_classes)


def update_confusion(cm: Array, pred: Array, label: Array,
                     ignore_index: int = IGNORE_INDEX) -> Array:
  """Jittable: cm + confusion_matrix(pred, label) (int32; flush to the host regularly)."""
  return cm + confusion_matrix(pred, label, cm.shape[0], ignore_index)


class ConfusionMatrix:
  """Host-side int64 accumulator of per-batch confusion matrices."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.total = np.zeros((num_classes, num_classes), np.int64)

  def add(self, cm: Any) -> None:
    cm = np.asarray(cm)
    if cm.shape != self.total.shape:
      raise ValueError(f"confusion matrix of shape {cm.shape}, expected {self.total.shape}")
    self.total += cm.astype(np.int64)

  def merge(self, other: "ConfusionMatrix") -> None:
    self.add(other.total)

  def metrics(self) -> dict[str, Any]:
    return compute_metrics(self.total)


def compute_metrics(cm: np.ndarray) -> dict[str, Any]:
  """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc (percent, NaN where undefined)."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  gt = cm.sum(axis=1)      # TP + FN
  pred = cm.sum(axis=0)    # TP + FP
  union = gt + pred - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  total = cm.sum()
  nanmean = lambda x: float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else math.nan
  return {
      "aAcc": 100.0 * float(tp.sum() / total) if total else math.nan,
      "mIoU": 100.0 * nanmean(iou),
      "mAcc": 100.0 * nanmean(acc),
      "IoU": 100.0 * iou,
      "Acc": 100.0 * acc,
      "num_pixels": int(total),
  }


def format_table(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
  """Per-class IoU / Acc and the summary, as a plain-text table."""
  width = max(len("class"), *(len(n) for n in class_names))
  fmt = lambda v: "  nan" if np.isnan(v) else f"{v:5.2f}"
  lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 15)]
  for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
    lines.append(f"{name:<{width}}  {fmt(iou):>5}  {fmt(acc):>5}")
  lines.append("-" * (width + 15))
  lines.append(f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  "
               f"mAcc {metrics['mAcc']:.2f}")
  return "\n".join(lines)


def _json_number(v: float) -> float | None:
  return None if v is None or math.isnan(v) else round(float(v), 4)


def metrics_to_json(metrics: dict[str, Any], class_names: Sequence[str],
                    **extra: Any) -> dict[str, Any]:
  """A JSON-ready dict: summary numbers and a per-class table (NaN -> null)."""
  if len(class_names) != len(metrics["IoU"]):
    raise ValueError(f"{len(class_names)} class names for {len(metrics['IoU'])} classes")
  return {
      "units": "percent",
      "aAcc": _json_number(metrics["aAcc"]),
      "mIoU": _json_number(metrics["mIoU"]),
      "mAcc": _json_number(metrics["mAcc"]),
      "num_pixels": metrics["num_pixels"],
      "per_class": {name: {"IoU": _json_number(i), "Acc": _json_number(a)}
                    for name, i, a in zip(class_names, metrics["IoU"], metrics["Acc"])},
      **extra,
  }


def write_eval_json(path: str | pathlib.Path, metrics: dict[str, Any],
                    class_names: Sequence[str], **extra: Any) -> pathlib.Path:
  """Write `eval.json` (see `metrics_to_json`); `extra` adds fields (step, seed, ...)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(metrics_to_json(metrics, class_names, **extra), indent=2) + "\n")
  return path
