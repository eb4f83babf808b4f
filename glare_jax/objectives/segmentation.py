"""The fine-tuning loss: mmseg's CrossEntropyLoss on logits upsampled to the labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glare_jax.data.datasets import IGNORE_INDEX
from glare_jax.models.fpn import resize_bilinear

Array = jax.Array


def seg_cross_entropy(logits: Array, labels: Array, *, ignore_index: int = IGNORE_INDEX,
                      avg_non_ignore: bool = False) -> Array:
  """Pixel-wise cross-entropy with ignored pixels.

  Args:
    logits: [B, h, w, C] at feature resolution; resized bilinearly (align_corners
      False) to the label size first, as mmseg's decode head does.
    labels: [B, H, W] integer train ids, `ignore_index` where unlabelled.
    avg_non_ignore: False (mmseg's default): the summed loss is divided by all
      B*H*W pixels, ignored ones included; True divides by the labelled pixels.
  Returns:
    scalar float32.
  """
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  logp = jax.nn.log_softmax(logits, axis=-1)                        # [B, H, W, C]
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  denom = jnp.maximum(valid.sum(), 1) if avg_non_ignore else labels.size
  return total / denom
