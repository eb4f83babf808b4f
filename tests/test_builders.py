"""TFDS builders: real LoveDA tiles and tiny synthetic trees, read back exactly.

Every bad input must stop `prepare` with an error naming the path before any
record is written.
"""

import os
import pathlib
import shutil
import sys

import numpy as np
from PIL import Image
import pytest

from glare_jax.data import pipeline
from glare_jax.data import prepare
from glare_jax.data.builders import LayoutError
from glare_jax.data.builders import cityscapes
from glare_jax.data.builders import common


def read_split(data_dir, dataset, split):
  """{file_name: (image [H, W, 3], label [H, W])} of a prepared split."""
  source = pipeline.open_split(dataset, data_dir, split)
  out = {}
  for i in range(len(source)):
    raw = source[i]
    out[raw["file_name"].decode()] = (common.decode_image(raw["image"]),
                                      common.decode_label(raw["label"]))
  return out


def pil(path, mode=None):
  with Image.open(path) as im:
    return np.asarray(im.convert(mode) if mode else im)


def save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def rand_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def written(data_dir, dataset):
  """Files under data_dir/dataset (the records and their metadata)."""
  folder = pathlib.Path(data_dir) / dataset
  return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------
# LoveDA on the real sample tiles.
# ----------------------------------------------------------------------------


def test_loveda_sample_round_trip_is_pixel_exact(loveda_sample, tmp_path):
  data_dir = tmp_path / "tfds"
  prepare.prepare("loveda", data_dir, loveda_sample)
  assert "tensorflow" not in sys.modules
  expected_names = {"train": {"Rural/0.png", "Rural/1.png"},
                    "validation": {"Rural/2.png"}}
  for split, names in expected_names.items():
    records = read_split(data_dir, "loveda", split)
    assert set(records) == names
    for name, (image, label) in records.items():
      domain, file = name.split("/")
      folder = loveda_sample / {"train": "Train", "validation": "Val"}[split] / domain
      np.testing.assert_array_equal(image, pil(folder / "images_png" / file))
      np.testing.assert_array_equal(label, pil(folder / "masks_png" / file))
      assert image.shape == (1024, 1024, 3) and label.dtype == np.uint8
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.open_split("loveda", data_dir, "test")

  # Idempotent: a second run writes nothing and needs no manual dir.
  before = {p: p.stat().st_mtime_ns for p in written(data_dir, "loveda")}
  prepare.prepare("loveda", data_dir, tmp_path / "gone")
  assert {p: p.stat().st_mtime_ns for p in written(data_dir, "loveda")} == before


def _copy_sample(sample, tmp_path):
  root = tmp_path / "loveda"
  shutil.copytree(sample, root)
  for p in root.rglob("*"):
    p.chmod(0o755 if p.is_dir() else 0o644)   # the shared copy is read-only
  return root


def _missing_masks(root):
  shutil.rmtree(root / "Train/Rural/masks_png")
  return "Train/Rural/masks_png is missing"


def _corrupt_png(root):
  path = root / "Train/Rural/images_png/1.png"
  path.write_bytes(path.read_bytes()[:50_000])     # truncated
  return "Train/Rural/images_png/1.png: unreadable or corrupt"


def _size_mismatch(root):
  save(root / "Val/Rural/masks_png/2.png", np.ones((512, 1024), np.uint8))
  return "size mismatch: image .*Val/Rural/images_png/2.png is 1024x1024 but mask"


def _image_without_mask(root):
  (root / "Train/Rural/masks_png/0.png").unlink()
  return "image .*Train/Rural/images_png/0.png has no mask"


def _labels_out_of_range(root):
  save(root / "Val/Rural/masks_png/2.png", np.full((1024, 1024), 9, np.uint8))
  return r"Val/Rural/masks_png/2.png holds label values \[9\] outside"


def _rgb_mask(root):
  save(root / "Val/Rural/masks_png/2.png", np.ones((1024, 1024, 3), np.uint8))
  return "masks_png/2.png: a mask must be a single-channel 8-bit PNG"


def _no_domains(root):
  shutil.rmtree(root / "Val/Rural")
  return "Val holds neither Urban/ nor Rural/"


@pytest.mark.parametrize("breaker", [
    _missing_masks, _corrupt_png, _size_mismatch, _image_without_mask,
    _labels_out_of_range, _rgb_mask, _no_domains])
def test_loveda_bad_input_fails_before_writing(loveda_sample, tmp_path, breaker):
  root = _copy_sample(loveda_sample, tmp_path)
  message = breaker(root)
  data_dir = tmp_path / "tfds"
  with pytest.raises(LayoutError, match=message):
    prepare.prepare("loveda", data_dir, root)
  assert written(data_dir, "loveda") == []


def test_missing_or_empty_manual_dir(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(LayoutError, match=f"manual dir {tmp_path / 'nope'} does not exist"):
    prepare.prepare("loveda", data_dir, tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(LayoutError, match=f"manual dir {tmp_path / 'empty'} is empty"):
    prepare.prepare("ade20k", data_dir, tmp_path / "empty")
  with pytest.raises(ValueError, match="needs --manual_dir"):
    prepare.prepare("cityscapes", data_dir, None)
  assert not data_dir.exists() or not any(data_dir.rglob("*.array_record*"))


def test_loveda_test_split_without_masks(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "loveda"
  for split in ("Train", "Val"):
    save(root / split / "Urban/images_png/5.png", rand_image(rng, 24, 20))
    save(root / split / "Urban/masks_png/5.png",
         rng.integers(0, 8, (24, 20), dtype=np.uint8))
  save(root / "Test/Rural/images_png/9.png", rand_image(rng, 16, 16))
  prepare.prepare("loveda", tmp_path / "tfds", root)
  test = read_split(tmp_path / "tfds", "loveda", "test")
  image, label = test["Rural/9.png"]
  np.testing.assert_array_equal(image, pil(root / "Test/Rural/images_png/9.png"))
  np.testing.assert_array_equal(label, np.zeros((16, 16), np.uint8))   # no-data


# ----------------------------------------------------------------------------
# ADE20k, Cityscapes, Pascal Context on synthetic trees.
# ----------------------------------------------------------------------------


def test_ade20k_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "manual" / "ADEChallengeData2016"
  files = {"training": ["ADE_train_00000001", "ADE_train_00000002"],
           "validation": ["ADE_val_00000001"]}
  sizes = iter([(30, 40), (25, 25), (18, 33)])
  for folder, stems in files.items():
    for stem in stems:
      h, w = next(sizes)
      save(root / "images" / folder / f"{stem}.jpg", rand_image(rng, h, w), quality=90)
      save(root / "annotations" / folder / f"{stem}.png",
           rng.integers(0, 151, (h, w), dtype=np.uint8))
  # A greyscale JPEG is stored as RGB.
  grey = root / "images/training/ADE_train_00000002.jpg"
  save(grey, rng.integers(0, 256, (25, 25), dtype=np.uint8))

  prepare.prepare("ade20k", tmp_path / "tfds", tmp_path / "manual")
  for split, folder in (("train", "training"), ("validation", "validation")):
    records = read_split(tmp_path / "tfds", "ade20k", split)
    assert set(records) == {f"{s}.jpg" for s in files[folder]}
    for name, (image, label) in records.items():
      stem = name[:-4]
      np.testing.assert_array_equal(
          image, pil(root / "images" / folder / name, "RGB"))
      np.testing.assert_array_equal(
          label, pil(root / "annotations" / folder / f"{stem}.png"))
  assert records["ADE_val_00000001.jpg"][0].shape == (18, 33, 3)


def test_ade20k_mask_without_image(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / "ADEChallengeData2016"
  for folder in ("training", "validation"):
    save(root / "images" / folder / "a.jpg", rand_image(rng, 8, 8))
    save(root / "annotations" / folder / "a.png", np.zeros((8, 8), np.uint8))
  save(root / "annotations/validation/b.png", np.zeros((8, 8), np.uint8))
  with pytest.raises(LayoutError, match="mask .*validation/b.png has no image"):
    prepare.prepare("ade20k", tmp_path / "tfds", root)   # the folder itself works too


def test_cityscapes_train_ids_and_mapped_label_ids(tmp_path):
  rng = np.random.default_rng(3)
  root = tmp_path / "cityscapes"
  # road, car, unlabeled / bicycle, (not evaluated), person
  label_ids = np.array([[7, 26, 0], [33, 5, 24]], np.uint8)
  train_ids = np.array([[0, 13, 255], [18, 255, 11]], np.uint8)
  images = {}
  for split, city, stem in (("train", "aachen", "aachen_000000_000019"),
                            ("train", "bremen", "bremen_000001_000019"),
                            ("val", "lindau", "lindau_000000_000019")):
    images[stem] = rand_image(rng, 2, 3)
    save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", images[stem])
    gt = root / "gtFine" / split / city
    save(gt / f"{stem}_gtFine_color.png", rand_image(rng, 2, 3))   # ignored
    if stem.startswith("aachen"):
      save(gt / f"{stem}_gtFine_labelTrainIds.png", train_ids)
    else:
      save(gt / f"{stem}_gtFine_labelIds.png", label_ids)
  prepare.prepare("cityscapes", tmp_path / "tfds", root)
  train = read_split(tmp_path / "tfds", "cityscapes", "train")
  val = read_split(tmp_path / "tfds", "cityscapes", "validation")
  assert set(train) == {"aachen/aachen_000000_000019_leftImg8bit.png",
                        "bremen/bremen_000001_000019_leftImg8bit.png"}
  for name, (image, label) in {**train, **val}.items():
    stem = name.split("/")[1][:-len("_leftImg8bit.png")]
    np.testing.assert_array_equal(image, images[stem])
    np.testing.assert_array_equal(label, train_ids)
  np.testing.assert_array_equal(cityscapes.label_id_to_train_id()[label_ids], train_ids)


def test_cityscapes_image_without_mask(tmp_path):
  root = tmp_path / "cityscapes"
  for split in ("train", "val"):
    save(root / "leftImg8bit" / split / "ulm" / "ulm_000000_000019_leftImg8bit.png",
         np.zeros((2, 2, 3), np.uint8))
    (root / "gtFine" / split / "ulm").mkdir(parents=True)
  with pytest.raises(LayoutError, match="ulm_000000_000019_leftImg8bit.png has no mask"):
    prepare.prepare("cityscapes", tmp_path / "tfds", root)


def _pascal_tree(root, rng, mask_mode="L"):
  voc = root / "VOCdevkit" / "VOC2010"
  ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
  for split, names in ids.items():
    for name in names:
      save(voc / "JPEGImages" / f"{name}.jpg", rand_image(rng, 12, 17))
      mask = Image.fromarray(rng.integers(0, 60, (12, 17), dtype=np.uint8))
      if mask_mode == "P":
        mask = mask.convert("P")
        mask.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
      (voc / "SegmentationClassContext").mkdir(parents=True, exist_ok=True)
      mask.save(voc / "SegmentationClassContext" / f"{name}.png")
    lists = voc / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
  save(voc / "JPEGImages" / "2009_000001.jpg", rand_image(rng, 5, 5))   # not listed
  return voc, ids


def test_pascal_context_round_trip_with_palette_masks(tmp_path):
  voc, ids = _pascal_tree(tmp_path / "manual", np.random.default_rng(4), "P")
  prepare.prepare("pascal_context", tmp_path / "tfds", tmp_path / "manual")
  for split, list_name in (("train", "train"), ("validation", "val")):
    records = read_split(tmp_path / "tfds", "pascal_context", split)
    assert set(records) == {f"{i}.jpg" for i in ids[list_name]}
    for name, (image, label) in records.items():
      np.testing.assert_array_equal(image, pil(voc / "JPEGImages" / name))
      indices = pil(voc / "SegmentationClassContext" / name.replace(".jpg", ".png"))
      np.testing.assert_array_equal(label, indices)     # palette indices, not colours
      assert label.max() < 60


def test_pascal_context_listed_image_without_mask(tmp_path):
  voc, _ = _pascal_tree(tmp_path / "manual", np.random.default_rng(5))
  os.remove(voc / "SegmentationClassContext" / "2008_000007.png")
  with pytest.raises(LayoutError, match="2008_000007.jpg has no mask"):
    prepare.prepare("pascal_context", tmp_path / "tfds", voc)
  assert written(tmp_path / "tfds", "pascal_context") == []
