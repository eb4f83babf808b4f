"""The dense linear probe against an independent NumPy fit and NumPy scoring."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from glare_jax.evaluation import probe as probe_lib
from glare_jax.models.vit import ViT
from glare_jax.train import sharding

PATCH, SIZE, CLASSES, DIM = 8, 32, 3, 6
IGNORE = 255
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _projection():
  return np.random.default_rng(7).standard_normal((3 * 4, DIM)).astype(np.float32)


def _jax_features(params, images):
  """images [B, S, S, 3] normalised -> tanh of a projection of 2x2 sub-patch means."""
  del params
  b = images.shape[0]
  h = SIZE // PATCH
  x = images.reshape(b, h, 2, PATCH // 2, h, 2, PATCH // 2, 3).mean((3, 6))  # [B, h, 2, h, 2, 3]
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, h, 12)
  return jnp.tanh(x @ _projection())


def _numpy_features(images_u8):
  """The same features, written apart, in float64."""
  x = (images_u8.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  b, h, q = len(x), SIZE // PATCH, PATCH // 2
  out = np.zeros((b, h, h, DIM))
  for i in range(b):
    for r in range(h):
      for c in range(h):
        cells = [x[i, r * PATCH + a * q:r * PATCH + (a + 1) * q,
                   c * PATCH + e * q:c * PATCH + (e + 1) * q].mean((0, 1))
                 for a in range(2) for e in range(2)]
        out[i, r, c] = np.tanh(np.concatenate(cells) @ _projection().astype(np.float64))
  return out


def _numpy_ridge(features, labels, ridge):
  """Ridge with an unregularised bias, as one least-squares problem over the
  labelled patches; lam scaled as the probe documents (trace of the covariance / D)."""
  rows, targets = [], []
  b, h = features.shape[:2]
  for i in range(b):
    for r in range(h):
      for c in range(h):
        cell = labels[i, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].ravel()
        cell = cell[cell < CLASSES]
        if cell.size:
          rows.append(features[i, r, c])
          targets.append(np.bincount(cell, minlength=CLASSES) / cell.size)
  x, y = np.asarray(rows), np.asarray(targets)
  n, d = x.shape
  lam = ridge * np.trace(np.cov(x.T, bias=True)) / d
  design = np.concatenate([x, np.ones((n, 1))], axis=1)
  penalty = np.concatenate([np.sqrt(n * lam) * np.eye(d), np.zeros((d, 1))], axis=1)
  sol = np.linalg.lstsq(np.concatenate([design, penalty]),
                        np.concatenate([y, np.zeros((d, CLASSES))]), rcond=None)[0]
  return sol[:d], sol[d]


def _numpy_upsample(x, out):
  """[h, w, C] -> [out, out, C]: linear interpolation at half-pixel centres, clamped."""
  n = x.shape[0]
  def axis_weights(n_in):
    m = np.zeros((out, n_in))
    for o in range(out):
      s = max((o + 0.5) * n_in / out - 0.5, 0.0)
      i0 = min(int(np.floor(s)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      m[o, i0] += 1 - (s - i0)
      m[o, i1] += s - i0
    return m
  m = axis_weights(n)
  return np.einsum("Hh,Ww,hwc->HWc", m, m, x)


def _numpy_scores(features, labels, w, b):
  tp, gt, pred_count = np.zeros(CLASSES), np.zeros(CLASSES), np.zeros(CLASSES)
  for i in range(len(features)):
    pred = _numpy_upsample(features[i] @ w + b, SIZE).argmax(-1)
    valid = labels[i] < CLASSES
    for c in range(CLASSES):
      tp[c] += np.sum((pred == c) & (labels[i] == c) & valid)
      gt[c] += np.sum((labels[i] == c) & valid)
      pred_count[c] += np.sum((pred == c) & valid)
  union = gt + pred_count - tp
  iou = [t / u for t, u in zip(tp, union) if u > 0]
  acc = [t / g for t, g in zip(tp, gt) if g > 0]
  return dict(mIoU=100 * np.mean(iou), aAcc=100 * tp.sum() / gt.sum(), mAcc=100 * np.mean(acc))


def _split(seed, n):
  """Images whose colour follows a smooth class map (learnable), with ignored pixels."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((n, SIZE, SIZE), np.uint8)
  images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  palette = np.asarray([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
  for i in range(n):
    a, c = rng.uniform(-1, 1, 2)
    field = a * (xx - SIZE / 2) + c * (yy - SIZE / 2) + rng.normal(0, 3, (SIZE, SIZE))
    labels[i] = np.digitize(field, np.sort(rng.normal(0, 8, 2)))
    images[i] = np.clip(palette[labels[i]] + rng.normal(0, 60, (SIZE, SIZE, 3)), 0, 255)
    labels[i][rng.random((SIZE, SIZE)) < 0.2] = IGNORE
  labels[0, :PATCH, :PATCH] = IGNORE          # a whole patch without a label
  return probe_lib.ProbeSplit(images, labels)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1)))


def test_probe_matches_numpy_ridge_and_scoring(mesh):
  train, val = _split(0, 11), _split(1, 5)     # neither a multiple of the batch: padding
  ridge = 0.05
  probe = probe_lib.Probe(_jax_features, train, val, num_classes=CLASSES, patch_size=PATCH,
                          mesh=mesh, batch_size=8, ridge=ridge, mean=MEAN, std=STD)
  w, b = probe.fit(None)
  w_ref, b_ref = _numpy_ridge(_numpy_features(train.images), train.labels, ridge)
  np.testing.assert_allclose(w, w_ref, atol=2e-4)
  np.testing.assert_allclose(b, b_ref, atol=2e-4)

  got = probe.score(None, w, b).metrics()
  want = _numpy_scores(_numpy_features(val.images), val.labels, w_ref, b_ref)
  for k in ("mIoU", "aAcc", "mAcc"):
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  assert got["num_pixels"] == int(np.sum(val.labels < CLASSES))
  assert got["mIoU"] > 40       # the features carry the colour: far above chance


def test_patch_targets_leave_ignored_pixels_out():
  labels = np.full((1, 8, 8), IGNORE, np.uint8)
  labels[0, :4, :4] = 1
  labels[0, 0, 0] = 0
  labels[0, 4:, :4] = 2
  labels[0, 4, 4] = 7                          # outside [0, C): ignored too
  y, weight = jax.device_get(probe_lib.patch_targets(jnp.asarray(labels), 4, 3))
  np.testing.assert_allclose(y[0, 0, 0], [1 / 16, 15 / 16, 0])
  np.testing.assert_allclose(y[0, 1, 0], [0, 0, 1])
  np.testing.assert_array_equal(weight[0], [[1, 0], [1, 0]])


def test_backbone_features_are_patch_tokens():
  vit = ViT(patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32, num_prefix=2,
            pos_grid=4, adapter_dim=4)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = vit.init(jax.random.key(1), images)["params"]
  tokens, aux = vit.apply({"params": params}, images)
  final = probe_lib.backbone_features(vit)(params, images)
  np.testing.assert_array_equal(final, np.asarray(tokens[:, 2:]).reshape(2, 4, 4, 16))
  taps = probe_lib.backbone_features(vit, (0, 1))(params, images)
  assert taps.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(taps[..., 16:],
                                np.asarray(aux["blocks"][1][:, 2:]).reshape(2, 4, 4, 16))


def test_resize_pair_keeps_label_ids():
  image = np.zeros((20, 30, 3), np.uint8)
  label = np.zeros((20, 30), np.uint8)
  label[:, 15:] = 4
  label[0, 0] = IGNORE
  out_image, out_label = probe_lib.resize_pair(image, label, 16)
  assert out_image.shape == (16, 16, 3) and out_label.shape == (16, 16)
  assert set(np.unique(out_label)) <= {0, 4, IGNORE}
