"""Semantic FPN: torch parity of the neck + head, shapes of both variants, SyncBN
semantics under a sharded batch, backbone loading."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.configs.seg_common import SEG_NO_DECAY
from glare_jax.models import fpn
from glare_jax.models.segmenter import Segmenter
from glare_jax.models.vit import ViT, size_kwargs

from torch_ref import F, needs_torch, torch

KEY = jax.random.key(0, impl="unsafe_rbg")  # cheap to compile on CPU


def tiny_vit(**kw):
  kw = dict(size_kwargs("tiny_test"), pos_grid=4, pos_resize="size", adapter_mode="none") | kw
  return ViT(**kw)


@pytest.mark.parametrize("hw,size", [((5, 7), (20, 28)), ((32, 32), (4, 4)), ((16, 21), (8, 10)),
                                     ((6, 6), (13, 3))])
@needs_torch
def test_resize_matches_torch(hw, size):
  x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  bil = F.interpolate(t, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
  near = F.interpolate(t, size=size, mode="nearest").permute(0, 2, 3, 1)
  np.testing.assert_allclose(fpn.resize_bilinear(jnp.asarray(x), size), bil.numpy(), atol=1e-5)
  np.testing.assert_array_equal(fpn.resize_nearest(jnp.asarray(x), size), near.numpy())


def _torch_conv(x, p, padding=0):
  w = torch.from_numpy(np.array(p["kernel"])).permute(3, 2, 0, 1)  # HWIO -> OIHW
  b = torch.from_numpy(np.array(p["bias"])) if "bias" in p else None
  return F.conv2d(x, w, b, padding=padding)


def torch_fpn(feats, neck, head, stats, strides):
  """mmseg's FPN neck + FPNHead in eval mode, written against the flax parameters."""
  lat = [_torch_conv(f, neck[f"lateral_{i}"]) for i, f in enumerate(feats)]
  for i in range(len(lat) - 1, 0, -1):
    lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
  outs = [_torch_conv(x, neck[f"output_{i}"], padding=1) for i, x in enumerate(lat)]
  total = None
  for i, x in enumerate(outs):
    for k in range(max(1, int(np.log2(strides[i]) - np.log2(strides[0])))):
      p, s = head[f"scale_{i}"], stats[f"scale_{i}"][f"bn_{k}"]
      x = _torch_conv(x, p[f"conv_{k}"], padding=1)
      t = lambda a: torch.from_numpy(np.array(a))
      x = F.batch_norm(x, t(s["mean"]), t(s["var"]), t(p[f"bn_{k}"]["scale"]),
                       t(p[f"bn_{k}"]["bias"]), training=False, eps=1e-5)
      x = F.relu(x)
      if strides[i] != strides[0]:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    total = x if total is None else total + F.interpolate(
        x, size=total.shape[2:], mode="bilinear", align_corners=False)
  return _torch_conv(total, head["classifier"])


@pytest.mark.parametrize("sizes", [[(4, 5)] * 4, [(16, 20), (8, 10), (4, 5), (2, 2)]],
                         ids=["all_stride16", "pyramid"])
@needs_torch
def test_neck_and_head_match_mmseg_in_torch(sizes):
  rng = np.random.default_rng(1)
  feats = [jnp.asarray(rng.normal(size=(2, h, w, 24)).astype(np.float32)) for h, w in sizes]
  neck, head = fpn.FPNNeck(16), fpn.FPNHead(5, channels=8)
  nv = jax.jit(neck.init)(KEY, feats)
  hv = jax.eval_shape(head.init, KEY, jax.eval_shape(neck.apply, nv, feats))
  # Random weights, BN statistics and affine parameters (positive variances).
  hv = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), hv)
  logits = jax.jit(lambda nv, hv, f: head.apply(hv, neck.apply(nv, f)))(nv, hv, feats)
  assert logits.shape == (2, *sizes[0], 5)

  tfeats = [torch.from_numpy(np.array(f)).permute(0, 3, 1, 2) for f in feats]
  ref = torch_fpn(tfeats, nv["params"], hv["params"], hv["batch_stats"], (4, 8, 16, 32))
  np.testing.assert_allclose(logits, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_segmenter_taps_block_outputs_without_prefix_or_final_norm():
  vit = tiny_vit()
  model = Segmenter(vit, 7, feature_blocks=(0, 0, 1, 1), neck_dim=16, head_dim=8)
  images = jax.random.normal(jax.random.key(1), (2, 64, 48, 3))
  v = jax.jit(model.init)(KEY, images)
  @jax.jit
  def both(v, images):
    _, aux = vit.apply({"params": v["params"]["backbone"]}, images)
    feats = [aux["blocks"][i][:, 2:].reshape(2, 4, 3, 64) for i in (0, 0, 1, 1)]
    neck = fpn.FPNNeck(16).apply({"params": v["params"]["neck"]}, feats)
    ref = fpn.FPNHead(7, 8).apply({"params": v["params"]["head"],
                                   "batch_stats": v["batch_stats"]["head"]}, neck)
    return model.apply(v, images), ref

  logits, ref = both(v, images)
  assert logits.shape == (2, 4, 3, 7)   # stride 16
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_multiscale_variant_shapes_and_padding():
  model = Segmenter(tiny_vit(), 3, feature_blocks=(0, 1, 1, 1), multiscale=True,
                    neck_dim=16, head_dim=8)
  # 70 x 90 is padded to 80 x 96 (grid 5 x 6); stride 4 -> 20 x 24; level 3 pools 5x6 -> 2x3.
  v = jax.eval_shape(model.init, KEY, jnp.zeros((1, 70, 90, 3)))
  logits, updates = jax.eval_shape(
      lambda v: model.apply(v, jnp.ones((2, 70, 90, 3)), train=True, rngs={"dropout": KEY},
                            mutable=["batch_stats"]), v)
  assert logits.shape == (2, 20, 24, 3)
  assert jax.tree.map(lambda s: s.shape, updates["batch_stats"]) == jax.tree.map(
      lambda s: s.shape, v["batch_stats"])
  assert v["params"]["multiscale"]["up4_0"]["kernel"].shape == (2, 2, 64, 64)
  with pytest.raises(ValueError, match="feature_blocks"):
    jax.eval_shape(Segmenter(tiny_vit(), 3, feature_blocks=(0, 1, 2, 3)).init, KEY,
                   jnp.zeros((1, 32, 32, 3)))


def test_batch_norm_uses_global_batch_statistics_when_sharded():
  """Under jit over a batch sharded on 8 devices the statistics are SyncBN's."""
  head = fpn.ScaleHead(4, num_convs=1, upsample=False)
  x = np.random.default_rng(2).normal(size=(8, 3, 3, 2)).astype(np.float32)
  x *= np.arange(1, 9, dtype=np.float32)[:, None, None, None]   # every shard differs
  v = head.init(KEY, jnp.asarray(x))
  mesh = jax.make_mesh((8,), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  step = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"])[1])
  stats = step(v, xs)["batch_stats"]["bn_0"]
  conv = jax.lax.conv_general_dilated(x, v["params"]["conv_0"]["kernel"], (1, 1), [(1, 1)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = np.asarray(conv).reshape(-1, 4)
  # momentum 0.9 from the initial (0, 1): new = 0.9 * old + 0.1 * batch statistic.
  np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var(0), rtol=1e-4)


def test_weight_decay_rules_follow_mmseg_names():
  model = Segmenter(tiny_vit(use_mask_token=False), 3, feature_blocks=(0, 0, 1, 1),
                    multiscale=True, neck_dim=8, head_dim=8)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)]
  no_decay = {p for p in paths if any(re.fullmatch(r, p) for r in SEG_NO_DECAY)}
  assert {"backbone/pos_embed", "backbone/cls_token", "backbone/norm/scale",
          "backbone/block_0/norm1/bias"} <= no_decay
  assert not any("/bn_" in p or "up4_bn" in p for p in no_decay)   # BN decays, as in mmseg
  assert "head/classifier/kernel" not in no_decay
