"""Each loss term against a hand-written NumPy version on small random inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.configs.common import flsl_config
from glare_jax.data import correspondence as corr
from glare_jax.data import regions as reg
from glare_jax.models.heads import CrossAttention
from glare_jax.objectives import common, flsl, glare

RNG = np.random.default_rng(0)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
T_T, T_S = 0.05, 0.1


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


def np_h(t, s, c):
  """H(t, s) = -sum softmax((t - c) / T_t) log_softmax(s / T_s) for one pair of rows."""
  return -np.sum(np_softmax((t - c) / T_T) * np_log_softmax(s / T_S))


def test_cross_entropy_with_centring_and_sharpening():
  t, s, c = RNG.normal(size=(3, 4, 7)), RNG.normal(size=(3, 4, 7)), RNG.normal(size=7)
  got = np.asarray(common.cross_entropy(t, s, c, T_T, T_S))
  want = np.array([[np_h(t[i, j], s[i, j], c) for j in range(4)] for i in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # No gradient flows into the teacher.
  g = jax.grad(lambda t: common.cross_entropy(t, s, c, T_T, T_S).sum())(jnp.asarray(t))
  assert not np.asarray(g).any()


def test_centre_update_and_vector_means():
  c, x = RNG.normal(size=5), RNG.normal(size=(2, 3, 5))
  mask = np.array([[1, 0, 1], [0, 0, 1]], bool)
  np.testing.assert_allclose(common.masked_vector_mean(x), x.reshape(-1, 5).mean(0), rtol=1e-5)
  np.testing.assert_allclose(common.masked_vector_mean(x, mask), x[mask].mean(0), rtol=1e-5)
  np.testing.assert_allclose(common.update_centre(c, x[0, 0], 0.9), 0.9 * c + 0.1 * x[0, 0], rtol=1e-6)


def test_teacher_temperature_schedule():
  spe = 7
  table = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])  # DINO / UDI
  steps = np.arange(0, 100 * spe, 3)
  got = np.asarray(jax.vmap(lambda s: common.teacher_temperature(s, spe, 0.04, 0.07, 30))(steps))
  np.testing.assert_allclose(got, table[steps // spe], rtol=1e-6)
  # Warm-up of 0 or 1 epoch(s).
  np.testing.assert_allclose(common.teacher_temperature(0, spe, 0.04, 0.07, 0), 0.07)
  np.testing.assert_allclose(common.teacher_temperature(0, spe, 0.04, 0.07, 1), 0.04)
  np.testing.assert_allclose(common.teacher_temperature(spe, spe, 0.04, 0.07, 1), 0.07)


def test_ema_schedule_and_update():
  total = 1000
  steps = np.arange(total)
  want = 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * steps / total))  # DINO cosine_scheduler
  got = np.asarray(jax.vmap(lambda s: common.ema_momentum(s, total, 0.996, 1.0))(steps))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(0.996) and got[-1] > 0.99999
  t = {"a": np.ones(3), "b": {"c": np.zeros(2)}}
  s = {"a": np.zeros(3), "b": {"c": np.ones(2)}}
  out = common.ema_update(t, s, 0.9)
  np.testing.assert_allclose(out["a"], 0.9)
  np.testing.assert_allclose(out["b"]["c"], 0.1)
  # Shared (frozen) leaves stay bit-identical whatever the momentum.
  x = RNG.normal(size=1000).astype(np.float32)
  np.testing.assert_array_equal(common.ema_update(x, x, np.float32(0.9961)), x)


def test_glob_loss_pairs():
  b, g, v, k = 3, 2, 5, 6
  s, t, c = RNG.normal(size=(b, v, k)), RNG.normal(size=(b, g, k)), RNG.normal(size=k)
  want = np.mean([np.mean([np_h(t[i, ti], s[i, vi], c) for ti in range(g) for vi in range(v) if vi != ti])
                  for i in range(b)])
  np.testing.assert_allclose(glare.glob_loss(s, t, c, T_T, T_S), want, rtol=1e-5)


def test_loc1_masked_mean_per_view():
  b, g, n, k = 3, 2, 6, 5
  s, t, c = RNG.normal(size=(b, g, n, k)), RNG.normal(size=(b, g, n, k)), RNG.normal(size=k)
  cells = RNG.random((b, g, n)) < 0.4
  cells[0, 1] = False  # a view with r = 0 counts as 0 (denominator clamped at 1)
  per_view = [[sum(np_h(t[i, j, p], s[i, j, p], c) for p in range(n) if cells[i, j, p])
               / max(cells[i, j].sum(), 1) for j in range(g)] for i in range(b)]
  np.testing.assert_allclose(glare.loc1_loss(s, t, cells, c, T_T, T_S), np.mean(per_view), rtol=1e-5)


def np_loc2(s_g, s_l, t_p, cg, cl, c):
  """Explicit bilinear targets q = sum_k w_k softmax((t[idx_k] - c) / T) per matched patch."""
  total, count = 0.0, 0
  b, g = t_p.shape[:2]

  def add(s_row, t_view, index, weight, valid):
    nonlocal total, count
    if not valid:
      return
    target = sum(w * np_softmax((t_view[i] - c) / T_T) for i, w in zip(index, weight))
    total += -np.sum(target * np_log_softmax(s_row / T_S))
    count += 1

  for i in range(b):
    for v in range(g):
      for q in range(s_g.shape[2]):
        add(s_g[i, v, q], t_p[i, 1 - v], cg.index[i, v, q], cg.weight[i, v, q], cg.valid[i, v, q])
    for l in range(s_l.shape[1]):
      for tv in range(g):
        for q in range(s_l.shape[2]):
          add(s_l[i, l, q], t_p[i, tv], cl.index[i, l, tv, q], cl.weight[i, l, tv, q],
              cl.valid[i, l, tv, q])
  return total / count, count


def test_loc2_bilinear_targets_and_masking():
  b, nl, k = 2, 3, 5
  boxes = np.array([[[0, 0, 64, 64], [16, 8, 80, 72], [40, 40, 72, 72], [0, 0, 32, 32], [70, 0, 102, 32]],
                    [[10, 10, 74, 74], [0, 0, 48, 48], [20, 20, 52, 52], [30, 0, 62, 32], [5, 40, 37, 72]]],
                   np.float32)
  flips = np.array([[False, True, False, True, False], [True, False, True, False, False]])
  s_g, t_p = RNG.normal(size=(b, 2, 16, k)), RNG.normal(size=(b, 2, 16, k))
  s_l, c = RNG.normal(size=(b, nl, 4, k)), RNG.normal(size=k)
  obj = glare.GlareObjective(models=None, student_temp=T_S, teacher_temp=T_T, warmup_teacher_temp=T_T,
                             warmup_teacher_temp_epochs=0, center_momentum=0.9, steps_per_epoch=1)
  def loc2(s_g, s_l, t_p, boxes, flips):  # sum of H, matched pairs
    matches = obj._loc2_matches(boxes, flips, (4, 4), (2, 2))
    return obj._loc2_sum(s_g, s_l, t_p, *matches, c, T_T), glare.matched(*matches)

  total, matched = jax.jit(loc2, compiler_options=FAST_COMPILE)(
      s_g, s_l, t_p, jnp.asarray(boxes), jnp.asarray(flips))
  g = lambda x: x[:, :2]
  cg = jax.tree.map(np.asarray, corr.match_patches(g(boxes), g(flips), 4, boxes[:, 1::-1], flips[:, 1::-1], 4))
  cl = jax.tree.map(np.asarray, corr.match_patches(boxes[:, 2:, None], flips[:, 2:, None], 2,
                                                   g(boxes)[:, None], g(flips)[:, None], 4))
  want, count = np_loc2(s_g, s_l, t_p, cg, cl, c)
  assert 0 < count < cg.valid.size + cl.valid.size  # some patches are outside (box 4 of image 0)
  np.testing.assert_allclose(total / matched, want, rtol=1e-5)
  np.testing.assert_allclose(matched, count, rtol=1e-6)


def np_layernorm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_cross_attention(p, q, kv, mask, heads, q_map=None):
  """UDI's cross-attention as documented in models/heads.py:
  LN(q' + proj(MHA(q', LN1 kv))), q' = LN1(q) or q_map @ LN1(kv)."""
  d = kv.shape[-1]
  hd = d // heads
  w, bias = np.asarray(p["qkv"]["kernel"]), np.asarray(p["qkv"]["bias"])
  qn = np_layernorm(q, p["norm1"]) if q_map is None else q_map @ np_layernorm(kv, p["norm1"])
  qq = (qn @ w + bias)[:, :d].reshape(len(qn), heads, hd)
  kvp = np_layernorm(kv, p["norm1"]) @ w + bias
  kk, vv = kvp[:, d:2 * d].reshape(len(kv), heads, hd), kvp[:, 2 * d:].reshape(len(kv), heads, hd)
  logits = np.einsum("qhc,khc->hqk", qq, kk) / math.sqrt(hd)
  if mask is not None:
    logits = np.where(mask[None], logits, -np.inf)
  out = np.einsum("hqk,khc->qhc", np_softmax(logits), vv).reshape(len(qn), d)
  return np_layernorm(qn + out @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"]),
                      p["norm"])


def test_region_features_given_fixed_regions():
  b, g, h, d, heads = 2, 2, 4, 8, 2
  n = h * h
  ca = CrossAttention(num_heads=heads)
  p_s = ca.init(jax.random.key(0), jnp.zeros((1, 2, d)), jnp.zeros((1, 3, d)))["params"]
  p_t = ca.init(jax.random.key(1), jnp.zeros((1, 2, d)), jnp.zeros((1, 3, d)))["params"]
  xs, xt = RNG.normal(size=(b, g, n, d)), RNG.normal(size=(b, g, n, d))
  starts = jnp.asarray(RNG.integers(0, n, (b, g, 2)), jnp.int32)
  regions = jax.jit(functools.partial(reg.sample_regions, grid=h, min_p=2, max_p=3))(
      jax.random.key(2), starts)
  boxes = jnp.array([[[0.0, 0, 64, 64], [32, 0, 96, 64]], [[0.0, 0, 64, 64], [0, 0, 32, 32]]])
  flips = jnp.array([[False, True], [False, False]])

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def features(regions, xs, xt):
    mapped = reg.map_regions(regions, boxes, flips, h, boxes[:, ::-1], flips[:, ::-1], h, 0.5)
    z_s, z_t = glare.region_features(
        lambda q, kv: ca.apply({"params": p_s}, q, kv),
        lambda q_map, kv, m: ca.apply({"params": p_t}, None, kv, m, q_map=q_map),
        xs, xt, regions, mapped)
    return mapped, z_s, z_t

  mapped, z_s, z_t = features(regions, jnp.asarray(xs, jnp.float32), jnp.asarray(xt, jnp.float32))
  idx, valid = np.asarray(regions.index), np.asarray(regions.valid)
  mp = jax.tree.map(np.asarray, mapped)
  for i in range(b):
    for v in range(g):
      for m in range(2):
        want_s = np_cross_attention(p_s, xs[i, v][idx[i, v, m]], xs[i, v], None, heads)
        np.testing.assert_allclose(z_s[i, v, m], want_s, atol=1e-4)
        q_map = np.zeros((idx.shape[-1], n))    # bilinear rows, mixing LN1(teacher tokens)
        for j in range(idx.shape[-1]):
          np.add.at(q_map[j], mp.index[i, v, m, j], mp.weight[i, v, m, j])
        ctx = np.broadcast_to(mp.context[i, v, m], (len(q_map), n))
        if mp.keep[i, v, m]:
          assert ctx.any()
          want_t = np_cross_attention(p_t, None, xt[i, v], ctx, heads, q_map=q_map)
          np.testing.assert_allclose(z_t[i, v, m], want_t, atol=1e-4)
  # The loss: masked mean of H over kept regions' inside slots.
  k = 6
  s_out, t_out, c = RNG.normal(size=(b, g, 2, 9, k)), RNG.normal(size=(b, g, 2, 9, k)), RNG.normal(size=k)
  mask = mp.inside & mp.keep[..., None] & valid
  want = np.mean([np_h(t_out[e], s_out[e], c) for e in zip(*np.nonzero(mask))])
  np.testing.assert_allclose(glare.reg_loss(s_out, t_out, mask, c, T_T, T_S), want, rtol=1e-5)
  assert 0 < mask.sum() < mask.size


def test_window_samples():
  idx = np.asarray(common.window_samples(jax.random.key(0), (200,), 14, 3, True))
  assert idx.shape == (200, 16)
  r, c = idx // 14, idx % 14
  # One token per 3x3 window of a 12x12 square in one of the four corners.
  corners = set()
  for i in range(200):
    fits = [(top, left) for top in (0, 2) for left in (0, 2)
            if (((r[i] - top) // 3) * 4 + (c[i] - left) // 3 == np.arange(16)).all()
            and (r[i] >= top).all() and (c[i] >= left).all()]
    assert fits, (r[i], c[i])
    corners.update(fits)
  assert corners == {(0, 0), (0, 2), (2, 0), (2, 2)}
  first = np.asarray(common.window_samples(jax.random.key(1), (5,), 6, 2, False))
  np.testing.assert_array_equal(first, np.tile([0, 2, 4, 12, 14, 16, 24, 26, 28], (5, 1)))


def test_flsl_meanshift_and_volume():
  # Its own generator: the module's RNG is in a state that depends on which tests
  # ran before in this worker, and the volume term can be near 0 (rtol alone fails).
  rng = np.random.default_rng(11)
  x, keys = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
  attn = np_softmax(x @ keys.T * 0.3)
  np.testing.assert_allclose(flsl.meanshift(x, keys, 0.3), attn @ keys, rtol=1e-5, atol=1e-6)
  p = np_softmax(rng.normal(size=(6, 8)))
  pb = p.mean(0)
  np.testing.assert_allclose(flsl.volume_maximisation(p), np.sum(pb * np.log(pb * 8)),
                             rtol=1e-5, atol=1e-6)
  # FLSL's main_flsl.py fixes the mean-shift scales for every width (ViT-S's 384).
  c = flsl_config()
  assert (c.meanshift_sa_scale, c.meanshift_ca_scale) == (0.1 / math.sqrt(384), 0.2 / math.sqrt(384))
