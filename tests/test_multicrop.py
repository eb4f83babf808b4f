"""Multi-crop views: box geometry and overlap rules, photometric ops against hand-written
NumPy, host/device renderer parity, host/device sampler distributions."""

import colorsys
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter
import pytest

from glare_jax.configs.common import crops_config, pretrain_config
from glare_jax.data import multicrop as mc
from glare_jax.data import photometric as ph

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def crops(**overrides):
  cfg = crops_config()
  cfg.update(overrides)
  return cfg


def tiny_cfg(**overrides):
  cfg = pretrain_config("loveda", "tiny").crops  # 64 px globals, 4 x 32 px locals
  cfg.update(overrides)
  return cfg


def draw_many(cfg, image_hw, n, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([mc.sample_boxes(rng, image_hw, cfg) for _ in range(n)]).astype(np.int64)


def union_mask(boxes, hw):
  mask = np.zeros(hw, bool)
  for x0, y0, x1, y1 in boxes:
    mask[y0:y1, x0:x1] = True
  return mask


def textured_image(h, w, seed=0):
  """Smooth colour gradients plus pixel noise: every resampling detail shows."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([128 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
  return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------- sampling

def test_sample_views_deterministic_with_documented_layout():
  cfg = crops_config()
  a = mc.sample_views(np.random.default_rng(7), (480, 640), cfg)
  b = mc.sample_views(np.random.default_rng(7), (480, 640), cfg)
  c = mc.sample_views(np.random.default_rng(8), (480, 640), cfg)
  v = cfg.num_global + cfg.num_local
  expected = {"boxes": ((v, 4), np.float32), "flips": ((v,), np.bool_),
              "jitter": ((v,), np.bool_), "jitter_order": ((v, 4), np.int32),
              "jitter_factors": ((v, 4), np.float32), "grayscale": ((v,), np.bool_),
              "blur": ((v,), np.bool_), "blur_sigma": ((v,), np.float32),
              "solarize": ((v,), np.bool_)}
  assert {k: (x.shape, x.dtype) for k, x in a.items()} == expected
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["boxes"], c["boxes"])


def test_boxes_follow_random_resized_crop_ranges():
  cfg = crops(global_overlap=False, locals_in_union=False)
  h, w = 300, 400
  boxes = draw_many(cfg, (h, w), 300)  # [N, V, 4]
  assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= w).all() and (boxes[..., 3] <= h).all()
  bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
  assert (bw > 0).all() and (bh > 0).all()
  frac, aspect = bw * bh / (h * w), bw / bh
  # w and h are rounded to pixels: allow the rounding's effect on area and aspect.
  tol_area = lambda s: 2.0 / np.sqrt(s * h * w)
  for sl, (lo, hi) in ((slice(0, 2), cfg.global_scale), (slice(2, None), cfg.local_scale)):
    f, a = frac[:, sl], aspect[:, sl]
    assert f.min() >= lo * (1 - tol_area(lo)) and f.max() <= hi * (1 + tol_area(lo)), (f.min(), f.max())
    rt = 1.0 / np.sqrt(lo * h * w)
    assert a.min() >= 0.75 * (1 - 2 * rt) and a.max() <= 4 / 3 * (1 + 2 * rt)
    assert f.max() - f.min() > 0.8 * (hi - lo)  # the range is used, not one value
  # the offset is uniform: boxes reach both image edges about equally often
  assert abs((boxes[..., 0] == 0).mean() - (boxes[..., 2] == w).mean()) < 0.05


def test_random_resized_box_central_fallback():
  rng = np.random.default_rng(0)
  # A target area far larger than the frame never fits: torchvision's central crop,
  # aspect clamped to the ratio range.
  tall = mc.random_resized_box(rng, (10, 20, 110, 320), 1e9, (0.5, 1.0), (0.75, 4 / 3))
  assert tall == (10, 20 + (300 - 133) // 2, 110, 20 + (300 - 133) // 2 + 133)
  wide = mc.random_resized_box(rng, (0, 0, 400, 100), 1e9, (0.5, 1.0), (0.75, 4 / 3))
  assert wide == ((400 - 133) // 2, 0, (400 - 133) // 2 + 133, 100)
  square = mc.random_resized_box(rng, (0, 0, 90, 100), 1e9, (0.5, 1.0), (0.75, 4 / 3))
  assert square == (0, 0, 90, 100)


@pytest.mark.parametrize("max_redraws", [100, 0])
def test_second_global_always_overlaps_first(max_redraws):
  # A long thin image: independent global boxes often miss each other.
  hw = (100, 300)
  boxes = draw_many(crops(max_redraws=max_redraws, num_local=0), hw, 400)
  overlap = [mc.overlap_area(tuple(b[0]), tuple(b[1])) for b in boxes]
  assert min(overlap) > 0
  free = draw_many(crops(global_overlap=False, num_local=0), hw, 400)
  assert min(mc.overlap_area(tuple(b[0]), tuple(b[1])) for b in free) == 0  # the rule matters


@pytest.mark.parametrize("max_redraws", [100, 0])
def test_locals_inside_union_of_globals(max_redraws):
  hw = (120, 200)
  boxes = draw_many(crops(max_redraws=max_redraws), hw, 150)
  for b in boxes:
    mask = union_mask(b[:2], hw)  # pixel raster of the union, an independent check
    for x0, y0, x1, y1 in b[2:]:
      assert mask[y0:y1, x0:x1].all()
  free = draw_many(crops(locals_in_union=False), hw, 150)
  assert not all(union_mask(b[:2], hw)[y0:y1, x0:x1].all()
                 for b in free for x0, y0, x1, y1 in b[2:])  # the rule matters


def test_covered_area_is_exact():
  rng = np.random.default_rng(3)
  for _ in range(200):
    boxes = []
    for _ in range(3):
      x0, y0 = rng.integers(0, 30, 2)
      boxes.append((int(x0), int(y0), int(x0 + rng.integers(1, 20)), int(y0 + rng.integers(1, 20))))
    box, a, b = boxes
    inclusion_exclusion = (mc.overlap_area(box, a) + mc.overlap_area(box, b)
                           - mc.box_area((max(box[0], a[0], b[0]), max(box[1], a[1], b[1]),
                                          min(box[2], a[2], b[2]), min(box[3], a[3], b[3]))))
    raster = (union_mask([a, b], (60, 60))[box[1]:box[3], box[0]:box[2]]).sum()
    assert mc.covered_area(box, [a, b]) == inclusion_exclusion == raster


def test_flip_frequency():
  cfg = crops_config()
  rng = np.random.default_rng(0)
  flips = np.stack([mc.sample_views(rng, (64, 64), cfg)["flips"] for _ in range(500)])
  assert abs(flips.mean() - 0.5) < 4.5 * math.sqrt(0.25 / flips.size)
  never = mc.sample_views(rng, (64, 64), crops(flip_p=0.0))["flips"]
  always = mc.sample_views(rng, (64, 64), crops(flip_p=1.0))["flips"]
  assert not never.any() and always.all()


# ----------------------------------------------------------- photometric ops

def ref_hue(x, f):
  out = np.zeros_like(x, np.float64)
  for i, j in np.ndindex(x.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*x[i, j].astype(np.float64))
    out[i, j] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
  return out


def all_ops(x, xp):
  """Every op on x [9, 9, 3], a dict of outputs (jitted as one function for jnp)."""
  out = {"brightness": ph.adjust_brightness(x, 1.3, xp),
         "contrast_low": ph.adjust_contrast(x, 0.7, xp),
         "contrast_high": ph.adjust_contrast(x, 1.4, xp),
         "saturation": ph.adjust_saturation(x, 1.2, xp),
         "grayscale": ph.grayscale(x, xp),
         "normalize": ph.normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), xp),
         "solarize": ph.solarize(xp.arange(256, dtype=xp.float32) / 255, 128, xp)}
  for f in (-0.1, 0.07, 0.5):
    out[f"hue{f}"] = ph.adjust_hue(x, f, xp)
  return out


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_photometric_ops_match_references(xp):
  rng = np.random.default_rng(0)
  x = rng.random((9, 9, 3), dtype=np.float32)
  x[0, 0] = 0.5  # gray pixels: hue undefined, must stay gray
  x[0, 1] = [0.2, 0.9, 0.9]  # two channels tie at the max
  gray = x @ LUMA
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  want = {"brightness": np.clip(1.3 * x, 0, 1),
          "contrast_low": np.clip(0.7 * x + 0.3 * gray.mean(), 0, 1),
          "contrast_high": np.clip(1.4 * x - 0.4 * gray.mean(), 0, 1),
          "saturation": np.clip(1.2 * x - 0.2 * gray[..., None], 0, 1),
          "grayscale": np.repeat(gray[..., None], 3, -1),
          "normalize": (x - mean) / std,
          # PIL's ImageOps.solarize table on the 0..255 levels
          "solarize": np.array([v if v < 128 else 255 - v for v in range(256)]) / 255}
  for f in (-0.1, 0.07, 0.5):
    want[f"hue{f}"] = ref_hue(x, f)
  got = all_ops(x, np) if xp is np else jax.jit(functools.partial(all_ops, xp=jnp))(x)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=2e-6, err_msg=k)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_blur_is_pils_gaussian_blur(xp):
  """DINO blurs with PIL's ImageFilter.GaussianBlur(radius=sigma): three extended box
  passes per axis, not a true Gaussian (which is up to ~25 grey levels away from it
  on this image). Ours is PIL's in float; PIL rounds to uint8 after each of its six
  passes, so: measured mean |diff| <= 0.9, max <= 2.9 grey levels. Taps padded to a
  larger static half width (the device's) give the same blur."""
  image = textured_image(48, 56)
  x = image.astype(np.float32) / 255
  blur = ph.gaussian_blur if xp is np else jax.jit(functools.partial(ph.gaussian_blur, xp=jnp),
                                                   static_argnums=2)
  for sigma in (0.1, 0.3, 0.7, 1.37, 2.0):
    pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)),
                     np.float32)
    got = np.asarray(blur(x, np.float32(sigma), ph.blur_radius(sigma))) * 255
    diff = np.abs(got - pil)
    assert diff.mean() < 1.0 and diff.max() < 3.5, (sigma, diff.mean(), diff.max())
    np.testing.assert_allclose(np.asarray(blur(x, np.float32(sigma), 4)) * 255, got, atol=1e-3)


def test_jitter_order_is_applied_in_sequence():
  rng = np.random.default_rng(1)
  x = rng.random((8, 8, 3), dtype=np.float32)
  factors = np.array([1.35, 0.65, 1.2, 0.08], np.float32)
  fns = [lambda y: np.clip(factors[0] * y, 0, 1),
         lambda y: np.clip(factors[1] * y + (1 - factors[1]) * (y @ LUMA).mean(), 0, 1),
         lambda y: np.clip(factors[2] * y + (1 - factors[2]) * (y @ LUMA)[..., None], 0, 1),
         lambda y: ref_hue(y, factors[3])]
  jitter_jax = jax.jit(ph._jitter_jax)
  outs = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
    ref = x
    for op in order:
      ref = fns[op](ref)
    np.testing.assert_allclose(ph._jitter_np(x, order, factors), ref, atol=1e-5)
    np.testing.assert_allclose(jitter_jax(x, jnp.asarray(order, jnp.int32), factors), ref, atol=1e-5)
    outs.append(ref)
  assert np.abs(outs[0] - outs[1]).max() > 0.01  # the order matters on this input


def test_photometric_chain_host_equals_device():
  cfg = tiny_cfg()
  rng = np.random.default_rng(2)
  x = rng.random((cfg.local_size, cfg.local_size, 3), dtype=np.float32)
  chain = jax.jit(jax.vmap(lambda p: ph.photometric_jax(x, p, cfg)))
  params = ph.sample_photometric(rng, tiny_cfg(jitter_p=0.5, grayscale_p=0.3, blur_p=(0.5,) * 3,
                                               solarize_p=(0.5,) * 3, num_local=30))
  dev = np.asarray(chain(params))
  for v in range(len(params["blur"])):
    host = ph.photometric_np(x, {k: a[v] for k, a in params.items()}, cfg)
    np.testing.assert_allclose(dev[v], host, atol=3e-5)


def test_device_sampler_matches_host_distributions():
  cfg = crops_config()
  n = 3000
  rng = np.random.default_rng(0)
  host = [ph.sample_photometric(rng, cfg) for _ in range(n)]
  host = {k: np.stack([h[k] for h in host]) for k in host[0]}
  draw = jax.jit(lambda key: ph.sample_photometric_jax(key, cfg, n))
  dev = {k: np.asarray(a) for k, a in draw(jax.random.key(0)).items()}
  blur_p, solarize_p = ph.view_probabilities(cfg)
  np.testing.assert_allclose(blur_p, [1.0, 0.1] + [0.5] * 10)
  np.testing.assert_allclose(solarize_p, [0.0, 0.2] + [0.0] * 10)
  v = cfg.num_global + cfg.num_local
  probs = {"jitter": np.full(v, cfg.jitter_p), "grayscale": np.full(v, cfg.grayscale_p),
           "blur": blur_p, "solarize": solarize_p}
  low, high = ph.jitter_ranges(cfg)
  np.testing.assert_allclose(low, [0.6, 0.6, 0.8, -0.1], atol=1e-7)
  np.testing.assert_allclose(high, [1.4, 1.4, 1.2, 0.1], atol=1e-7)
  qs = np.linspace(0.1, 0.9, 9)
  for draws in (host, dev):
    assert {k: a.shape for k, a in draws.items()} == {k: (n,) + a.shape[1:] for k, a in host.items()}
    for key, p in probs.items():  # per view: 4.5 standard errors (exact where p is 0 or 1)
      freq = draws[key].astype(np.float64).mean(0)
      assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n)), (key, freq)
    order = draws["jitter_order"].reshape(-1, 4)
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # permutations
    pos = np.stack([(order == op).mean(0) for op in range(4)])  # [op, position]
    assert np.abs(pos - 0.25).max() < 4.5 * math.sqrt(0.25 * 0.75 / len(order))
    factors = draws["jitter_factors"].reshape(-1, 4)
    for i in range(4):
      f = factors[:, i]
      assert low[i] <= f.min() and f.max() <= high[i]
      np.testing.assert_allclose(np.quantile(f, qs), low[i] + qs * (high[i] - low[i]),
                                 atol=0.01 * (high[i] - low[i]))
    s = draws["blur_sigma"].ravel()
    np.testing.assert_allclose(np.quantile(s, qs), 0.1 + qs * 1.9, atol=0.01 * 1.9)
  for key in probs:  # and the two samplers agree with each other
    np.testing.assert_allclose(host[key].mean(0), dev[key].mean(0), atol=0.06)


# ------------------------------------------------------------------ rendering

RENDER_HW = (200, 256)  # one source shape for every jitted render: one compilation


@pytest.fixture(scope="module")
def render_jax():
  cfg = tiny_cfg()
  return cfg, jax.jit(functools.partial(mc.render_views_jax, cfg=cfg))


def no_photometric(views):
  out = dict(views)
  for k in ("jitter", "grayscale", "blur", "solarize"):
    out[k] = np.zeros_like(views[k])
  return out


def unnormalise(x, cfg):
  return np.asarray(x) * np.array(cfg.std) + np.array(cfg.mean)


def test_box_convention_on_a_coordinate_image(render_jax):
  """Red = column index, green = row index: every pixel shows where it came from.

  Output pixel u of a crop of size S samples x = x0 + (u + 0.5) (x1 - x0) / S; source
  pixel i is centred at i + 0.5 and holds the value i, so the crop shows x - 0.5
  where the cubic's support lies inside the box (it reproduces a linear ramp; at
  the box's edges the filter is cut, as PIL's at a crop's border: those pixels are
  compared with PIL). PIL rounds to uint8 (error <= 0.5); the device is exact to
  ~0.01. A slip of half a source pixel anywhere in the convention fails both bounds.
  """
  cfg, render_dev = render_jax
  h, w = RENDER_HW
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
  # globals: downscaled, one tall; locals: upscaled, downscaled, off-centre
  boxes = np.array([[20, 30, 180, 150], [60, 10, 140, 190], [100, 60, 120, 90],
                    [30, 100, 110, 180], [200, 20, 240, 60], [10, 10, 50, 50]], np.float32)
  for flips in (np.zeros(6, bool), np.array([1, 0, 1, 0, 1, 1], bool)):
    views = no_photometric(mc.sample_views(np.random.default_rng(0), (h, w), cfg))
    views.update(boxes=boxes, flips=flips)
    host, dev = mc.render_views(image, views, cfg), render_dev(image, views)
    for out, atol in ((host, 0.5 + 1e-3), (dev, 0.05)):
      crops = list(out["global_crops"]) + list(out["local_crops"])
      for v, (crop, (x0, y0, x1, y1)) in enumerate(zip(crops, boxes)):
        s = crop.shape[0]
        rgb = unnormalise(crop, cfg) * 255  # [S, S, 3]
        u = np.arange(s)
        src = u[::-1] if flips[v] else u  # a flipped view's pixel u is unflipped pixel S-1-u
        want_x = x0 + (src + 0.5) * (x1 - x0) / s - 0.5
        want_y = y0 + (u + 0.5) * (y1 - y0) / s - 0.5
        # the cubic's support (2 source pixels, stretched when downscaling) inside the box
        in_x = np.abs(want_x + 0.5 - (x0 + x1) / 2) + 2 * max(1, (x1 - x0) / s) <= (x1 - x0) / 2
        in_y = np.abs(want_y + 0.5 - (y0 + y1) / 2) + 2 * max(1, (y1 - y0) / s) <= (y1 - y0) / 2
        assert in_x.sum() > s // 2 and in_y.sum() > s // 2
        np.testing.assert_allclose(rgb[:, in_x, 0], np.broadcast_to(want_x[in_x], (s, in_x.sum())),
                                   atol=atol)
        np.testing.assert_allclose(rgb[in_y, :, 1], np.broadcast_to(want_y[in_y, None],
                                                                    (in_y.sum(), s)), atol=atol)
        # the centre of the crop shows the centre of the box
        centre = rgb[s // 2 - 1:s // 2 + 1, s // 2 - 1:s // 2 + 1, :2].mean((0, 1))
        np.testing.assert_allclose(centre, [(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5], atol=atol)
    for k in host:   # everywhere, the box edges included: the device is PIL up to its rounding
      np.testing.assert_allclose(unnormalise(dev[k], cfg) * 255, unnormalise(host[k], cfg) * 255,
                                 atol=0.5 + 0.05)


def test_host_and_device_renderers_agree(render_jax):
  """The same views through PIL + NumPy and through jax.numpy.

  Both resample with the antialiased Keys cubic (a = -0.5). PIL works in 8-bit
  fixed point and rounds to uint8 after each of its two passes (up to 0.5/255 per
  pass), the device keeps float32; jitter factors up to 1.4 amplify that. Measured
  here: mean |diff| <= 0.22/255, 99.9th percentile <= 1.6/255. Shifting the device
  boxes by a quarter pixel gives a mean >= 0.9/255 (half a pixel: ~2/255), so the
  bounds below catch any slip in the box convention. Without the photometric ops
  every pixel, the crops' edges included, is within PIL's two roundings (measured
  max ~1.0/255); a filter that read past the box's edge would be off by up to ~10.
  """
  cfg, render_dev = render_jax
  image = textured_image(*RENDER_HW)
  rng = np.random.default_rng(5)
  for i in range(4):
    views = mc.sample_views(rng, image.shape[:2], cfg)
    views = no_photometric(views) if i == 3 else views
    host = mc.render_views(image, views, cfg)
    dev = render_dev(image, views)
    for k in ("global_crops", "local_crops"):
      assert dev[k].shape == host[k].shape
      diff = np.abs(unnormalise(dev[k], cfg) - unnormalise(host[k], cfg)) * 255
      assert diff.mean() < 0.5 and np.quantile(diff, 0.999) < 4.0, (k, diff.mean(), diff.max())
      if i == 3:
        assert diff.max() < 1.25, (k, diff.max())


def test_host_and_device_renderers_agree_on_loveda(render_jax, loveda_sample):
  cfg, render_dev = render_jax
  path = loveda_sample / "Train" / "Rural" / "images_png" / "0.png"
  image = np.asarray(Image.open(path).convert("RGB"))[300:500, 200:456]
  views = mc.sample_views(np.random.default_rng(0), image.shape[:2], cfg)
  host, dev = mc.render_views(image, views, cfg), render_dev(image, views)
  for k in host:
    diff = np.abs(unnormalise(dev[k], cfg) - unnormalise(host[k], cfg)) * 255
    assert diff.mean() < 0.5, (k, diff.mean())


def test_device_resampling_equals_jax_scale_and_translate():
  """`resized_crops_jax` (float32) is torchvision's resized_crop in float: the box
  cut out, then resized with jax.image.scale_and_translate's antialiased Keys
  cubic (which, like PIL, renormalises the filter at the border of what it is
  given), for up- and downscaled boxes."""
  image = textured_image(*RENDER_HW)
  boxes = np.array([[20, 30, 180, 150], [60, 10, 140, 190], [100, 60, 120, 90],
                    [0, 0, 256, 200], [200, 20, 240, 60]], np.float32)
  ours = jax.jit(lambda im, b: mc.resized_crops_jax(im, b, 48))(image, boxes)
  for box, crop in zip(boxes, np.asarray(ours)):
    x0, y0, x1, y1 = box.astype(int)
    cut = jnp.asarray(image[y0:y1, x0:x1], jnp.float32) / 255.0
    ref = jax.image.scale_and_translate(
        cut, (48, 48, 3), (0, 1), jnp.array([48 / (y1 - y0), 48 / (x1 - x0)]),
        jnp.zeros(2), method="cubic", antialias=True, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(crop, np.clip(ref, 0, 1), atol=1e-5)


def test_bfloat16_resampling_is_close_and_padding_is_ignored():
  """'bfloat16' resampling stays within a fraction of a grey level of 'float32';
  the zero padding right/below the valid (h, w) never leaks into a crop."""
  image = textured_image(*RENDER_HW)
  rng = np.random.default_rng(3)
  cfg = tiny_cfg()
  boxes = np.concatenate([mc.sample_boxes(rng, image.shape[:2], cfg) for _ in range(4)])
  render = jax.jit(mc.resized_crops_jax, static_argnums=(2, 4))
  exact = np.asarray(render(image, boxes, 40, None, "float32")) * 255
  fast = np.asarray(render(image, boxes, 40, None, "bfloat16")) * 255
  diff = np.abs(fast - exact)
  assert diff.mean() < 0.3 and diff.max() < 2.0, (diff.mean(), diff.max())
  padded = np.zeros((256, 300, 3), np.uint8)
  padded[:200, :256] = image
  hw = np.array([200, 256])
  inside = np.asarray(render(padded, boxes, 40, hw, "float32")) * 255
  np.testing.assert_allclose(inside, exact, atol=1e-3)
  # A crop reads only its box; image_hw also guards a box that pokes past the image.
  np.testing.assert_allclose(np.asarray(render(padded, boxes, 40, None, "float32")) * 255,
                             exact, atol=1e-3)
  over = np.array([[200, 150, 280, 230]], np.float32)
  guarded = np.asarray(render(padded, over, 40, hw, "float32")) * 255
  leaked = np.asarray(render(padded, over, 40, None, "float32")) * 255
  assert np.abs(guarded - leaked).max() > 1.0   # the zeros mix in without image_hw


def test_flipped_view_mirrors_unflipped():
  cfg = tiny_cfg()
  image = textured_image(90, 120)
  views = mc.sample_views(np.random.default_rng(4), image.shape[:2], cfg)
  views["flips"] = np.zeros_like(views["flips"])
  plain = mc.render_views(image, views, cfg)
  views["flips"] = np.ones_like(views["flips"])
  flipped = mc.render_views(image, views, cfg)
  for k in plain:  # exact: every photometric op is per pixel or mirror-symmetric
    np.testing.assert_allclose(flipped[k], plain[k][:, :, ::-1], atol=1e-6)


def test_records_collate_into_the_step_batch():
  images = [textured_image(80, 100, seed=i) for i in range(3)]
  cfg = tiny_cfg()
  rngs = lambda: [np.random.default_rng(i) for i in range(3)]
  batch = mc.collate([mc.augment_record(im, r, cfg) for im, r in zip(images, rngs())])
  g, l, sg, sl = cfg.num_global, cfg.num_local, cfg.global_size, cfg.local_size
  assert {k: a.shape for k, a in batch.items()} == {
      "global_crops": (3, g, sg, sg, 3), "local_crops": (3, l, sl, sl, 3),
      "boxes": (3, g + l, 4), "flips": (3, g + l)}
  dev_cfg = tiny_cfg(augment_on="device")
  dev_batch = mc.collate([mc.augment_record(im, r, dev_cfg) for im, r in zip(images, rngs())])
  assert set(dev_batch) == {"image", "boxes", "flips"} and dev_batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(dev_batch["boxes"], batch["boxes"])  # same rng, same geometry
  # the device path yields the host-mode batch (its values: the parity tests above)
  out = jax.eval_shape(functools.partial(mc.augment_batch_jax, cfg=dev_cfg),
                       jax.random.key(0), dev_batch)
  assert {k: (a.shape, a.dtype) for k, a in out.items()} == {
      k: (a.shape, a.dtype) for k, a in batch.items()}


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="crops.blur_p"):
    mc.sample_views(np.random.default_rng(0), (64, 64), crops(blur_p=(1.0, 0.1)))
  with pytest.raises(ValueError, match="crops.hue"):
    mc.sample_views(np.random.default_rng(0), (64, 64), crops(hue=0.7))
  with pytest.raises(ValueError, match="crops.local_size"):
    mc.sample_views(np.random.default_rng(0), (64, 64), crops(local_size=0))
  with pytest.raises(ValueError, match="uint8"):
    mc.render_views(np.zeros((8, 8, 3), np.float32), {}, crops_config())
  with pytest.raises(ValueError, match="no records"):
    mc.collate([])
