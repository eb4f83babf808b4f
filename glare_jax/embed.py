"""Tokens and last-block attention of images, from a converted checkpoint.

    python -m glare_jax.embed --checkpoint ckpt/udi_s16 --out emb.npz [--size 224] a.png b.png

Images are read as RGB at their own size (or resized to S x S, bicubic),
scaled to [0, 1] and normalised with the ImageNet mean / std, then run through
the backbone. The .npz holds

    tokens     [N, P + h*w, D] float32, after the final LayerNorm
    attn       [N, heads, T, T] float32, the last block's softmax attention (T = P + h*w)
    grid       [2] (h, w);  num_prefix  P;  paths  [N] the input files

All images of one call must have the same size (after --size).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from absl import flags
import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from glare_jax import cli
from glare_jax.configs.common import IMAGENET_MEAN, IMAGENET_STD
from glare_jax.models import load
from glare_jax.models.vit import ModelSpec


class EmbedError(ValueError):
  """Bad input images; the message names the file."""


def normalised(image: Image.Image, size: int | None) -> np.ndarray:
  """An RGB image (resized to size x size, bicubic, when given) -> [H, W, 3] float32
  with the ImageNet mean and std the backbones were trained with."""
  if size:
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  x = np.asarray(image, dtype=np.float32) / 255.0
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def read_images(paths: Sequence[pathlib.Path], size: int | None, patch_size: int) -> np.ndarray:
  """-> [N, H, W, 3] float32, normalised. Raises EmbedError naming the bad file."""
  images, first = [], None
  for path in paths:
    try:
      with Image.open(path) as im:
        arr = normalised(im.convert("RGB"), size)
    except (OSError, UnidentifiedImageError) as e:
      raise EmbedError(f"{path}: cannot read the image ({e})") from e
    h, w = arr.shape[:2]
    if first is None:
      first = (path, (h, w))
    elif (h, w) != first[1]:
      raise EmbedError(f"{path} is {h}x{w} but {first[0]} is {first[1][0]}x{first[1][1]}: "
                       "images of one call must share a size (or pass --size)")
    if h % patch_size or w % patch_size:
      raise EmbedError(f"{path}: {h}x{w} is not a multiple of the patch size {patch_size} "
                       "(pass --size)")
    images.append(arr)
  return np.stack(images)


def embed(params: dict, spec: ModelSpec, images: np.ndarray, batch_size: int = 8,
          pos_resize: str = "dino") -> dict[str, np.ndarray]:
  """Runs a converted backbone (`load.load_converted`) on normalised images [N, H, W, 3]."""
  model = load.vit_from_spec(spec, pos_resize=pos_resize)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  tokens, attn = [], []
  for i in range(0, len(images), batch_size):
    t, aux = forward(params["backbone"], images[i:i + batch_size])
    tokens.append(np.asarray(t, np.float32))
    attn.append(np.asarray(aux["attn"], np.float32))
  h, w = images.shape[1] // spec.patch_size, images.shape[2] // spec.patch_size
  return dict(tokens=np.concatenate(tokens), attn=np.concatenate(attn),
              grid=np.array([h, w]), num_prefix=np.array(spec.num_prefix))


def main(argv: list[str] | None = None) -> int:
  fv = cli.flag_values()
  flags.DEFINE_string("checkpoint", None,
                      "a converted checkpoint directory (python -m glare_jax.convert)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output .npz", flag_values=fv)
  flags.DEFINE_integer("size", None, "resize every image to S x S", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch-size", 8, "images per forward pass", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum("pos-resize", "dino", ("dino", "size"),
                    "position-grid resampling for sizes other than the stored grid",
                    flag_values=fv)
  flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)
  images = cli.parse(fv, argv, prog="python -m glare_jax.embed", doc=__doc__,
                     positional="IMAGE...")
  if not images:
    cli.fail("give at least one image file; `python -m glare_jax.embed --help` says how")
  args = argparse.Namespace(checkpoint=pathlib.Path(fv.checkpoint), out=pathlib.Path(fv.out),
                            size=fv.size, batch_size=fv["batch-size"].value,
                            pos_resize=fv["pos-resize"].value,
                            images=[pathlib.Path(p) for p in images])
  try:
    params, spec = load.load_converted(args.checkpoint)
    images = read_images(args.images, args.size, spec.patch_size)
    out = embed(params, spec, images, args.batch_size, args.pos_resize)
  except (EmbedError, FileNotFoundError, ValueError) as e:
    return cli.report(e, verbose=fv.verbosity >= 1)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(args.out, paths=np.array([str(p) for p in args.images]), **out)
  print(f"wrote {args.out}: tokens {out['tokens'].shape}, attn {out['attn'].shape}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
