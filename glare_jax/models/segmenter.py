"""The fine-tuning model: ViT backbone + (optional XCiT pyramid) + FPN neck and head.

    model = segmenter_from_config(config, num_classes)
    variables = model.init(rng, images)           # {'params', 'batch_stats'}
    params = load_backbone(variables['params'], converted_backbone_params)
    logits, updates = model.apply({'params': params, 'batch_stats': stats}, images,
                                  train=True, rngs={'dropout': key},
                                  mutable=['batch_stats'])

Parameters: {'backbone': ViT, 'multiscale': (variant only), 'neck': FPNNeck,
'head': FPNHead}. Logits come at the feature resolution (stride 4 of the padded
input with the multi-scale variant, stride 16 otherwise); the loss and the
inference resize them bilinearly to the label size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from glare_jax.models import vit_from_config
from glare_jax.models.fpn import FPNHead, FPNNeck, MultiScale
from glare_jax.models.vit import ViT, resize_pos_grid

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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    out.update(_flat(v, path) if isinstance(v, Mapping) else {path: v})
  return out


def _set(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for k in parents:
    tree = tree[k]
  tree[leaf] = value


def load_backbone(params: dict[str, Any], backbone: dict[str, Any], *,
                  pos_resize: str = "size") -> tuple[dict[str, Any], list[str]]:
  """Put pretrained ViT parameters into a Segmenter's params.

  The position table is resampled once from the checkpoint's grid to the
  Segmenter's (e.g. 14x14 -> 32x32 for 512 crops), as mmseg does when it loads
  a backbone: the fine-tuning then learns the 32x32 table. Prefix rows are kept.
  Checkpoint parameters the model does not have (a pre-training mask token) are
  skipped and returned.

  Args:
    params: the Segmenter's freshly initialised params ({'backbone', 'neck', ...}).
    backbone: a ViT parameter tree (a converted checkpoint's 'backbone').
    pos_resize: 'size' (mmseg: torch bicubic to the target size) or 'dino'.
  Returns:
    (new params, names of skipped checkpoint parameters).
  Raises:
    ValueError naming the parameters the checkpoint lacks or has in other shapes.
  """
  model = _flat(params["backbone"])
  ckpt = _flat(jax.tree.map(np.asarray, backbone))
  missing = sorted(set(model) - set(ckpt))
  if missing:
    hint = (" (a checkpoint without adapters needs model.adapter_mode='none')"
            if any("adapter" in m for m in missing) else "")
    raise ValueError(f"pretrained backbone lacks {len(missing)} parameters: "
                     f"{missing[:6]}{hint}")
  out = flax.core.unfreeze(params)  # fresh containers, same leaves
  for path, target in model.items():
    value = ckpt[path]
    if path == "pos_embed" and value.shape != target.shape:
      value = _resize_pos_embed(value, target.shape, model.get("cls_token"), pos_resize)
    if value.shape != target.shape:
      raise ValueError(f"backbone parameter {path}: checkpoint shape {value.shape}, "
                       f"model shape {target.shape}")
    _set(out["backbone"], path, jnp.asarray(value, target.dtype))
  return out, sorted(set(ckpt) - set(model))


def _resize_pos_embed(pos: np.ndarray, shape: tuple[int, ...], cls_token: Any,
                      mode: str) -> np.ndarray:
  """[1, P + g0*g0, D] -> [1, P + g*g, D] (bicubic on the patch rows)."""
  prefix = 0 if cls_token is None else cls_token.shape[1]
  n0, n = pos.shape[1] - prefix, shape[1] - prefix
  g0, g = int(round(n0 ** 0.5)), int(round(n ** 0.5))
  if g0 * g0 != n0 or g * g != n or pos.shape[2] != shape[2]:
    raise ValueError(f"pos_embed {pos.shape} cannot be resized to {tuple(shape)} "
                     f"with {prefix} prefix tokens")
  grid = resize_pos_grid(jnp.asarray(pos[0, prefix:]).reshape(g0, g0, -1), (g, g), mode)
  return np.concatenate([pos[:, :prefix], np.asarray(grid).reshape(1, g * g, -1)], axis=1)
