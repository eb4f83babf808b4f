"""The folder dataset (glare_jax/data/builders/folder.py): generated folders of mixed
formats and sizes round-trip to the pixels an independent NumPy reading expects; every
bad file is listed before anything is written; masks with and without reduce_zero_label."""

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glare_jax.data import builders
from glare_jax.data import codec
from glare_jax.data import datasets
from glare_jax.data import pipeline
from glare_jax.data.builders import folder
from glare_jax.data.builders.common import LayoutError
from glare_jax.data.seg_transforms import reduce_zero_label as reduce_zero

REPO = pathlib.Path(__file__).resolve().parents[1]
_RNG = np.random.default_rng(0)


def pixels(h, w, c=3):
  return _RNG.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def save(path: pathlib.Path, array: np.ndarray, **kwargs) -> np.ndarray:
  """Writes `array` (mode from its shape) to `path`; returns it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return array


def exif_rotated_jpeg(path: pathlib.Path, raw: np.ndarray, orientation: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(raw).save(path, quality=95, exif=exif.tobytes())


def records(data_dir, name, split="train") -> dict[str, dict]:
  source = pipeline.open_split(f"folder/{name}", data_dir, split)
  out = {}
  for r in source:
    key = r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]
    out[key] = {"image": codec.decode_image(r["image"]), "label": codec.decode_label(r["label"])}
  return out


def prepare(tmp_path, images, name="t", **kwargs) -> pathlib.Path:
  data_dir = tmp_path / "tfds"
  folder.prepare(name, data_dir, folder.Options(images=images, num_threads=2, **kwargs))
  return data_dir


def test_mixed_formats_nested_folders_round_trip(tmp_path):
  root = tmp_path / "images"
  want = {}
  want["a/rgb.png"] = save(root / "a/rgb.png", pixels(40, 56))
  want["a/b/c/deep.bmp"] = save(root / "a/b/c/deep.bmp", pixels(48, 40))
  want["a/b/lossless.webp"] = save(root / "a/b/lossless.webp", pixels(36, 44), lossless=True)
  want["tiff/t.tif"] = save(root / "tiff/t.tif", pixels(33, 35))
  grey = save(root / "grey.png", pixels(40, 40, 0))
  want["grey.png"] = np.repeat(grey[..., None], 3, axis=2)
  palette = pixels(16, 3, 0).reshape(16 * 3)
  index = _RNG.integers(0, 16, (38, 42), dtype=np.uint8)
  p = Image.fromarray(index, mode="P")
  p.putpalette(palette.tolist())
  p.save(root / "palette.png")
  want["palette.png"] = palette.reshape(16, 3)[index]
  opaque = np.concatenate([pixels(34, 34), np.full((34, 34, 1), 255, np.uint8)], axis=2)
  save(root / "opaque_alpha.png", opaque)
  want["opaque_alpha.png"] = opaque[..., :3]
  # EXIF orientation 6: the stored pixels turn 90 degrees clockwise to display.
  raw = pixels(32, 48)
  exif_rotated_jpeg(root / "cam/rot6.jpg", raw, 6)
  with Image.open(root / "cam/rot6.jpg") as im:
    decoded = np.asarray(im.convert("RGB"))      # the JPEG's own (lossy) pixels
  want["cam/rot6.jpg"] = np.rot90(decoded, k=-1)
  exif_rotated_jpeg(root / "cam/rot3.jpeg", raw, 3)
  with Image.open(root / "cam/rot3.jpeg") as im:
    want["cam/rot3.jpeg"] = np.asarray(im.convert("RGB"))[::-1, ::-1]
  (root / "notes.txt").write_text("not an image")
  save(root / ".hidden/skip.png", pixels(40, 40))
  save(root / "._mac_fork.png", pixels(40, 40))

  data_dir = prepare(tmp_path, root, min_size=32)
  got = records(data_dir, "t")
  assert sorted(got) == sorted(want)
  for key, image in want.items():
    np.testing.assert_array_equal(got[key]["image"], image, err_msg=key)
    assert got[key]["label"].shape == image.shape[:2] and not got[key]["label"].any()
  # no val/ folder and no --val_fraction: no validation split
  assert list(builders.get_builder("folder/t", data_dir).info.splits) == ["train"]


def test_small_images_refused_or_upsampled(tmp_path):
  root = tmp_path / "images"
  small = save(root / "small.png", pixels(40, 60))
  save(root / "big.png", pixels(224, 230))
  with pytest.raises(LayoutError) as e:
    prepare(tmp_path, root)
  msg = str(e.value)
  assert "1 problem" in msg and str(root / "small.png") in msg and "60x40" in msg
  assert "--min_size=224" in msg
  assert not (tmp_path / "tfds").exists()

  masks = tmp_path / "masks"
  ids = save(masks / "small.png", _RNG.integers(0, 3, (40, 60), dtype=np.uint8))
  save(masks / "big.png", np.zeros((224, 230), np.uint8))
  data_dir = prepare(tmp_path, root, masks=masks, classes=("a", "b", "c"), min_size=64)
  got = records(data_dir, "t")
  assert got["small.png"]["image"].shape == (64, 96, 3)            # 40 -> 64, aspect kept
  assert got["big.png"]["image"].shape == (224, 230, 3)
  # nearest: output pixel (y, x) reads source (floor((y + .5) * 40 / 64), ...)
  ys = np.floor((np.arange(64) + 0.5) * 40 / 64).astype(int)
  xs = np.floor((np.arange(96) + 0.5) * 60 / 96).astype(int)
  np.testing.assert_array_equal(got["small.png"]["label"], ids[ys][:, xs])
  assert np.abs(got["small.png"]["image"].astype(int).mean() - small.mean()) < 3


def _bad_folder(root: pathlib.Path, masks: pathlib.Path) -> dict[str, str]:
  """A folder with one fault per file: {path: what its error must say}."""
  expect = {}
  for rel in ("ok/1.png", "ok/2.jpg"):
    save(root / rel, pixels(64, 64))
    save((masks / rel).with_suffix(".png"), np.ones((64, 64), np.uint8))
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
  expect["corrupt.png"] = "unreadable or truncated"
  buffer = io.BytesIO()
  Image.fromarray(pixels(64, 64)).save(buffer, format="JPEG")
  (root / "cut/truncated.jpg").parent.mkdir(parents=True)
  (root / "cut/truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  expect["cut/truncated.jpg"] = "unreadable or truncated"
  save(root / "deep16.png", (pixels(64, 64, 0).astype(np.uint16) * 200))
  expect["deep16.png"] = "16-bit image"
  alpha = np.concatenate([pixels(64, 64), pixels(64, 64, 1)], axis=2)
  save(root / "alpha.png", alpha)
  expect["alpha.png"] = "alpha channel carries data"
  see_through = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (64, 16)), mode="P")
  see_through.putpalette(pixels(4, 3, 0).ravel().tolist())
  see_through.save(root / "palette_alpha.png", transparency=0)
  expect["palette_alpha.png"] = "alpha channel carries data (25.0% of the pixels"
  frames = [Image.fromarray(pixels(64, 64, 0)) for _ in range(4)]
  (root / "stack.tif").parent.mkdir(exist_ok=True)
  frames[0].save(root / "stack.tif", save_all=True, append_images=frames[1:])
  expect["stack.tif"] = "4 pages or bands"
  save(root / "tiny.png", pixels(20, 64))
  expect["tiny.png"] = "under the 32 px crops"
  for rel in expect:
    save((masks / rel).with_suffix(".png"), np.zeros((64, 64), np.uint8))
  save(root / "mismatch.png", pixels(64, 64))
  save(masks / "mismatch.png", np.zeros((64, 60), np.uint8))
  expect["mismatch.png"] = "is 64x64 (after its EXIF orientation) but mask"
  save(root / "ids.png", pixels(64, 64))
  save(masks / "ids.png", np.full((64, 64), 7, np.uint8))
  expect["ids.png"] = "holds label values [7] outside the ids 0..2 and 255"
  save(root / "lonely.png", pixels(64, 64))
  expect["lonely.png"] = "has no mask"
  save(masks / "orphan.png", np.zeros((64, 64), np.uint8))
  expect["orphan"] = "has no image"
  save(masks / "deep16mask.png", np.zeros((64, 64), np.uint16))
  save(root / "deep16mask.png", pixels(64, 64))
  expect["deep16mask.png"] = "16-bit mask"
  return expect


def test_every_bad_file_is_listed_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.setattr(folder, "largest_crop", lambda: 32)
  root, masks = tmp_path / "images", tmp_path / "masks"
  expect = _bad_folder(root, masks)
  with pytest.raises(LayoutError) as e:
    prepare(tmp_path, root, masks=masks, classes=("a", "b", "c"))
  lines = str(e.value).splitlines()
  assert lines[0] == f"{len(expect)} problem(s) in the input:", str(e.value)
  for rel, what in expect.items():
    hits = [ln for ln in lines if f"/{rel}" in ln and what in ln]
    assert len(hits) == 1, (rel, what, str(e.value))
  assert not (tmp_path / "tfds").exists()
  # The hints say how to convert.
  assert "gdal_translate" in next(ln for ln in lines if "deep16.png" in ln)
  assert "-alpha remove" in next(ln for ln in lines if "/alpha.png" in ln)


def test_16_bit_rgb_is_refused_though_pillow_opens_it_as_rgb(tmp_path):
  import struct
  import zlib
  h, w = 40, 40
  raw = b"".join(b"\x00" + (np.arange(w * 3, dtype=">u2") * 300).tobytes() for _ in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(  # noqa: E731
      ">I", zlib.crc32(t + d) & 0xFFFFFFFF)
  png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "rgb16.png").write_bytes(png)
  with Image.open(tmp_path / "images" / "rgb16.png") as im:
    assert im.mode == "RGB"          # Pillow keeps the high bytes only: silently darker
  with pytest.raises(LayoutError, match=r"rgb16.png: 16-bit image"):
    prepare(tmp_path, tmp_path / "images", min_size=16)


def _labelled(tmp_path, n=4, val=1):
  root, masks = tmp_path / "images", tmp_path / "masks"
  ids = {}
  for i in range(n):
    rel = f"{'val/' if i < val else ''}s{i}/img{i}"
    save(root / f"{rel}.jpg", pixels(48, 40))
    ids[f"{rel}.jpg"] = save(masks / f"{rel}.png", _RNG.integers(0, 4, (48, 40), dtype=np.uint8))
  return root, masks, ids


def test_masks_without_reduce_zero_label(tmp_path):
  root, masks, ids = _labelled(tmp_path)
  data_dir = prepare(tmp_path, root, masks=masks, classes=("a", "b", "c", "d"), min_size=32)
  got = {**records(data_dir, "t"), **records(data_dir, "t", "validation")}
  assert sorted(got) == sorted(ids)
  assert sorted(records(data_dir, "t", "validation")) == ["val/s0/img0.jpg"]
  for key, want in ids.items():
    np.testing.assert_array_equal(got[key]["label"], want)
  info = datasets.get_info("folder/t", data_dir)
  assert (info.class_names, info.reduce_zero_label, info.ignore_index) == (
      ("a", "b", "c", "d"), False, 255)
  assert info.train_scale == (48, 40)


def test_masks_with_reduce_zero_label_and_ignore_index(tmp_path):
  root, masks, ids = _labelled(tmp_path)
  # Classes are ids 1 and 2; mmseg's ignore_index is a training id: 2 is raw id 3.
  data_dir = prepare(tmp_path, root, masks=masks, classes=("x", "y"), reduce_zero_label=True,
                     ignore_index=2, min_size=32)
  got = {**records(data_dir, "t"), **records(data_dir, "t", "validation")}
  info = datasets.get_info("folder/t", data_dir)
  assert (info.class_names, info.reduce_zero_label) == (("x", "y"), True)
  for key, raw in ids.items():
    # mmseg: 0 -> 255, k -> k - 1; then training id 2 (raw 3) is ignored.
    train_ids = np.where(raw == 0, 255, raw.astype(int) - 1)
    train_ids[train_ids == 2] = 255
    np.testing.assert_array_equal(reduce_zero(got[key]["label"]), train_ids)
  # Without ignore_index, raw id 3 is a fourth id outside two classes.
  with pytest.raises(LayoutError, match=r"holds label values \[3\] outside the ids 0\.\.2 and 255"):
    prepare(tmp_path / "again", root, masks=masks, classes=("x", "y"), reduce_zero_label=True,
            min_size=32)


def test_classes_default_to_the_ids_found(tmp_path):
  root, masks, _ = _labelled(tmp_path)
  data_dir = prepare(tmp_path, root, masks=masks, reduce_zero_label=True, min_size=32)
  assert datasets.get_info("folder/t", data_dir).class_names == ("1", "2", "3")


def test_validation_split_is_seeded_and_exclusive(tmp_path):
  root = tmp_path / "images"
  for i in range(10):
    save(root / f"{i}.png", pixels(32, 32))
  splits = lambda seed: folder.folder_files.find_items(root, None, 0.3, seed)[0]  # noqa: E731
  a, b, c = splits(0), splits(0), splits(1)
  names = lambda s: sorted(it.file_name for it in s["validation"])  # noqa: E731
  assert names(a) == names(b) and len(names(a)) == 3 and names(a) != names(c)
  assert not set(names(a)) & {it.file_name for it in a["train"]}
  assert list(folder.folder_files.find_items(root)[0]) == ["train"]
  save(root / "val" / "v.png", pixels(32, 32))
  assert names(folder.folder_files.find_items(root)[0]) == ["val/v.png"]
  with pytest.raises(LayoutError, match="use one of the two"):
    splits(0)


def test_command_line_lists_bad_files_and_prepares(tmp_path):
  root = tmp_path / "images"
  save(root / "a.png", pixels(32, 32))
  (root / "b.jpg").write_bytes(b"not a jpeg")
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "glare_jax.data.prepare", "--dataset=folder", "--name=cli",
         f"--images={root}", f"--data_dir={tmp_path / 'tfds'}", "--min_size=32"]
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "error:" in out.stderr and str(root / "b.jpg") in out.stderr
  (root / "b.jpg").unlink()
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ETA" in out.stderr and len(records(tmp_path / "tfds", "cli")) == 1


def test_fine_tuning_scale_and_classes_come_from_the_metadata(tmp_path):
  from configs import folder_seg
  from glare_jax.data import seg_transforms
  root, masks, _ = _labelled(tmp_path)
  data_dir = prepare(tmp_path, root, masks=masks, classes=("a", "b", "c", "d"), min_size=32)
  config = folder_seg.get_config("name=t")
  assert config.dataset == "folder/t" and not config.aug.scale and not config.eval.scale
  info = datasets.get_info(config.dataset, str(data_dir))
  assert seg_transforms.train_transform_from_config(config, info).scale == (48, 40)
  assert seg_transforms.test_transform_from_config(config, info).scale == (48, 40)
  with pytest.raises(ValueError, match="needs the prepared dataset's name"):
    folder_seg.get_config("tiny")
  unlabelled = prepare(tmp_path / "u", root, min_size=32)
  with pytest.raises(ValueError, match="prepared without --masks"):
    datasets.get_info("folder/t", str(unlabelled))
  with pytest.raises(FileNotFoundError, match="--dataset=folder --name=nope --images=DIR"):
    datasets.get_info("folder/nope", str(data_dir))


def test_preflight_takes_a_folder_name_and_the_probe_follows_the_labels(tmp_path):
  """The folder configs pass the pre-run checks (their classes are read later, from
  config.data_dir), and pre-training probes a folder only when it has masks and a
  validation split to score."""
  from configs import folder as folder_config
  from glare_jax.train import preflight, pretrain
  root, masks, _ = _labelled(tmp_path)
  labelled = prepare(tmp_path / "l", root, masks=masks, min_size=32)
  unlabelled = prepare(tmp_path / "u", root, min_size=32)
  config = folder_config.get_config("name=t,tiny")
  config.probe.every_epochs = 1
  preflight.check_values(config)        # no data_dir needed for the name
  config.data_dir = str(labelled)
  assert pretrain.probe_on(config)
  config.data_dir = str(unlabelled)
  assert not pretrain.probe_on(config)
  config.probe.every_epochs = 0
  config.data_dir = str(labelled)
  assert not pretrain.probe_on(config)
  for bad in ("folder/", "folder/a/b", "tiles"):
    config.dataset = bad
    with pytest.raises(ValueError, match=repr(bad) if bad != "tiles" else "unknown dataset"):
      preflight.check_values(config)
