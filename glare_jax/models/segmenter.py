"""The fine-tuning model: ViT backbone + (optional XCiT pyramid) + FPN neck and head.

    model = segmenter_from_config(config, num_classes)
    variables = model.init(rng, images)           # {'params', 'batch_stats'}
    # backbone weights: glare_jax/train/init_checkpoint.py (converted or pre-trained)
    logits, updates = model.apply({'params': params, 'batch_stats': stats}, images,
                                  train=True, rngs={'dropout': key},
                                  mutable=['batch_stats'])

Parameters: {'backbone': ViT, 'multiscale': (variant only), 'neck': FPNNeck,
'head': FPNHead}. Logits come at the feature resolution (stride 4 of the padded
input with the multi-scale variant, stride 16 otherwise); the loss and the
inference resize them bilinearly to the label size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.models import vit_from_config
from glare_jax.models.fpn import FPNHead, FPNNeck, MultiScale
from glare_jax.models.vit import ViT

Array = jax.Array


class Segmenter(nn.Module):
  """ViT + FPN. `feature_blocks` are 0-indexed block outputs (before the final norm).

  Inputs whose sides are not multiples of the patch size are zero-padded at the
  bottom/right first (mmseg's PatchEmbed 'corner' padding), so the logits cover
  the padded image.
  """
  backbone: ViT
  num_classes: int
  feature_blocks: tuple[int, ...] = (2, 5, 8, 11)
  multiscale: bool = False
  neck_dim: int = 256
  head_dim: int = 128
  feature_strides: tuple[int, ...] = (4, 8, 16, 32)
  dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """images: [B, H, W, 3] normalised -> logits [B, h, w, num_classes] float32."""
    depth = self.backbone.depth
    if any(not 0 <= i < depth for i in self.feature_blocks):
      raise ValueError(f"feature_blocks {self.feature_blocks} out of range for a ViT of "
                       f"depth {depth}")
    p = self.backbone.patch_size
    b, h, w, _ = images.shape
    pad_h, pad_w = -h % p, -w % p
    if pad_h or pad_w:
      images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))

    _, aux = self.backbone(images, train=train)
    gh, gw = aux["grid"]
    prefix = aux["num_prefix"]
    feats = [aux["blocks"][i][:, prefix:].reshape(b, gh, gw, -1)   # [B, h, w, D]
             for i in self.feature_blocks]
    bn = dict(bn_momentum=self.bn_momentum, bn_eps=self.bn_eps)
    if self.multiscale:
      feats = MultiScale(dtype=self.dtype, name="multiscale", **bn)(feats, train)
    feats = FPNNeck(self.neck_dim, dtype=self.dtype, name="neck")(feats)
    return FPNHead(self.num_classes, self.head_dim, tuple(self.feature_strides),
                   self.dropout, dtype=self.dtype, name="head", **bn)(feats, train)


def segmenter_from_config(config: mlc.ConfigDict, num_classes: int) -> Segmenter:
  """The Segmenter of a fine-tuning config (`config.model`, `config.fpn`)."""
  backbone = vit_from_config(config.model)
  f = config.fpn
  return Segmenter(
      backbone=backbone, num_classes=num_classes, feature_blocks=tuple(f.feature_blocks),
      multiscale=f.multiscale, neck_dim=f.neck_dim, head_dim=f.head_dim,
      feature_strides=tuple(f.feature_strides), dropout=f.dropout,
      bn_momentum=f.bn_momentum, bn_eps=f.bn_eps, dtype=backbone.dtype)
