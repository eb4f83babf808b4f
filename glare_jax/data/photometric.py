"""Photometric augmentation of the multi-crop views (BYOL / DINO recipe, appendix B.1).

Per view, after cropping and flipping: colour jitter (probability `jitter_p`, the four
ops in a random order as torchvision's `ColorJitter`), grayscale, Gaussian blur,
solarisation, then ImageNet normalisation.

Every op works on float images in [0, 1] shaped [..., S, S, 3] and is written once
against an array module `xp` (`numpy` on the host, `jax.numpy` on the device), so
the two renderers apply the same formulas. The formulas are torchvision's for float
tensors (`_functional_tensor.py`):

    brightness  clip(f * x, 0, 1)
    contrast    clip(f * x + (1 - f) * mean(luma(x)), 0, 1)   (mean over the whole view)
    saturation  clip(f * x + (1 - f) * luma(x), 0, 1)
    hue         RGB -> HSV, h <- (h + f) mod 1, HSV -> RGB
    grayscale   luma(x) in all three channels
    solarize    x >= threshold / 255  ->  1 - x   (PIL's ImageOps.solarize rule)

`luma` is ITU-R 601-2 (0.299, 0.587, 0.114), the weights of PIL's `convert('L')`
that the PIL-based DINO pipeline uses; torchvision's tensor path rounds red to
0.2989. Unlike the PIL pipeline we do not round to uint8 between ops.

Blur is PIL's `ImageFilter.GaussianBlur(radius=sigma)`, which DINO calls: along
each axis three passes of an "extended" box of radius l + a (Pillow's BoxBlur.c:
taps 1 within l, a at l + 1, normalised; l and a chosen so that three passes have
variance sigma^2), edge pixels replicated at every pass; in float, without PIL's
uint8 rounding after each pass.

The random parameters of one view (the "photometric keys" of a view dict):

    jitter          bool      apply colour jitter
    jitter_order    int32 [4] op ids in application order (0 brightness, 1 contrast,
                              2 saturation, 3 hue), a uniform random permutation
    jitter_factors  f32 [4]   factor of each op, indexed by op id
    grayscale       bool
    blur            bool
    blur_sigma      f32       drawn for every view, used where `blur`
    solarize        bool
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LUMA = (0.299, 0.587, 0.114)
PHOTOMETRIC_KEYS = ("jitter", "jitter_order", "jitter_factors", "grayscale", "blur",
                    "blur_sigma", "solarize")


# ----------------------------------------------------------------------------- ops

def luma(x, xp=np):
  """[..., S, S, 3] -> [..., S, S] ITU-R 601-2 luma."""
  return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


def _blend(x, ref, f, xp):
  return xp.clip(f * x + (1.0 - f) * ref, 0.0, 1.0)


def adjust_brightness(x, f, xp=np):
  return _blend(x, 0.0, f, xp)


def adjust_contrast(x, f, xp=np):
  """Blend with the view's mean luma. x: [S, S, 3] (one view; the mean is per view)."""
  return _blend(x, xp.mean(luma(x, xp)), f, xp)


def adjust_saturation(x, f, xp=np):
  return _blend(x, luma(x, xp)[..., None], f, xp)


def rgb_to_hsv(x, xp=np):
  """[..., 3] in [0, 1] -> (h, s, v), each [...], h in [0, 1) (colorsys convention)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = xp.maximum(xp.maximum(r, g), b)
  c = v - xp.minimum(xp.minimum(r, g), b)
  s = xp.where(v > 0, c / xp.where(v > 0, v, 1.0), 0.0)
  safe_c = xp.where(c > 0, c, 1.0)
  h_r = (g - b) / safe_c  # in [-1, 1]; wrapped below (cheaper than a float mod)
  h = xp.where(v == r, xp.where(h_r < 0, h_r + 6.0, h_r),
               xp.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
  h = xp.where(c > 0, h / 6.0, 0.0)
  return h, s, v


def hsv_to_rgb(h, s, v, xp=np):
  """(h, s, v), each [...], h in [0, 1] -> [..., 3]. Channel n in (5, 3, 1) for
  (r, g, b): v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6."""
  def channel(n):
    k = n + 6.0 * h
    k = xp.where(k >= 6.0, k - 6.0, k)
    return v - v * s * xp.clip(xp.minimum(k, 4.0 - k), 0.0, 1.0)
  return xp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(x, f, xp=np):
  h, s, v = rgb_to_hsv(x, xp)
  h = h + f
  return hsv_to_rgb(h - xp.floor(h), s, v, xp)  # (h + f) mod 1


def grayscale(x, xp=np):
  return xp.repeat(luma(x, xp)[..., None], 3, axis=-1)


def solarize(x, threshold: float, xp=np):
  """PIL's rule on the 0..255 scale: values >= threshold are inverted."""
  return xp.where(x >= threshold / 255.0, 1.0 - x, x)


def normalize(x, mean, std, xp=np):
  return (x - xp.asarray(mean, x.dtype)) / xp.asarray(std, x.dtype)


BLUR_PASSES = 3   # PIL's GaussianBlur: three box passes along each axis


def box_radius(sigma, xp=np):
  """(l, a): the box radius l + a (l whole, 0 <= a < 1) whose BLUR_PASSES passes
  blur like a Gaussian of `sigma`, as Pillow computes it (after Gwosdek et al.)."""
  s2 = sigma * sigma / BLUR_PASSES
  l = xp.floor((xp.sqrt(12.0 * s2 + 1.0) - 1.0) / 2.0)
  a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
  return l, a


def blur_radius(sigma: float) -> int:
  """Static half width of one box pass for a sigma up to `sigma`: l + 1."""
  return int(box_radius(float(sigma))[0]) + 1


def box_taps(sigma, half: int, xp=np):
  """[2 half + 1] taps of one box pass: 1 for |k| <= l, a at |k| = l + 1, 0 beyond,
  over 2 (l + a) + 1. `half` >= l + 1 is static (the device pads every view's
  taps to the largest sigma's)."""
  l, a = box_radius(sigma, xp)
  k = xp.abs(xp.arange(-half, half + 1, dtype=xp.float32))
  w = xp.where(k <= l, 1.0, xp.where(k == l + 1, a, 0.0))
  return (w / (2 * (l + a) + 1)).astype(xp.float32)


def _box_passes(x, w, half: int, xp):
  """BLUR_PASSES box passes with taps `w` along axis 0, edges replicated:
  out[u] = sum_i w[i] padded[u + i]."""
  n, pad = x.shape[0], ((half, half),) + ((0, 0),) * (x.ndim - 1)
  for _ in range(BLUR_PASSES):
    xpad = xp.pad(x, pad, mode="edge")
    x = sum(w[i] * xpad[i:i + n] for i in range(2 * half + 1))
  return x


def gaussian_blur(x, sigma, half: int, xp=np):
  """PIL's GaussianBlur of one view [S, S, 3]: along rows, then columns."""
  w = box_taps(sigma, half, xp)  # [2 half + 1]
  x = xp.swapaxes(_box_passes(xp.swapaxes(x, 0, 1), w, half, xp), 0, 1)
  return _box_passes(x, w, half, xp)


# ------------------------------------------------------------------ per-view chains

def _jitter_np(x, order, factors):
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  for op in order:
    x = ops[int(op)](x, np.float32(factors[int(op)]))
  return x


def photometric_np(x: np.ndarray, p: dict, cfg) -> np.ndarray:
  """Host chain for one view. x: [S, S, 3] float32 in [0, 1] (cropped, flipped).

  p: that view's photometric parameters (scalars / [4] arrays). Returns the
  normalised view [S, S, 3] float32.
  """
  if p["jitter"]:
    x = _jitter_np(x, p["jitter_order"], p["jitter_factors"])
  if p["grayscale"]:
    x = grayscale(x)
  if p["blur"]:
    sigma = np.float32(p["blur_sigma"])
    x = gaussian_blur(x, sigma, blur_radius(float(sigma)))
  if p["solarize"]:
    x = solarize(x, cfg.solarize_threshold)
  return normalize(x, cfg.mean, cfg.std).astype(np.float32)


def _jitter_jax(x, order, factors):
  """Colour jitter with a traced op order: a 4-step loop, each step a select.

  Step i applies op `order[i]`. Brightness, contrast and saturation are one blend
  with a selected reference (0, mean luma, luma); hue is selected against it.
  Under vmap both sides are computed (one fused elementwise pass). The loop body
  is compiled once; `unroll=True` would let XLA fuse across steps at 4x the
  compile time.
  """
  def step(i, x):
    op = order[i]
    f = factors[op]
    y = luma(x, jnp)
    ref = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(y), y))[..., None]
    return jnp.where(op == 3, adjust_hue(x, f, jnp), _blend(x, ref, f, jnp))
  return jax.lax.fori_loop(0, 4, step, x)


def photometric_jax(x: jax.Array, p: dict, cfg) -> jax.Array:
  """Device chain for one view, the same ops as `photometric_np`; vmap it over views.

  Every op is computed and selected by its flag (static shapes); the blur pads its
  taps to the largest sigma's half width, with zero taps beyond l + 1.
  """
  x = jnp.where(p["jitter"], _jitter_jax(x, p["jitter_order"], p["jitter_factors"]), x)
  x = jnp.where(p["grayscale"], grayscale(x, jnp), x)
  radius = blur_radius(max(cfg.blur_sigma))
  x = jnp.where(p["blur"], gaussian_blur(x, p["blur_sigma"], radius, jnp), x)
  x = jnp.where(p["solarize"], solarize(x, cfg.solarize_threshold, jnp), x)
  return normalize(x, cfg.mean, cfg.std, jnp)


# ---------------------------------------------------------------------- sampling

def view_probabilities(cfg) -> tuple[np.ndarray, np.ndarray]:
  """Per-view blur and solarize probabilities, each [V] float32.

  `cfg.blur_p` / `cfg.solarize_p` are (global 1, global 2, locals); globals after
  the second use the second global's value.
  """
  def expand(p):
    g = [p[min(i, 1)] for i in range(cfg.num_global)]
    return np.asarray(g + [p[2]] * cfg.num_local, np.float32)
  return expand(cfg.blur_p), expand(cfg.solarize_p)


def jitter_ranges(cfg) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) [4] of the jitter factors, torchvision's ranges:
  [max(0, 1 - a), 1 + a] for brightness, contrast, saturation; [-h, h] for hue."""
  b, c, s, h = cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
  low = [max(0.0, 1.0 - b), max(0.0, 1.0 - c), max(0.0, 1.0 - s), -h]
  high = [1.0 + b, 1.0 + c, 1.0 + s, h]
  return np.asarray(low, np.float32), np.asarray(high, np.float32)


def _from_uniforms(u, cfg, xp):
  """Photometric parameters from iid U[0, 1) draws u [..., V, 13], one column per
  choice (flags: u < p; factors and sigma: affine in u; order: argsort of 4 uniforms,
  a uniform random permutation). Host and device share this, only the draws differ."""
  blur_p, solarize_p = view_probabilities(cfg)
  low, high = jitter_ranges(cfg)
  s_low, s_high = cfg.blur_sigma
  return {
      "jitter": u[..., 0] < cfg.jitter_p,
      "jitter_order": xp.argsort(u[..., 1:5], axis=-1).astype(xp.int32),
      "jitter_factors": (low + (high - low) * u[..., 5:9]).astype(xp.float32),
      "grayscale": u[..., 9] < cfg.grayscale_p,
      "blur": u[..., 10] < blur_p,
      "blur_sigma": (s_low + (s_high - s_low) * u[..., 11]).astype(xp.float32),
      "solarize": u[..., 12] < solarize_p,
  }


def sample_photometric(rng: np.random.Generator, cfg) -> dict[str, np.ndarray]:
  """Host draw of every view's photometric parameters (leading axis V)."""
  return _from_uniforms(rng.random((cfg.num_global + cfg.num_local, 13)), cfg, np)


def sample_photometric_jax(key: jax.Array, cfg, batch_size: int | None = None) -> dict:
  """Device draw, the same distributions as `sample_photometric` (jittable).

  Returns arrays shaped [V, ...], or [batch_size, V, ...] when batch_size is given.
  """
  v = cfg.num_global + cfg.num_local
  shape = (v, 13) if batch_size is None else (batch_size, v, 13)
  return _from_uniforms(jax.random.uniform(key, shape), cfg, jnp)
