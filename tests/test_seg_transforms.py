"""The mmseg train / test pipelines in NumPy."""

import colorsys

import numpy as np
import pytest

from glare_jax.data import seg_transforms as st
from glare_jax.data.datasets import get_info

from torch_ref import F, needs_torch, torch


def test_reduce_zero_label():
  label = np.array([[0, 1, 2], [7, 255, 150]], np.uint8)
  np.testing.assert_array_equal(st.reduce_zero_label(label), [[255, 0, 1], [6, 255, 149]])
  info = get_info("cityscapes")
  np.testing.assert_array_equal(st.to_train_ids(label, info), label)


@pytest.mark.parametrize("hw,scale,expected", [
    ((1024, 1024), (1024, 1024), (1024, 1024)),
    ((1024, 1024), (1536, 1536), (1536, 1536)),
    ((375, 500), (2048, 512), (512, 683)),      # short side bound
    ((300, 2000), (2048, 512), (307, 2048)),    # long side bound
    ((1024, 2048), (1024, 512), (512, 1024)),
])
def test_rescale_size_is_mmcv(hw, scale, expected):
  assert st.rescale_size(hw, scale) == expected


@needs_torch
def test_resize_matches_torch_bilinear_and_nearest():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  t = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
  for size in [(74, 106), (20, 31), (50, 13)]:
    ref = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    out = st.resize_bilinear(image, size)
    assert out.dtype == np.uint8 and out.shape == (*size, 3)
    assert np.abs(out.astype(np.float32) - ref.numpy()).max() <= 0.5 + 1e-3
    near = F.interpolate(t[:, :1], size=size, mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(st.resize_nearest(image[..., 0], size), near)
  # A window of the resize is the same pixels as cropping the full resize.
  full = st.resize_bilinear(image, (90, 120))
  np.testing.assert_array_equal(st.resize_bilinear(image, (90, 120), window=(7, 60, 33, 120)),
                                full[7:60, 33:120])


def test_hsv_matches_colorsys_and_round_trips():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  hsv = st.rgb_to_hsv(rgb)
  for (r, g, b), (h, s, v) in zip(rgb.reshape(-1, 3)[:200], hsv.reshape(-1, 3)[:200]):
    eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    assert abs(int(h) - eh * 180) <= 0.5 + 1e-6 or abs(int(h) - eh * 180) >= 179.5 - 1e-6
    assert abs(int(s) - es * 255) <= 0.5 + 1e-6 and int(v) == round(ev * 255)
  np.testing.assert_array_equal(st.rgb_to_hsv(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]],
                                                       np.uint8)),
                                [[[0, 255, 255], [60, 255, 255], [120, 255, 255]]])
  back = st.hsv_to_rgb(hsv).astype(int)
  # 8-bit hue moves in 2-degree steps: up to 255 / 60 = 4.25 levels off (OpenCV too).
  assert np.abs(back - rgb).max() <= 5 and np.abs(back - rgb).mean() < 0.5


def test_photometric_distortion_keeps_grey_grey_and_is_seeded():
  grey = np.full((8, 8, 3), 100, np.uint8)
  pmd = st.PhotoMetricDistortion()
  outs = [pmd(grey, np.random.default_rng(s)) for s in range(20)]
  for out in outs:   # saturation / hue cannot colour a grey image
    assert out.dtype == np.uint8 and (out == out[:1, :1, :1]).all()
  assert len({int(o[0, 0, 0]) for o in outs}) > 3
  colour = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pmd(colour, np.random.default_rng(5)),
                                pmd(colour, np.random.default_rng(5)))


def test_brightness_then_contrast_follow_mmseg_convert():
  """Brightness adds a delta, contrast multiplies; both clip and truncate to uint8."""
  img = np.array([[[10, 200, 250]]], np.uint8)
  pmd = st.PhotoMetricDistortion(brightness_delta=32, contrast_range=(1.2, 1.2),
                                 saturation_range=(1.0, 1.0), hue_delta=1)
  for seed in range(30):
    rng = np.random.default_rng(seed)
    draws = np.random.default_rng(seed)
    expected = img.astype(np.float32)
    if draws.integers(2):
      expected = np.clip(expected + draws.uniform(-32, 32), 0, 255).astype(np.uint8)
      expected = expected.astype(np.float32)
    mode = draws.integers(2)
    contrast = lambda x: np.clip(x * 1.2, 0, 255).astype(np.uint8).astype(np.float32)
    if mode == 1 and draws.integers(2):
      draws.uniform(1.2, 1.2)
      expected = contrast(expected)
    if draws.integers(2) or draws.integers(2):   # saturation / hue touched: skip this seed
      continue
    if mode == 0 and draws.integers(2):
      expected = contrast(expected)
    np.testing.assert_array_equal(pmd(img, rng), expected.astype(np.uint8))


def _ok(crop, ratio=0.75):
  counts = np.bincount(crop[crop != 255], minlength=2)
  return (counts > 0).sum() > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_takes_the_first_acceptable_draw():
  label = np.zeros((100, 100), np.uint8)
  label[:, 75:] = 1            # class 1 only in the right 25 columns
  label[:10, :] = 255
  accepted = 0
  for seed in range(40):
    box = st.random_crop_box(label, 40, 0.75, np.random.default_rng(seed))
    draws = np.random.default_rng(seed)
    boxes = []
    for _ in range(11):
      y, x = int(draws.integers(0, 61)), int(draws.integers(0, 61))
      boxes.append((y, y + 40, x, x + 40))
    first = next((b for b in boxes[:10] if _ok(label[b[0]:b[1], b[2]:b[3]])), boxes[10])
    assert box == first
    accepted += _ok(label[box[0]:box[1], box[2]:box[3]])
  # One draw in ~4 is acceptable; with up to 10 re-draws nearly every crop is.
  assert accepted >= 30


def test_crop_falls_back_to_the_eleventh_draw():
  label = np.zeros((50, 60), np.uint8)     # one class: every try fails
  box = st.random_crop_box(label, 20, 0.75, np.random.default_rng(7))
  draws = np.random.default_rng(7)
  for _ in range(11):
    y, x = draws.integers(0, 31), draws.integers(0, 41)
  assert box == (y, y + 20, x, x + 20)
  # Images smaller than the crop give the whole side.
  assert st.random_crop_box(label, 64, 1.0, np.random.default_rng(0)) == (0, 50, 0, 60)


def test_train_transform_shapes_padding_and_labels():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  label = rng.integers(0, 8, (60, 80), dtype=np.uint8)
  t = st.SegTrainTransform(scale=(40, 40), reduce_zero_label=True, crop_size=64,
                           ratio_range=(1.0, 1.0), photometric=None, flip_p=0.0)
  img, lab = t(image, label, np.random.default_rng(0))
  assert img.shape == (64, 64, 3) and img.dtype == np.float32 and lab.dtype == np.uint8
  # (60, 80) -> keep ratio within (40, 40) -> (30, 40); the rest is padding.
  assert (img[30:] == 0).all() and (img[:, 40:] == 0).all() and (lab[30:] == 255).all()
  assert (lab[:, 40:] == 255).all()
  expected = st.reduce_zero_label(st.resize_nearest(label, (30, 40)))
  np.testing.assert_array_equal(lab[:30, :40], expected)
  ref = st.normalize(st.resize_bilinear(image, (30, 40)))
  np.testing.assert_allclose(img[:30, :40], ref)
  assert 0 in label and 255 in lab[:30, :40]   # label 0 became ignored


def test_train_transform_is_deterministic_and_flips():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
  label = (np.arange(90)[None, :] // 30 * np.ones((120, 1))).astype(np.uint8)
  t = st.SegTrainTransform(scale=(100, 100), reduce_zero_label=False, crop_size=48)
  a = t(image, label, np.random.default_rng(11))
  b = t(image, label, np.random.default_rng(11))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  outs = [t(image, label, np.random.default_rng(s))[1] for s in range(12)]
  assert len({o.tobytes() for o in outs}) > 6
  no_flip = st.SegTrainTransform(scale=(100, 100), reduce_zero_label=False, crop_size=48,
                                 flip_p=0.0, photometric=None)
  flip = st.SegTrainTransform(scale=(100, 100), reduce_zero_label=False, crop_size=48,
                              flip_p=1.0, photometric=None)
  f0 = no_flip(image, label, np.random.default_rng(2))
  f1 = flip(image, label, np.random.default_rng(2))
  np.testing.assert_array_equal(f1[1], f0[1][:, ::-1])
  np.testing.assert_allclose(f1[0], f0[0][:, ::-1])
  with pytest.raises(ValueError, match="label must be"):
    t(image, label[:10], np.random.default_rng(0))


def test_test_transform_keeps_ratio():
  t = st.SegTestTransform(scale=(2048, 512))
  out = t(np.zeros((375, 500, 3), np.uint8))
  assert out.shape == (512, 683, 3)
  np.testing.assert_allclose(out[0, 0], -np.array(st.MMSEG_MEAN) / np.array(st.MMSEG_STD),
                             rtol=1e-6)
