"""The embed CLI: normalisation, tokens and attention against the torch reference,
and its input errors."""

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import torch_vit as tv  # noqa: E402
from reference_images import normalise, write_png  # noqa: E402

from glare_jax import embed  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny UDI backbone (2 prefix tokens, 4x4 grid), converted; and its torch twin."""
  d = tmp_path_factory.mktemp("embed")
  ckpt, mods = tv.make_layout("udi_backbone", tv.TINY, grid=4)
  tv.convert_file(d, ckpt)
  return d / "ckpt", mods["vit"]


def run(ckpt, out, *args, capsys):
  code = embed.main(["--checkpoint", str(ckpt), "--out", str(out), *map(str, args)])
  return code, capsys.readouterr().err


def test_tokens_and_attention_match_torch(converted, tmp_path, capsys):
  ckpt, vit = converted
  pixels = [write_png(tmp_path / f"{i}.png", 48, 80, i) for i in range(3)]
  code, err = run(ckpt, tmp_path / "e.npz", "--batch-size", 2,
                  *[tmp_path / f"{i}.png" for i in range(3)], capsys=capsys)
  assert code == 0, err
  out = np.load(tmp_path / "e.npz")
  assert out["tokens"].shape == (3, 2 + 3 * 5, 64) and out["tokens"].dtype == np.float32
  assert out["attn"].shape == (3, 2, 17, 17)
  assert list(out["grid"]) == [3, 5] and int(out["num_prefix"]) == 2
  assert list(out["paths"]) == [str(tmp_path / f"{i}.png") for i in range(3)]
  ref_tokens, ref_attn = tv.torch_forward(vit, np.stack([normalise(p) for p in pixels]))
  np.testing.assert_allclose(out["tokens"], ref_tokens, atol=1e-4)
  np.testing.assert_allclose(out["attn"], ref_attn, atol=1e-5)


def test_resize(converted, tmp_path, capsys):
  ckpt, vit = converted
  pixels = write_png(tmp_path / "a.png", 70, 50, 0)
  code, err = run(ckpt, tmp_path / "e.npz", "--size", 32, tmp_path / "a.png", capsys=capsys)
  assert code == 0, err
  out = np.load(tmp_path / "e.npz")
  resized = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))
  ref_tokens, _ = tv.torch_forward(vit, normalise(resized)[None])
  assert out["tokens"].shape == (1, 2 + 4, 64)
  np.testing.assert_allclose(out["tokens"], ref_tokens, atol=1e-4)


def test_input_errors(converted, tmp_path, capsys):
  ckpt, _ = converted
  write_png(tmp_path / "a.png", 32, 32, 0)
  write_png(tmp_path / "b.png", 48, 32, 1)
  write_png(tmp_path / "odd.png", 40, 40, 2)
  (tmp_path / "broken.png").write_bytes(b"not an image")
  code, err = run(ckpt, tmp_path / "e.npz", tmp_path / "a.png", tmp_path / "b.png",
                  capsys=capsys)
  assert code == 2 and "b.png is 48x32" in err and "a.png is 32x32" in err
  code, err = run(ckpt, tmp_path / "e.npz", tmp_path / "broken.png", capsys=capsys)
  assert code == 2 and "broken.png: cannot read the image" in err
  code, err = run(ckpt, tmp_path / "e.npz", tmp_path / "missing.png", capsys=capsys)
  assert code == 2 and "missing.png" in err
  code, err = run(ckpt, tmp_path / "e.npz", tmp_path / "odd.png", capsys=capsys)
  assert code == 2 and "not a multiple of the patch size 16" in err
  code, err = run(tmp_path, tmp_path / "e.npz", tmp_path / "a.png", capsys=capsys)
  assert code == 2 and "not a converted checkpoint" in err
  assert not (tmp_path / "e.npz").exists()
  # Resizing makes differently sized images acceptable.
  code, err = run(ckpt, tmp_path / "e.npz", "--size", 32, tmp_path / "a.png", tmp_path / "b.png",
                  tmp_path / "odd.png", capsys=capsys)
  assert code == 0, err


def test_real_tile(converted, tmp_path, capsys, loveda_sample):
  ckpt, vit = converted
  tile = sorted(loveda_sample.glob("*/*/images_png/*.png"))[0]
  code, err = run(ckpt, tmp_path / "e.npz", "--size", 64, tile, capsys=capsys)
  assert code == 0, err
  out = np.load(tmp_path / "e.npz")
  with Image.open(tile) as im:
    resized = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
  ref_tokens, _ = tv.torch_forward(vit, normalise(resized)[None])
  np.testing.assert_allclose(out["tokens"], ref_tokens, atol=1e-4)
