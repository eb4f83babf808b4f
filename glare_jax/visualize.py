"""Per-head attention maps of the last block with attention-aware regions (paper Figs. 2, 4).

    python -m glare_jax.visualize --checkpoint DIR --out attn.png [--size 224] a.png b.png

One row per image: the image with every head's region, then one panel per head
showing the [CLS] query's softmax attention over the patches of the last block
(each patch a block of colour, viridis, from the head's minimum to its maximum) with that
head's region on top. The regions are those GLARE's L_reg trains on
(`glare_jax/data/regions.py`): the start patch is the head's argmax (marked with
a dot) and the rectangle of rows x cols patches, each side drawn from
[min_patches, max_patches], is placed around it with a fixed seed (`--seed`), so
a figure is reproducible.

DIR is either
  * a converted checkpoint (model.json + params/, `python -m glare_jax.convert`), or
  * a GLARE workdir (config.json + checkpoints/<step>/state): of a pre-training run
    the latest step's teacher (`--which student` for the student), of a fine-tuning
    run the fine-tuned backbone. Region sizes then come from its config.

Images are read as RGB at their own size or resized to S x S (`--size`, bicubic)
and normalised with the ImageNet mean / std, as `glare_jax.embed` does; sides
must be multiples of the patch size. `--demo-images N` adds the first N scenes of
the generated demo dataset's validation split (no files needed). Rendering uses
Pillow only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from absl import flags

from glare_jax import cli, embed
from glare_jax.configs import common
from glare_jax.data import regions as regions_lib
from glare_jax.models import load, vit_from_config
from glare_jax.models.vit import ViT, cls_patch_attention
from glare_jax.train import init_checkpoint

# Ten points of matplotlib's viridis; the colour map interpolates between them.
VIRIDIS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
    np.float64)
# Region colours, one per head (cycled); none of them is on the viridis scale.
PALETTE = ((230, 25, 75), (255, 255, 255), (70, 240, 240), (245, 130, 48), (240, 50, 230),
           (250, 190, 212), (128, 128, 128), (0, 0, 0))
CAPTION = 14     # caption strip above each row, pixels
GAP = 4          # pixels between panels


class VisualizeError(ValueError):
  """Bad checkpoint or image; the message names the path."""


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A ViT and its parameters, ready to run; `regions` = (min_patches, max_patches)."""
  model: ViT
  params: dict[str, Any]
  regions: tuple[int, int]
  description: str


# --- loading ---------------------------------------------------------------------------


def _default_regions() -> tuple[int, int]:
  r = common.glare_config().regions
  return r.min_patches, r.max_patches


def _from_workdir(workdir: pathlib.Path, which: str) -> Backbone:
  try:
    config = mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  except (OSError, ValueError) as e:
    raise VisualizeError(f"{workdir / 'config.json'}: unreadable run config ({e})") from e
  if config.get("mode") == "pretrain":
    key = init_checkpoint.WHICH[which]
    network = which
    sizes = (config.glare.regions.min_patches, config.glare.regions.max_patches)
  elif config.get("mode") == "finetune":
    key, network, sizes = "params", "fine-tuned", _default_regions()
  else:
    raise VisualizeError(f"{workdir}: config.json has mode {config.get('mode')!r}; expected "
                         "a 'pretrain' or 'finetune' run")
  step = init_checkpoint.latest_step(workdir)
  params = init_checkpoint.read_subtree(workdir / "checkpoints" / str(step) / "state", key,
                                        "backbone")
  model = vit_from_config(config.model, drop_path=0.0, dtype=jnp.float32, remat=False)
  return Backbone(model, params, sizes, f"{workdir} step {step}, {network} backbone")


def load_backbone(path: str | pathlib.Path, which: str = "teacher") -> Backbone:
  """The backbone of a converted checkpoint or of a GLARE workdir (see module doc)."""
  path = pathlib.Path(path).expanduser().absolute()   # orbax reads absolute paths only
  if (path / load.SPEC_FILE).is_file():
    params, spec = load.load_converted(path)
    if "backbone" not in params:
      raise VisualizeError(f"{path}: the converted checkpoint has no backbone")
    tag = f"{spec.source_format} {spec.which}".strip()
    backbone = Backbone(load.vit_from_spec(spec), params["backbone"], _default_regions(),
                        f"{path} ({tag})")
  elif (path / "config.json").is_file():
    backbone = _from_workdir(path, which)
  else:
    raise VisualizeError(_not_a_checkpoint(path))
  if backbone.model.num_prefix < 1:
    raise VisualizeError(f"{path}: the model has no [CLS] token (0 prefix tokens, e.g. FLSL), "
                         "so there is no [CLS] -> patch attention to draw")
  return backbone


def _not_a_checkpoint(path: pathlib.Path) -> str:
  if not path.is_dir():
    return f"{path}: no such directory"
  return (f"{path} is neither a converted checkpoint (no {load.SPEC_FILE}; make one with "
          "python -m glare_jax.convert) nor a GLARE workdir (no config.json)")


# --- attention and regions -----------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _cls_attention(model: ViT, params: dict[str, Any], images: jax.Array) -> jax.Array:
  """[B, H, W, 3] -> [B, heads, h*w]: the last block's [CLS] -> patch attention."""
  _, aux = model.apply({"params": params}, images)
  return cls_patch_attention(aux["attn"], model.num_prefix)


def attention_regions(backbone: Backbone, image: np.ndarray, seed: int = 0,
                      sizes: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Attention maps and regions of one normalised image [H, W, 3].

  Returns maps [heads, h, w] ([CLS] -> patch attention of the last block),
  start [heads] (flat argmax patch) and box [heads, 4] (top, left, rows, cols in
  patches), the regions drawn with `jax.random.key(seed)`.
  """
  min_p, max_p = sizes or backbone.regions
  patch = backbone.model.patch_size
  if image.shape[0] % patch or image.shape[1] % patch:
    raise ValueError(f"image size {image.shape[0]}x{image.shape[1]} is not a multiple of the "
                     f"patch size {patch} (pass --size)")
  h, w = image.shape[0] // patch, image.shape[1] // patch
  cls_attn = _cls_attention(backbone.model, backbone.params, jnp.asarray(image)[None])[0]
  starts = regions_lib.attention_starts(cls_attn)                      # [heads]
  regions = regions_lib.sample_regions(jax.random.key(seed), starts, (h, w), min_p, max_p)
  return dict(maps=np.asarray(cls_attn, np.float32).reshape(-1, h, w),
              start=np.asarray(regions.start), box=np.asarray(regions.box))


# --- rendering -------------------------------------------------------------------------


def colormap(values: np.ndarray) -> np.ndarray:
  """[...] in [0, 1] -> [..., 3] uint8 viridis (linear between the ten points)."""
  x = np.clip(values, 0.0, 1.0) * (len(VIRIDIS) - 1)
  i = np.minimum(np.floor(x).astype(int), len(VIRIDIS) - 2)
  f = (x - i)[..., None]
  return np.round(VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).astype(np.uint8)


def _panel_size(hw: tuple[int, int], height: int) -> tuple[int, int]:
  return max(1, round(hw[1] * height / hw[0])), height


def _draw_region(draw: ImageDraw.ImageDraw, box, start, grid, size, colour, x0, y0) -> None:
  """Outline of a region (patch units) and a dot on its start patch, in panel pixels."""
  (h, w), (pw, ph) = grid, size
  sy, sx = ph / h, pw / w
  top, left, rows, cols = (int(v) for v in box)
  corners = [x0 + left * sx, y0 + top * sy, x0 + (left + cols) * sx - 1,
             y0 + (top + rows) * sy - 1]
  draw.rectangle(corners, outline=(0, 0, 0), width=4)   # dark halo, then the colour
  draw.rectangle(corners, outline=colour, width=2)
  r, c = divmod(int(start), w)
  cy, cx = y0 + (r + 0.5) * sy, x0 + (c + 0.5) * sx
  rad = max(2.0, min(sx, sy) / 6)
  draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour, outline=(0, 0, 0))


def render(pixels: Sequence[np.ndarray], results: Sequence[dict[str, np.ndarray]],
           names: Sequence[str], height: int = 224) -> Image.Image:
  """The figure: per image a row [image + all regions, head 0, head 1, ...].

  pixels: uint8 [H, W, 3] images as the model saw them; results: `attention_regions`
  outputs; every panel is `height` pixels high (width keeps the image's aspect).
  """
  font = ImageFont.load_default()
  rows = []
  for image, res, name in zip(pixels, results, names):
    heads, h, w = res["maps"].shape
    size = _panel_size(image.shape[:2], height)
    row = Image.new("RGB", ((heads + 1) * (size[0] + GAP) - GAP, CAPTION + height),
                    (255, 255, 255))
    draw = ImageDraw.Draw(row)
    row.paste(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), (0, CAPTION))
    draw.text((2, 1), name, fill=(0, 0, 0), font=font)
    for k in range(heads):
      x0 = (k + 1) * (size[0] + GAP)
      m = res["maps"][k] - res["maps"][k].min()
      heat = Image.fromarray(colormap(m / max(float(m.max()), 1e-12)))
      row.paste(heat.resize(size, Image.Resampling.NEAREST), (x0, CAPTION))
      colour = PALETTE[k % len(PALETTE)]
      draw.text((x0 + 2, 1), f"head {k}", fill=(0, 0, 0), font=font)
      for x in (0, x0):  # the region on the image panel and on its head's panel
        _draw_region(draw, res["box"][k], res["start"][k], (h, w), size, colour, x, CAPTION)
    rows.append(row)
  width = max(r.width for r in rows)
  out = Image.new("RGB", (width, sum(r.height for r in rows) + GAP * (len(rows) - 1)),
                  (255, 255, 255))
  y = 0
  for r in rows:
    out.paste(r, (0, y))
    y += r.height + GAP
  return out


def _display_pixels(image: np.ndarray) -> np.ndarray:
  """Normalised [H, W, 3] -> the uint8 pixels it came from."""
  x = image * np.asarray(common.IMAGENET_STD) + np.asarray(common.IMAGENET_MEAN)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _demo_scene(index: int, size: int | None) -> np.ndarray:
  """Validation scene `index` of the demo dataset, normalised [S, S, 3]."""
  from glare_jax.data.builders import demo   # pylint: disable=g-import-not-at-top
  pixels, _ = demo.example(demo.SEED, "validation", index, demo.IMAGE_SIZE)
  return embed.normalised(Image.fromarray(pixels), size)


def main(argv: list[str] | None = None) -> int:
  fv = cli.flag_values()
  flags.DEFINE_string(
      "checkpoint", None,
      "a converted checkpoint or a GLARE pre-training / fine-tuning workdir", flag_values=fv)
  flags.DEFINE_string("out", None, "output image (.png)", flag_values=fv)
  flags.DEFINE_integer("size", None, "resize every image to S x S", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum("which", "teacher", ("teacher", "student"),
                    "network of a pre-training workdir", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the region sizes and offsets", flag_values=fv)
  flags.DEFINE_integer("min-patches", None,
                       "region side minimum (default: the run's config, else 2)",
                       flag_values=fv)
  flags.DEFINE_integer("max-patches", None,
                       "region side maximum (default: the run's config, else 6)",
                       flag_values=fv)
  flags.DEFINE_integer("panel-height", 224, "pixels per panel", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("demo-images", 0,
                       "add the first N validation scenes of the generated demo dataset",
                       lower_bound=0, flag_values=fv)
  flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)
  images = cli.parse(fv, argv, prog="python -m glare_jax.visualize", doc=__doc__,
                     positional="[IMAGE...]")
  args = argparse.Namespace(
      checkpoint=pathlib.Path(fv.checkpoint), out=pathlib.Path(fv.out), size=fv.size,
      which=fv.which, seed=fv.seed, min_patches=fv["min-patches"].value,
      max_patches=fv["max-patches"].value, panel_height=fv["panel-height"].value,
      demo_images=fv["demo-images"].value, images=[pathlib.Path(p) for p in images])
  if not args.images and args.demo_images < 1:
    cli.fail("give image files and/or --demo-images N")
  try:
    backbone = load_backbone(args.checkpoint, args.which)
    sizes = (backbone.regions[0] if args.min_patches is None else args.min_patches,
             backbone.regions[1] if args.max_patches is None else args.max_patches)
    patch = backbone.model.patch_size
    inputs = [(p.name, lambda p=p: embed.read_images([p], args.size, patch)[0])
              for p in args.images]
    inputs += [(f"demo validation {i}", lambda i=i: _demo_scene(i, args.size))
               for i in range(args.demo_images)]
    pixels, results = [], []
    for _, read in inputs:
      image = read()                                            # [H, W, 3] normalised
      pixels.append(_display_pixels(image))
      results.append(attention_regions(backbone, image, args.seed, sizes))
  except (VisualizeError, embed.EmbedError, FileNotFoundError, ValueError) as e:
    return cli.report(e, verbose=fv.verbosity >= 1)
  figure = render(pixels, results, [name for name, _ in inputs], args.panel_height)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  try:
    figure.save(args.out)
  except (OSError, ValueError) as e:
    print(f"error: {args.out}: cannot write the figure ({e})", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {len(inputs)} image(s) x {results[0]['maps'].shape[0]} "
        f"heads, {backbone.description}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
