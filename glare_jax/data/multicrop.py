"""Multi-crop views: crop boxes, flips, and the rendering of the views (paper appendix B.1).

A record becomes `num_global` global views (224 px) and `num_local` local views
(96 px), ordered [global_0, global_1, local_0, ...]. `sample_views` draws every
random choice of those views on the host from a `np.random.Generator`; the crops
are then rendered either on the host (`render_views`: PIL + NumPy, in the grain
workers) or on the device (`render_views_jax` / `augment_batch_jax`: jax.numpy
inside the step, with the photometric parameters drawn there by
`photometric.sample_photometric_jax`). Both renderers apply the same formulas.

Boxes (docs/DESIGN.md, "Views and boxes"): (x0, y0, x1, y1) in source pixels, the
image spans [0, W] x [0, H], and output pixel u of a crop of size S samples source
x = x0 + (u + 0.5) (x1 - x0) / S; a flipped view is mirrored after cropping. Our
boxes have integer corners, as torchvision's.

Each box is drawn with torchvision's RandomResizedCrop rule (`random_resized_box`):
area = U(scale) x image area, aspect = exp(U(log ratio)), w = round(sqrt(area
aspect)), h = round(sqrt(area / aspect)); accepted if it fits, the offset uniform
over the integer positions; after 10 misses, the central crop with the aspect
clamped to `ratio`. On top of it, two rules give every view a counterpart (UDI):

- Overlap (`global_overlap`): each global after the first is re-drawn until it
  overlaps global_0 with positive area. After `max_redraws` re-draws it keeps the
  size of its last draw and is centred on global_0's centre, shifted into the
  image; that box always overlaps global_0.
- Union (`locals_in_union`): a local box must be contained in the union of the
  global boxes: `covered_area(local, globals) == area(local)`, computed exactly
  (integer corners). The box is drawn by the rule above with its area relative to
  the whole image but its position inside the bounding box of the globals (a local
  outside that rectangle cannot be covered), then re-drawn until covered. After
  `max_redraws` re-draws it is drawn inside the largest global box, where it is
  covered by construction.

The view dict (leading axis V = num_global + num_local):

    boxes   [V, 4] float32      flips  [V] bool
    plus the photometric keys of `photometric.py` (jitter, jitter_order,
    jitter_factors, grayscale, blur, blur_sigma, solarize).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from glare_jax.data.photometric import (PHOTOMETRIC_KEYS, photometric_jax, photometric_np,
                                        sample_photometric, sample_photometric_jax)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), integer source pixels
RRC_TRIES = 10  # torchvision's attempts before the central-crop fallback
RESAMPLE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # crops.device_resample


def check_crops_config(cfg) -> None:
  """Raises ValueError naming the `crops.*` field that is out of range."""
  def need(ok, field, what):
    if not ok:
      raise ValueError(f"crops.{field} = {cfg.get(field)!r}: {what}")
  need(cfg.num_global >= 1, "num_global", "needs at least one global crop")
  need(cfg.num_local >= 0, "num_local", "must be >= 0")
  for f in ("global_scale", "local_scale", "ratio", "blur_sigma"):
    lo, hi = cfg[f]
    need(0 < lo <= hi, f, "must be a (min, max) pair with 0 < min <= max")
  for f in ("global_scale", "local_scale"):
    need(cfg[f][1] <= 1.0, f, "is a fraction of the image area, max must be <= 1")
  for f in ("flip_p", "jitter_p", "grayscale_p"):
    need(0.0 <= cfg[f] <= 1.0, f, "must be a probability in [0, 1]")
  for f in ("blur_p", "solarize_p"):
    need(len(cfg[f]) == 3 and all(0.0 <= p <= 1.0 for p in cfg[f]), f,
         "must be 3 probabilities (global 1, global 2, locals)")
  for f in ("brightness", "contrast", "saturation"):
    need(cfg[f] >= 0, f, "must be >= 0")
  need(0.0 <= cfg.hue <= 0.5, "hue", "must be in [0, 0.5]")
  for f in ("global_size", "local_size"):
    need(cfg[f] >= 1, f, "must be a size in pixels, >= 1")
  need(len(cfg.mean) == 3 and len(cfg.std) == 3 and min(cfg.std) > 0, "std",
       "mean and std need 3 entries, std > 0")
  need(cfg.max_redraws >= 0, "max_redraws", "must be >= 0")
  need(cfg.augment_on in ("host", "device"), "augment_on", "must be 'host' or 'device'")
  need(cfg.device_resample in RESAMPLE_DTYPES, "device_resample",
       f"must be one of {sorted(RESAMPLE_DTYPES)}")


# --------------------------------------------------------------------- geometry

def box_area(b: Box) -> int:
  return max(b[2] - b[0], 0) * max(b[3] - b[1], 0)


def overlap_area(a: Box, b: Box) -> int:
  return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def covered_area(box: Box, cover: Sequence[Box]) -> float:
  """Area of `box` inside the union of `cover`, exactly.

  The edges of the `cover` boxes cut `box` into cells that each lie wholly inside
  or wholly outside every cover box; a cell counts when its centre is inside one.
  """
  x0, y0, x1, y1 = box
  xs = sorted({x0, x1, *(min(max(c[i], x0), x1) for c in cover for i in (0, 2))})
  ys = sorted({y0, y1, *(min(max(c[i], y0), y1) for c in cover for i in (1, 3))})
  area = 0
  for xa, xb in zip(xs, xs[1:]):
    for ya, yb in zip(ys, ys[1:]):
      cx, cy = (xa + xb) / 2, (ya + yb) / 2
      if any(c[0] < cx < c[2] and c[1] < cy < c[3] for c in cover):
        area += (xb - xa) * (yb - ya)
  return area


def random_resized_box(rng: np.random.Generator, frame: Box, ref_area: float,
                       scale: Sequence[float], ratio: Sequence[float]) -> Box:
  """torchvision's RandomResizedCrop box, placed inside `frame`.

  The target area is a fraction `scale` of `ref_area` (the image's area); with
  frame = the whole image this is exactly torchvision's rule.
  """
  fx0, fy0, fx1, fy1 = frame
  fw, fh = fx1 - fx0, fy1 - fy0
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(RRC_TRIES):
    area = ref_area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(area * aspect)))
    h = int(round(math.sqrt(area / aspect)))
    if 0 < w <= fw and 0 < h <= fh:
      x0 = fx0 + int(rng.integers(0, fw - w + 1))
      y0 = fy0 + int(rng.integers(0, fh - h + 1))
      return (x0, y0, x0 + w, y0 + h)
  # Fallback: the central crop of the frame, its aspect clamped to `ratio`.
  w, h = fw, fh
  if fw / fh < ratio[0]:
    h = int(round(fw / ratio[0]))
  elif fw / fh > ratio[1]:
    w = int(round(fh * ratio[1]))
  x0, y0 = fx0 + (fw - w) // 2, fy0 + (fh - h) // 2
  return (x0, y0, x0 + w, y0 + h)


def _centre_on(box: Box, target: Box, width: int, height: int) -> Box:
  """`box`'s size moved onto `target`'s centre, then shifted into the image.

  The result overlaps `target` with positive area: on each axis it starts at most
  half its size before the centre (so before target's end) and ends less than one
  pixel before centre + half its size (so after target's start).
  """
  w, h = box[2] - box[0], box[3] - box[1]
  x0 = min(max(math.floor((target[0] + target[2]) / 2 - w / 2), 0), width - w)
  y0 = min(max(math.floor((target[1] + target[3]) / 2 - h / 2), 0), height - h)
  return (x0, y0, x0 + w, y0 + h)


def sample_boxes(rng: np.random.Generator, image_hw: tuple[int, int], cfg) -> np.ndarray:
  """[V, 4] float32 boxes: the globals, then the locals, with the overlap rules."""
  height, width = (int(s) for s in image_hw)
  if height < 1 or width < 1:
    raise ValueError(f"sample_boxes: image_hw must be positive, got {image_hw}")
  image = (0, 0, width, height)
  area = float(height * width)
  draw_global = functools.partial(random_resized_box, rng, image, area,
                                  cfg.global_scale, cfg.ratio)
  globals_ = [draw_global()]
  for _ in range(1, cfg.num_global):
    for _ in range(1 + cfg.max_redraws):
      box = draw_global()
      if not cfg.global_overlap or overlap_area(box, globals_[0]) > 0:
        break
    else:
      box = _centre_on(box, globals_[0], width, height)
    globals_.append(box)

  locals_ = []
  if cfg.locals_in_union:
    hull = (min(b[0] for b in globals_), min(b[1] for b in globals_),
            max(b[2] for b in globals_), max(b[3] for b in globals_))
    largest = max(globals_, key=box_area)
  for _ in range(cfg.num_local):
    if not cfg.locals_in_union:
      locals_.append(random_resized_box(rng, image, area, cfg.local_scale, cfg.ratio))
      continue
    for _ in range(1 + cfg.max_redraws):
      box = random_resized_box(rng, hull, area, cfg.local_scale, cfg.ratio)
      if covered_area(box, globals_) == box_area(box):
        break
    else:
      box = random_resized_box(rng, largest, area, cfg.local_scale, cfg.ratio)
    locals_.append(box)
  return np.asarray(globals_ + locals_, np.float32).reshape(-1, 4)


def sample_views(rng: np.random.Generator, image_hw: tuple[int, int], cfg
                 ) -> dict[str, np.ndarray]:
  """Every random choice of one record's views, deterministic from `rng`.

  cfg: `config.crops`. Returns the view dict (module docstring), leading axis V.
  """
  check_crops_config(cfg)
  boxes = sample_boxes(rng, image_hw, cfg)
  flips = rng.random(len(boxes)) < cfg.flip_p
  return {"boxes": boxes, "flips": flips, **sample_photometric(rng, cfg)}


# ------------------------------------------------------------- host rendering

def _check_image(image, name: str) -> None:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{name}: image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")


def _integer_box(box: np.ndarray) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1) of a sampled box, whose corners are whole pixels."""
  corners = tuple(int(round(float(b))) for b in box)
  if not np.allclose(box, corners):
    raise ValueError(f"render_views: crop boxes have integer corners, got {box}")
  return corners


def render_views(image: np.ndarray, views: dict, cfg) -> dict[str, np.ndarray]:
  """Host renderer (grain workers): the normalised crops of one record.

  image: [H, W, 3] uint8. Crop, then resize with PIL's antialiased bicubic filter
  (a = -0.5) in C: torchvision's `resized_crop` on PIL images, so the filter stops
  at the box's edges as at the image's; the photometric ops run vectorised in NumPy.
  Returns global_crops [G, Sg, Sg, 3] and local_crops [L, Sl, Sl, 3], float32.
  """
  _check_image(image, "render_views")
  pil = Image.fromarray(image)
  crops = []
  for v, box in enumerate(views["boxes"]):
    size = cfg.global_size if v < cfg.num_global else cfg.local_size
    crop = pil.crop(_integer_box(box)).resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(crop, np.float32) / 255.0  # [S, S, 3]
    if views["flips"][v]:
      x = x[:, ::-1]
    crops.append(photometric_np(x, {k: views[k][v] for k in PHOTOMETRIC_KEYS}, cfg))
  g = cfg.num_global
  local = (np.stack(crops[g:]) if crops[g:] else
           np.zeros((0, cfg.local_size, cfg.local_size, 3), np.float32))
  return {"global_crops": np.stack(crops[:g]), "local_crops": local}


def augment_record(image: np.ndarray, rng: np.random.Generator, cfg,
                   image_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """What a grain worker emits for one record (docs/DESIGN.md, the pre-training batch).

  augment_on='host': global_crops, local_crops, boxes, flips. augment_on='device':
  image (uint8; every image of a batch must share one shape), boxes, flips; the
  step draws the photometric parameters and renders (`augment_batch_jax`).
  `image_hw`: the valid (h, w) at the top-left of a padded image (default: all of it);
  boxes are drawn inside it.
  """
  _check_image(image, "augment_record")
  views = sample_views(rng, image_hw or image.shape[:2], cfg)
  out = {"boxes": views["boxes"], "flips": views["flips"]}
  if cfg.augment_on == "host":
    return {**render_views(image, views, cfg), **out}
  return {"image": image, **out}


def collate(records: Sequence[dict]) -> dict[str, np.ndarray]:
  """Stacks per-record dicts (`augment_record` outputs) into batch arrays [B, ...]."""
  if not records:
    raise ValueError("collate: no records")
  keys = set(records[0])
  for i, r in enumerate(records):
    if set(r) != keys:
      raise ValueError(f"collate: record {i} has keys {sorted(r)}, expected {sorted(keys)}")
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


# ----------------------------------------------------------- device rendering

def keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic convolution kernel with a = -0.5 (PIL's BICUBIC) at distances x."""
  x, a = jnp.abs(x), -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resample_weights(start: jax.Array, extent: jax.Array, out_size: int, in_size: int,
                     valid: jax.Array | int) -> jax.Array:
  """[out_size, in_size] weights resampling the source span [start, start + extent).

  Output pixel u samples source coordinate c_u = start + (u + 0.5) extent / out_size;
  source pixel i is centred at i + 0.5 and weighs k((i + 0.5 - c_u) / max(1, step))
  with the Keys cubic k, stretched when downsampling (antialiasing: PIL's and
  `jax.image.scale_and_translate`'s rule). Only pixels centred inside the span
  and before `valid` (the image inside its zero padding) weigh; each row is
  normalised to sum to 1 over them. That is PIL resizing a crop of the span
  (torchvision's `resized_crop`): its filter stops at the crop's border.
  """
  step = extent / out_size
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step  # [S]
  pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5                      # [N]
  w = keys_cubic((pixel[None, :] - centre[:, None]) / jnp.maximum(step, 1.0))
  inside = (pixel >= start) & (pixel < start + extent) & (pixel < valid)
  w = jnp.where(inside[None, :], w, 0.0)
  total = jnp.sum(w, axis=-1, keepdims=True)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def resized_crops_jax(image: jax.Array, boxes: jax.Array, size: int, image_hw=None,
                      dtype: str = "float32") -> jax.Array:
  """[H, W, 3] uint8 -> [V, size, size, 3] float32 in [0, 1]: each box resampled.

  Two separable contractions for all V boxes at once: rows, [V, S, H] x [H, W, 3],
  then columns, [V, S, W] x [V, S, W, 3]; about 2 S H W 3 + 2 S^2 W 3 multiply-adds
  per box (0.5 GFLOP for a 224 px view of a 512^2 source). dtype 'float32' runs
  both at HIGHEST precision; 'bfloat16' runs the rows pass (the larger one) on the
  matrix units with bf16 weights, the pixels as exact bf16 integers 0..255 and
  float32 accumulation, then the columns pass in float32 at default precision
  (weights rounded to 8 bits: ~0.2/255 mean error; PIL itself rounds each pass
  to uint8).
  """
  h, w = image.shape[:2]
  vh, vw = (h, w) if image_hw is None else (image_hw[0], image_hw[1])
  x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
  wy = jax.vmap(lambda s, e: resample_weights(s, e, size, h, vh))(y0, y1 - y0)  # [V, S, H]
  wx = jax.vmap(lambda s, e: resample_weights(s, e, size, w, vw))(x0, x1 - x0)  # [V, S, W]
  compute = RESAMPLE_DTYPES[dtype]
  fast = compute != jnp.float32
  rows = jnp.einsum("vsh,hwc->vswc", wy.astype(compute), image.astype(compute),
                    precision=None if fast else jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)                          # [V, S, W, 3]
  out = jnp.einsum("vtw,vswc->vstc", wx, rows,
                   precision=None if fast else jax.lax.Precision.HIGHEST)
  return jnp.clip(out / 255.0, 0.0, 1.0)  # PIL clamps the cubic's overshoot too


def render_views_jax(image: jax.Array, views: dict, cfg, image_hw=None) -> dict[str, jax.Array]:
  """Device renderer, the same views as `render_views`; jittable, vmappable.

  image: [H, W, 3] uint8 (image_hw: the valid (h, w) at its top-left, default all).
  views: the view dict (arrays, leading axis V). `cfg.device_resample` picks the
  resampling precision (`resized_crops_jax`).
  Returns global_crops [G, Sg, Sg, 3] and local_crops [L, Sl, Sl, 3], float32.
  """
  g = cfg.num_global
  photo = {k: views[k] for k in PHOTOMETRIC_KEYS}
  out = {}
  for name, size, part in (("global_crops", cfg.global_size, slice(None, g)),
                           ("local_crops", cfg.local_size, slice(g, None))):
    x = resized_crops_jax(image, views["boxes"][part], size, image_hw,
                          cfg.device_resample)                          # [V', S, S, 3]
    x = jnp.where(views["flips"][part][:, None, None, None], x[:, :, ::-1], x)
    sub = jax.tree.map(lambda a, part=part: a[part], photo)
    out[name] = jax.vmap(lambda v, p: photometric_jax(v, p, cfg))(x, sub)
  return out


def render_batch_jax(images: jax.Array, views: dict, cfg, image_hw=None) -> dict[str, jax.Array]:
  """`render_views_jax` over a batch: images [B, H, W, 3] uint8, views [B, V, ...],
  image_hw [B, 2] or None."""
  # vmap passes a None image_hw through as an empty tree.
  return jax.vmap(lambda im, v, hw: render_views_jax(im, v, cfg, hw))(images, views, image_hw)


def augment_batch_jax(key: jax.Array, batch: dict, cfg) -> dict[str, jax.Array]:
  """Device augmentation inside the step (augment_on='device').

  batch: image [B, H, W, 3] uint8, boxes [B, V, 4], flips [B, V] (from
  `augment_record`), optionally image_hw [B, 2] (the valid part of padded images).
  Draws the photometric parameters from `key` and returns the host-mode batch:
  global_crops, local_crops, boxes, flips.
  """
  views = {"boxes": batch["boxes"], "flips": batch["flips"],
           **sample_photometric_jax(key, cfg, batch["image"].shape[0])}
  return {**render_batch_jax(batch["image"], views, cfg, batch.get("image_hw")),
          "boxes": batch["boxes"], "flips": batch["flips"]}
