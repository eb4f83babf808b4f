"""Inference (whole / slide, resizing back to the label size, prediction PNGs) and an
end-to-end check: a tiny Segmenter over-fits two real LoveDA tiles."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from glare_jax.data import seg_transforms as st
from glare_jax.data.datasets import get_info
from glare_jax.evaluation import inference
from glare_jax.models.segmenter import Segmenter
from glare_jax.models.vit import ViT, size_kwargs
from glare_jax.objectives.segmentation import seg_cross_entropy
from glare_jax.train.seg_schedule import poly_warmup_schedule

from torch_ref import F, needs_torch, torch

W = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)


def pixelwise(v, images):       # a model without context: logits = x @ W at full resolution
  return images @ v["w"]


def pooled(v, images):          # stride 4: logits = avg-pool(x, 4) @ W
  b, h, w, _ = images.shape
  x = images[:, :h // 4 * 4, :w // 4 * 4].reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4))
  return x @ v["w"]


def image(h, w, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w,expected", [
    (512, 512, [(0, 512, 0, 512)]),
    (300, 200, [(0, 300, 0, 200)]),
    (512, 1024, [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]),
])
def test_slide_windows_follow_mmseg(h, w, expected):
  assert inference.slide_windows(h, w, 512, 341) == expected


def test_slide_windows_cover_every_pixel():
  boxes = inference.slide_windows(1000, 700, 512, 341)
  assert len(boxes) == 3 * 2 and all(y1 - y0 == 512 and x1 - x0 == 512 for y0, y1, x0, x1 in boxes)
  count = np.zeros((1000, 700), int)
  for y0, y1, x0, x1 in boxes:
    count[y0:y1, x0:x1] += 1
  # rows 0-512, 341-853, 488-1000 and columns 0-512, 188-700: up to 3 x 2 overlaps
  assert count.min() == 1 and count.max() == 6


def test_slide_equals_whole_for_a_pixelwise_model():
  """Without context, every window agrees with the whole image; any error in the
  per-pixel window counts would show up in the overlaps."""
  img = image(150, 130)
  t = st.SegTestTransform(scale=(150, 150))
  whole = inference.Predictor(pixelwise, {"w": W}, t, mode="whole")
  slide = inference.Predictor(pixelwise, {"w": W}, t, mode="slide", crop_size=64,
                              stride=43, window_batch=4)
  a, b = whole.logits(img), slide.logits(img)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(a, st.normalize(img) @ W, rtol=1e-5, atol=1e-4)
  assert slide.num_compiled == 1        # every window batch has one shape


@needs_torch
def test_whole_mode_resizes_logits_like_mmseg():
  """Resize to the test scale, model at stride 4, logits -> resized size -> label size."""
  img = image(60, 100)
  pred = inference.Predictor(pooled, {"w": W}, st.SegTestTransform(scale=(128, 72)))
  out = pred.logits(img)
  assert out.shape == (60, 100, 4)
  x = st.normalize(st.resize_bilinear(img, (72, 120)))          # keep ratio: short side 72
  feats = torch.from_numpy(np.asarray(pooled({"w": W}, x[None]))).permute(0, 3, 1, 2)
  ref = F.interpolate(feats, size=(72, 120), mode="bilinear", align_corners=False)
  ref = F.interpolate(ref, size=(60, 100), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(out, ref[0].permute(1, 2, 0).numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(pred.predict(img), np.argmax(np.asarray(out), -1))
  pred.logits(image(60, 100, seed=2))
  assert pred.num_compiled == 1
  pred.logits(image(50, 100))
  assert pred.num_compiled == 2


def test_evaluate_and_save_predictions(tmp_path):
  info = get_info("loveda")     # reduce_zero_label: train id k is stored as k + 1
  w = np.zeros((3, 7), np.float32)
  w[0, 2] = 1.0                 # red channel votes for train id 2
  w[2, 5] = 1.0                 # blue channel for train id 5
  img = np.zeros((20, 30, 3), np.uint8)
  img[:, :15, 0] = 255
  img[:, 15:, 2] = 255
  label = np.full((20, 30), 3, np.uint8)          # stored id 3 = train id 2
  label[:, 15:] = 6                               # stored id 6 = train id 5
  label[:5] = 0                                   # no-data, ignored
  label[5:10, :15] = 4                            # train id 3: wrongly predicted as 2
  pred = inference.Predictor(pixelwise, {"w": w}, st.SegTestTransform(scale=(30, 20)))
  cm = inference.evaluate(pred, [dict(image=img, label=label, name="tile_0")], info,
                          save_dir=tmp_path)
  expected = np.zeros((7, 7), np.int64)
  expected[2, 2] = 10 * 15
  expected[3, 2] = 5 * 15
  expected[5, 5] = 15 * 15
  np.testing.assert_array_equal(cm.total, expected)
  saved = np.asarray(Image.open(tmp_path / "tile_0.png"))
  assert saved.dtype == np.uint8 and set(np.unique(saved)) == {3, 6}
  np.testing.assert_array_equal(saved[:, :15], 3)
  with pytest.raises(ValueError, match="label"):
    inference.evaluate(pred, [dict(image=img, label=label[:10])], info)


def _load_tiles(root, size):
  images, labels = [], []
  for i in (0, 1):
    img = Image.open(root / "Train" / "Rural" / "images_png" / f"{i}.png").convert("RGB")
    lab = Image.open(root / "Train" / "Rural" / "masks_png" / f"{i}.png")
    images.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
    labels.append(np.asarray(lab.resize((size, size), Image.NEAREST)))
  return images, labels


@pytest.mark.slow
def test_tiny_segmenter_overfits_two_loveda_tiles(loveda_sample):
  size, steps = 128, 300
  info = get_info("loveda")
  images, labels = _load_tiles(loveda_sample, size)
  x = jnp.asarray(np.stack([st.normalize(i) for i in images]))          # [2, 128, 128, 3]
  y = jnp.asarray(np.stack([st.reduce_zero_label(l) for l in labels]))  # [2, 128, 128]

  vit = ViT(**size_kwargs("tiny_test"), patch_size=8, pos_grid=size // 8, pos_resize="size",
            adapter_mode="none")
  model = Segmenter(vit, info.num_classes, feature_blocks=(0, 0, 1, 1), neck_dim=32,
                    head_dim=32, dropout=0.0)
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x[:1])
  tx = optax.adam(poly_warmup_schedule(1e-2, steps, warmup_steps=20, warmup_ratio=0.1))

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return seg_cross_entropy(logits, y), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  for _ in range(steps):
    params, stats, opt_state, loss = step(params, stats, opt_state)

  predictor = inference.Predictor(lambda v, im: model.apply(v, im),
                                  {"params": params, "batch_stats": stats},
                                  st.SegTestTransform(scale=(size, size)))
  records = [dict(image=i, label=l) for i, l in zip(images, labels)]
  m = inference.evaluate(predictor, records, info).metrics()
  # A constant 'agricultural' prediction scores aAcc 67 and mIoU 11.
  assert float(loss) < 0.2
  assert m["aAcc"] > 92 and m["mIoU"] > 65, m
