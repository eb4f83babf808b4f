"""Semantic FPN for the segmentation evaluation (the UDI/FLSL mmsegmentation protocol).

    features  blocks (2, 5, 8, 11) of the ViT, prefix tokens dropped   4 x [B, h, w, D]
    [MultiScale]  optional XCiT pyramid: 4x / 2x / 1x / 0.5x            (strides 4/8/16/32)
    FPNNeck   1x1 lateral D -> 256, top-down add, 3x3 output convs      4 x [B, h_i, w_i, 256]
    FPNHead   per level 1/1/2/3 x (3x3 conv 128 + BN + ReLU [+ 2x up]),
              summed at level 0's size, dropout 0.1, 1x1 classifier     [B, h_0, w_0, C]

Resizes follow PyTorch's `F.interpolate` (bilinear with align_corners=False and
no antialiasing; nearest = floor(dst * in / out)), which is what mmseg calls.

What mmseg's FPNHead does when every level is at stride 16 (the default
protocol): it still believes the nominal strides 4/8/16/32, so level i goes
through max(1, i) conv stages, each but level 0's followed by a 2x bilinear
upsample. Level 1 leaves the head at 2x, level 2 at 4x and level 3 at 8x the
feature size, and each is then bilinearly *down*-sampled (no antialiasing) back
to level 0's size (the feature size) before the sum. We reproduce exactly that.

BatchNorm: under `jax.jit` over a batch sharded across devices the batch
statistics are reduced over the whole global batch, which is what mmseg's SyncBN
computes. Defaults match torch's BN (momentum 0.1 there = 0.9 here, eps 1e-5).
Flax keeps the biased batch variance in the running average where torch keeps
the unbiased one; with B * h * w >= 16 * 32 * 32 samples the difference is below
1e-4 relative.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# mmcv's initialisations: FPN convs Xavier-uniform; ConvModule convs (followed by
# BN + ReLU) Kaiming-normal fan_out; the classifier N(0, 0.01); biases zero.
xavier_uniform = nn.initializers.xavier_uniform()
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nn.initializers.normal(0.01)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D linear resize (half-pixel centres, edges clamped)."""
  # Source positions in float32 with torch's rounding: scale * (dst + 0.5) - 0.5.
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                   - np.float32(0.5), np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """[B, h, w, C] -> [B, H, W, C] like torch bilinear, align_corners=False, no antialiasing.

  Two contractions with constant interpolation matrices (what jax.image.resize
  does too, with a larger graph); exact in float32 (precision 'highest').
  """
  (h, w), (hh, ww) = x.shape[1:3], (int(size[0]), int(size[1]))
  if h != hh:
    x = jnp.einsum("Hh,bhwc->bHwc", _bilinear_matrix(h, hh).astype(x.dtype), x,
                   precision="highest")
  if w != ww:
    x = jnp.einsum("Ww,bhwc->bhWc", _bilinear_matrix(w, ww).astype(x.dtype), x,
                   precision="highest")
  return x


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
  """[B, h, w, C] -> [B, H, W, C] like torch 'nearest' to a size: src = floor(dst * in / out)."""
  (h, w), (hh, ww) = x.shape[1:3], size
  rows = (np.arange(hh) * h) // hh
  cols = (np.arange(ww) * w) // ww
  return x[:, rows][:, :, cols]


class MultiScale(nn.Module):
  """XCiT's pyramid for patch 16: level 0 deconv 2x, BN, GELU, deconv 2x (stride 4);
  level 1 deconv 2x (stride 8); level 2 identity; level 3 max-pool 2x (stride 32).

  A 2x2 / stride 2 transposed convolution turns each feature into a 2x2 block,
  so [B, h, w, D] -> [B, 2h, 2w, D]. Max-pooling floors odd sizes like torch.
  """
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[Array], train: bool = False) -> list[Array]:
    if len(feats) != 4:
      raise ValueError(f"MultiScale needs 4 feature maps, got {len(feats)}")
    d = feats[0].shape[-1]
    # PyTorch's default ConvTranspose2d init: uniform with bound 1 / sqrt(4 D).
    init = nn.initializers.variance_scaling(1 / 12, "fan_in", "uniform")
    deconv = lambda name: nn.ConvTranspose(d, (2, 2), strides=(2, 2), padding="VALID",
                                           kernel_init=init, dtype=self.dtype, name=name)
    x0 = deconv("up4_0")(feats[0])
    x0 = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                      epsilon=self.bn_eps, use_fast_variance=False, name="up4_bn")(x0)
    x0 = deconv("up4_1")(nn.gelu(x0, approximate=False))
    x1 = deconv("up2")(feats[1])
    x3 = nn.max_pool(feats[3], (2, 2), strides=(2, 2), padding="VALID")
    return [x0, x1, feats[2], x3]


class FPNNeck(nn.Module):
  """mmseg FPN without norms: laterals, top-down nearest-upsample-and-add, 3x3 outputs."""
  out_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[Array]) -> list[Array]:  # n x [B, h_i, w_i, D]
    lat = [nn.Conv(self.out_dim, (1, 1), kernel_init=xavier_uniform, dtype=self.dtype,
                   name=f"lateral_{i}")(f) for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):  # coarse to fine; lat[i] already holds the levels above
      lat[i - 1] = lat[i - 1] + resize_nearest(lat[i], lat[i - 1].shape[1:3])
    return [nn.Conv(self.out_dim, (3, 3), padding=1, kernel_init=xavier_uniform,
                    dtype=self.dtype, name=f"output_{i}")(x) for i, x in enumerate(lat)]


class ScaleHead(nn.Module):
  """`num_convs` x (3x3 conv without bias, BN, ReLU [, 2x bilinear upsample])."""
  channels: int
  num_convs: int
  upsample: bool
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for k in range(self.num_convs):
      x = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False,
                  kernel_init=kaiming_fan_out, dtype=self.dtype, name=f"conv_{k}")(x)
      # Named 'bn' as in mmcv's ConvModule: mmseg's no-decay key 'norm' misses it.
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_eps, use_fast_variance=False, name=f"bn_{k}")(x)
      x = nn.relu(x)
      if self.upsample:
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
    return x


class FPNHead(nn.Module):
  """mmseg FPNHead: level i gets max(1, log2(s_i / s_0)) stages; all summed at level 0's size.

  Returns logits [B, h_0, w_0, num_classes] in float32.
  """
  num_classes: int
  channels: int = 128
  feature_strides: tuple[int, ...] = (4, 8, 16, 32)
  dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[Array], train: bool = False) -> Array:
    strides = self.feature_strides
    if len(feats) != len(strides) or min(strides) != strides[0]:
      raise ValueError(f"FPNHead: {len(feats)} features for strides {strides} "
                       "(one stride per feature, the first one the smallest)")
    out = None
    for i, (x, s) in enumerate(zip(feats, strides)):
      num_convs = max(1, int(math.log2(s) - math.log2(strides[0])))
      x = ScaleHead(self.channels, num_convs, upsample=s != strides[0],
                    bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                    name=f"scale_{i}")(x, train)
      out = x if out is None else out + resize_bilinear(x, out.shape[1:3])
    # Dropout2d: whole channels are dropped per sample.
    out = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(out, deterministic=not train)
    logits = nn.Conv(self.num_classes, (1, 1), kernel_init=classifier_init, dtype=self.dtype,
                     name="classifier")(out)
    return logits.astype(jnp.float32)
