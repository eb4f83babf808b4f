"""The dense linear probe against an independent NumPy fit and NumPy scoring."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from glare_jax.configs import common as config_lib
from glare_jax.data import prepare
from glare_jax.evaluation import probe as probe_lib
from glare_jax.models import build_models, init_params
from glare_jax.models import load as load_lib
from glare_jax.models.vit import ModelSpec, ViT
from glare_jax.train import logging as train_logging, pretrain, sharding

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


# ----------------------------------------------------------------------------
# In pre-training, and the command.
# ----------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_probe_config(data_dir):
  """configs/demo.py's pipeline, shrunk: 32 px globals, the probe at 32 px every epoch."""
  c = config_lib.pretrain_config("demo", "tiny")
  c.crops.global_size, c.crops.local_size, c.crops.num_local = 32, 16, 2
  c.model.pos_grid = 2
  c.batch_size, c.num_epochs, c.tensorboard = 8, 2, False
  c.data_dir = str(data_dir)
  c.probe.every_epochs, c.probe.image_size, c.probe.batch_size = 1, 32, 8
  return c


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare.prepare("demo", data_dir, num_train=16, num_validation=4, image_size=48)
  return data_dir


@pytest.mark.slow
def test_pretraining_logs_the_probe_at_step_0_and_every_epoch(tmp_path, demo_data):
  config = tiny_probe_config(demo_data)
  pretrain.run(config, str(tmp_path / "run"))
  records = train_logging.read_metrics(tmp_path / "run" / "metrics.jsonl")
  probed = {r["step"]: r for r in records if "probe/mIoU" in r}
  assert sorted(probed) == [0, 2, 4]                   # 16 records / batch 8: 2 steps an epoch
  for r in probed.values():
    assert set(r) == {"step", "probe/mIoU", "probe/aAcc", "probe/mAcc"}
    assert 0 < r["probe/mIoU"] <= 100
  assert any("loss/glob" in r for r in records)


def converted_checkpoint(path, config):
  """The backbone of fresh params of `config`'s model, adapters left out, as a
  converted checkpoint; returns that backbone."""
  params = jax.device_get(init_params(build_models(config), jax.random.key(5), config))
  backbone = {k: ({n: v for n, v in b.items() if n != "adapter"} if k.startswith("block_")
                  else b) for k, b in params["backbone"].items()}
  width = backbone["norm"]["scale"].shape[0]
  spec = ModelSpec(variant=config.model.variant, num_prefix=config.model.num_prefix,
                   pos_grid=config.model.pos_grid, width=width, depth=2,
                   num_heads=config.cross_attention.num_heads,
                   mlp_dim=backbone["block_0"]["mlp"]["fc1"]["kernel"].shape[1])
  load_lib.save_converted(path, {"backbone": backbone}, spec)
  return params["backbone"]


def test_a_converted_checkpoint_scores_as_its_weights_with_identity_adapters(tmp_path,
                                                                             demo_data):
  config = tiny_probe_config(demo_data)
  backbone = converted_checkpoint(tmp_path / "converted", config)
  metrics, about = probe_lib.score_checkpoint(config, str(tmp_path / "converted"), "teacher")
  assert not about["adapters"]
  # The same weights in the config's ViT, whose adapters start as the identity
  # (zero up-projection): the same features, so the same scores.
  for block in (k for k in backbone if k.startswith("block_")):
    assert not np.any(backbone[block]["adapter"]["up"]["kernel"])
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh):
    want = probe_lib.Probe.from_config(config, mesh).run(backbone)
  for k in ("mIoU", "aAcc", "mAcc"):
    assert metrics[k] == pytest.approx(want[k], abs=1e-3), k


@pytest.mark.slow
def test_probe_command_writes_probe_json_and_one_line(tmp_path, demo_data):
  config = tiny_probe_config(demo_data)
  converted_checkpoint(tmp_path / "converted", config)
  args = [sys.executable, "-m", "glare_jax.probe", "--config=configs/demo.py:tiny",
          f"--config.data_dir={demo_data}", "--config.probe.image_size=32",
          "--config.model.pos_grid=2", "--config.crops.global_size=32"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(args + [f"--checkpoint={tmp_path / 'converted'}"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("probe mIoU"), out.stdout
  written = json.loads((tmp_path / "converted" / "probe.json").read_text())
  assert written["dataset"] == "demo" and written["mIoU"] is not None
  assert set(written["per_class"]) == {"grass", "water", "sand", "forest", "road"}

  bad = subprocess.run(args + [f"--checkpoint={tmp_path / 'nothing'}"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error:")
  assert str(tmp_path / "nothing") in bad.stderr
