"""Segmentation fine-tuning: the real entry points on the LoveDA sample (end to end,
kill and resume, multi-seed report), init checkpoints of both kinds, and the pieces
(optimizer rules, confusion-matrix gathering, mismatch errors)."""

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
from PIL import Image

from configs import loveda_seg
from glare_jax.configs import common
from glare_jax.data import prepare
from glare_jax.data.datasets import LOVEDA_CLASSES
from glare_jax.evaluation import metrics as metrics_lib
from glare_jax.models import segmenter, vit_from_config
from glare_jax.models.load import CheckpointMismatch, save_converted
from glare_jax.models.vit import ModelSpec, resize_pos_grid, size_kwargs
from glare_jax.train import checkpoint, finetune, init_checkpoint, seg_schedule
from glare_jax.train import logging as train_logging
from tiny_trainer import finish

REPO = pathlib.Path(__file__).resolve().parents[1]
LOVEDA_SAMPLE = pathlib.Path(os.environ.get("GLARE_SHARED", REPO.parent / "shared")
                             ) / "data" / "loveda_sample"
STEPS = 8
# Every program below runs the same model and schedule, so each compiles once
# (JAX's persistent cache, shared by the subprocesses).
CONFIG = "configs/loveda_seg.py:tiny,adapter_mode=none"


def tiny_config(arg="tiny,adapter_mode=none", **fields):
  c = loveda_seg.get_config(arg)
  c.total_steps = STEPS
  c.update(fields)
  return c


def random_like(shapes, seed, scale=0.02):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def vit_shapes(model_cfg, size):
  vit = vit_from_config(model_cfg)
  return jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def flat(tree):
  return {"/".join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------
# Fixtures: the prepared sample, the two kinds of init checkpoint, a compile cache.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not LOVEDA_SAMPLE.is_dir():
    pytest.skip(f"needs the LoveDA sample tiles at {LOVEDA_SAMPLE}")
  d = tmp_path_factory.mktemp("tfds")
  prepare.prepare("loveda", d, LOVEDA_SAMPLE)
  return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """Shared by the xdist workers (their base temp dirs have one parent)."""
  return tmp_path_factory.getbasetemp().parent / "jax_cache_finetune"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A converted UDI-style checkpoint of the tiny ViT (no adapters, 2x2 position grid)."""
  model = mlc.ConfigDict(dict(common.model_config("tiny_test"), adapter_mode="none",
                              pos_grid=2))
  backbone = random_like(vit_shapes(model, 32), seed=1)
  spec = ModelSpec(variant="tiny_test", pos_grid=2, source_format="udi", which="teacher",
                   **size_kwargs("tiny_test"))
  path = tmp_path_factory.mktemp("converted")
  save_converted(path, {"backbone": backbone}, spec)
  return path, backbone


def pretrain_workdir(path, model_cfg, steps=(5, 10)):
  """A GLARE pre-training workdir: config.json + Checkpointer states of the
  documented layout; at each step the teacher and the student differ."""
  config = common.pretrain_config("loveda", "tiny")
  config.model.update(model_cfg)
  checkpoint.check_config(config, path)
  shapes = vit_shapes(config.model, 64)
  out = {}
  with checkpoint.Checkpointer(path, every_steps=1, keep=3) as ckpt:
    for step in steps:
      student, teacher = random_like(shapes, 2 * step), random_like(shapes, 2 * step + 1)
      head = {"layers_0": {"kernel": np.ones((64, 8), np.float32)}}
      ca = {"qkv": {"kernel": np.ones((64, 192), np.float32)}}
      state = {"params": {"backbone": student, "head": head, "cross_attention": ca},
               "teacher": {"backbone": teacher, "head": head, "cross_attention": ca},
               "opt_state": {"mu": {"backbone": student}, "count": jnp.int32(step)},
               "centres": {"global": jnp.zeros((8,))},
               "step": jnp.int32(step), "rng": jax.random.key(step)}
      ckpt.save(step, jax.tree.map(jnp.asarray, state))
      out[step] = {"student": student, "teacher": teacher}
  return out


# ----------------------------------------------------------------------------
# Programs in subprocesses (2 CPU devices: the global batch of 2 is sharded).
# ----------------------------------------------------------------------------

KILL_AT_STEP_6 = """
import os, signal
from absl import app
from glare_jax.train import checkpoint, logging as tl
import glare_jax.main as m
save, record = checkpoint.Checkpointer.save, tl.MetricLogger.record
def save_and_wait(self, step, *args):   # the step-4 checkpoint is surely complete ...
  out = save(self, step, *args)
  self.wait()
  return out
def record_and_die(self, step, metrics):   # ... when the run dies at step 6
  record(self, step, metrics)
  if step == 6:
    self.flush()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save, tl.MetricLogger.record = save_and_wait, record_and_die
app.run(m.main)
"""


def launch(args, cache, module="glare_jax.main", code=None):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", module]
  return subprocess.Popen([*cmd, *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_args(workdir, data_dir, *extra):
  return [f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          "--config.batch_size=2", f"--config.total_steps={STEPS}",
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=2",
          "--config.eval.every_steps=0", "--config.tensorboard=False", *extra]


def final_params(workdir):
  return flat(init_checkpoint.read_subtree(workdir / "checkpoints" / str(STEPS) / "state",
                                           "params"))


def assert_started_from(params, backbone, grid):
  """AdamW at lr <= 6e-5 moves no weight by more than ~1e-3 in 8 steps, while two
  random initialisations differ by ~0.03: the run began at `backbone`."""
  ref = flat(backbone)
  pos = ref["pos_embed"]
  g0 = int(round((pos.shape[1] - 2) ** 0.5))
  patch = resize_pos_grid(jnp.asarray(pos[0, 2:]).reshape(g0, g0, -1), (grid, grid), "size")
  ref["pos_embed"] = np.concatenate([pos[:, :2], np.asarray(patch).reshape(1, grid * grid, -1)], 1)
  for k, v in ref.items():
    np.testing.assert_allclose(params[f"backbone/{k}"], v, atol=2e-3, err_msg=k)


@pytest.mark.slow
def test_end_to_end_kill_and_resume(tmp_path, data_dir, cache, converted):
  """Through `python -m glare_jax.main`: fine-tune from a converted checkpoint and
  evaluate; a run killed at step 6 resumes from step 4 to the same bits."""
  src, backbone = converted
  init = f"--config.init_checkpoint={src}"
  # One after the other: the later runs find the programs in the compilation cache.
  full = launch(run_args(tmp_path / "full", data_dir, init,
                         "--config.eval.save_predictions=True"), cache)
  (out_full,) = finish(full)
  assert full.returncode == 0, out_full
  killed = launch(run_args(tmp_path / "crash", data_dir, init), cache, code=KILL_AT_STEP_6)
  (out_killed,) = finish(killed)
  assert killed.returncode == -9, out_killed
  crash_log = tmp_path / "crash" / "metrics.jsonl"
  assert [r["step"] for r in train_logging.read_metrics(crash_log)] == [2, 4, 6]
  assert not (tmp_path / "crash" / "eval.json").exists()

  # The uninterrupted run: logs, schedule, metrics, the printed table, predictions.
  log = train_logging.read_metrics(tmp_path / "full" / "metrics.jsonl")
  assert [r["step"] for r in log] == [2, 4, 6, 8]
  schedule = seg_schedule.schedule_from_config(tiny_config())
  for r in log:
    assert np.isfinite(r["loss"]) and 0.5 < r["loss"] < 5, r
    assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-5)
  ev = json.loads((tmp_path / "full" / "eval.json").read_text())
  label = np.asarray(Image.open(LOVEDA_SAMPLE / "Val" / "Rural" / "masks_png" / "2.png"))
  assert ev["num_pixels"] == int((label != 0).sum())      # 0 = no-data, ignored
  assert (ev["dataset"], ev["step"], ev["seed"]) == ("loveda", STEPS, 0)
  assert list(ev["per_class"]) == list(LOVEDA_CLASSES)
  assert ev["per_class"]["barren"]["Acc"] is None         # class 5 is not in the tile
  for key in ("aAcc", "mIoU", "mAcc"):
    assert 0 <= ev[key] <= 100
  assert ev["mIoU"] <= ev["mAcc"] + 1e-6
  assert "agricultural" in out_full and f"evaluation at step {STEPS}" in out_full
  pred = np.asarray(Image.open(tmp_path / "full" / "predictions" / "Rural" / "2.png"))
  assert pred.shape == label.shape and pred.min() >= 1 and pred.max() <= 7
  full_params = final_params(tmp_path / "full")
  assert_started_from(full_params, backbone, grid=4)

  # Resume the killed run: same parameters, batch statistics, log and evaluation.
  resumed = launch(run_args(tmp_path / "crash", data_dir, init), cache)
  (out_resumed,) = finish(resumed)
  assert resumed.returncode == 0, out_resumed
  assert "restored step 4" in out_resumed
  crash_params = final_params(tmp_path / "crash")
  assert sorted(crash_params) == sorted(full_params)
  for k in full_params:
    np.testing.assert_array_equal(crash_params[k], full_params[k], err_msg=k)
  stats = [init_checkpoint.read_subtree(d / "checkpoints" / str(STEPS) / "state", "batch_stats")
           for d in (tmp_path / "full", tmp_path / "crash")]
  for k, v in flat(stats[0]).items():
    np.testing.assert_array_equal(flat(stats[1])[k], v, err_msg=k)
  assert ([r["loss"] for r in train_logging.read_metrics(crash_log)]
          == [r["loss"] for r in log])
  ev_resumed = json.loads((tmp_path / "crash" / "eval.json").read_text())
  assert ev_resumed == ev


@pytest.mark.slow
def test_multiseed_from_a_pretraining_workdir(tmp_path, data_dir, cache):
  """Two seeds from an (HPT-style) pre-training run's teacher; mean / std report;
  a second call finds both seeds finished."""
  src = tmp_path / "pretrain"
  weights = pretrain_workdir(src, dict(adapter_mode="none"), steps=(10,))
  workdir = tmp_path / "multi"
  args = run_args(workdir, data_dir, f"--config.init_checkpoint={src}",
                  "--config.num_seeds=2", "--name=HPT")
  proc = launch(args, cache, module="glare_jax.evaluation.multiseed")
  (out,) = finish(proc)
  assert proc.returncode == 0, out
  runs = [json.loads((workdir / f"seed_{k}" / "eval.json").read_text()) for k in (0, 1)]
  assert [r["seed"] for r in runs] == [0, 1]
  losses = [[r["loss"] for r in train_logging.read_metrics(workdir / f"seed_{k}" /
                                                           "metrics.jsonl")] for k in (0, 1)]
  assert losses[0] != losses[1]                           # other data order, head, dropout
  report = json.loads((workdir / "report.json").read_text())
  assert report["num_runs"] == 2 and report["seeds"] == [0, 1]
  for key in ("mIoU", "aAcc", "mAcc"):
    values = [r[key] for r in runs]
    assert report[key]["mean"] == pytest.approx(np.mean(values), abs=1e-3)
    assert report[key]["std"] == pytest.approx(np.std(values), abs=1e-3)
  assert "HPT: mIoU" in out and "[2 runs]" in out
  assert_started_from(final_params(workdir / "seed_0"), weights[10]["teacher"], grid=4)

  stamp = (workdir / "seed_1" / "eval.json").stat().st_mtime_ns
  again = launch(args, cache, module="glare_jax.evaluation.multiseed")
  (out,) = finish(again)
  assert again.returncode == 0, out
  assert (workdir / "seed_1" / "eval.json").stat().st_mtime_ns == stamp
  assert json.loads((workdir / "report.json").read_text())["mIoU"] == report["mIoU"]


def test_mismatching_checkpoint_fails_before_the_workdir_is_touched(tmp_path, data_dir, cache,
                                                                    converted):
  """The adapter model cannot start from an adapter-free checkpoint."""
  src, _ = converted
  workdir = tmp_path / "run"
  args = run_args(workdir, data_dir, f"--config.init_checkpoint={src}")
  args[0] = "--config=configs/loveda_seg.py:tiny"       # adapters on
  proc = launch(args, cache)
  (out,) = finish(proc)
  assert proc.returncode != 0
  assert "CheckpointMismatch" in out and str(src) in out
  assert "backbone/block_0/adapter/down/kernel" in out and "adapter_mode='none'" in out
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# In-process pieces.
# ----------------------------------------------------------------------------


def backbone_shapes(config):
  model = segmenter.segmenter_from_config(config, len(LOVEDA_CLASSES))
  return finetune.param_shapes(model, config.crop_size)["backbone"]


def test_init_from_a_converted_checkpoint(converted):
  src, backbone = converted
  config = tiny_config(init_checkpoint=str(src))
  fitted = init_checkpoint.init_backbone(config, backbone_shapes(config))
  got = flat(fitted)
  assert got["pos_embed"].shape == (1, 2 + 4 * 4, 64)     # 2x2 grid -> crop 64 / 16
  assert_started_from({f"backbone/{k}": v for k, v in got.items()}, backbone, grid=4)
  config.init_which = "student"
  with pytest.raises(CheckpointMismatch, match="holds the teacher's weights"):
    init_checkpoint.init_backbone(config, backbone_shapes(config))


def test_init_from_a_pretraining_workdir(tmp_path):
  """The latest step's teacher (or student) backbone, adapters included."""
  weights = pretrain_workdir(tmp_path / "pre", {})
  config = tiny_config("tiny", init_checkpoint=str(tmp_path / "pre"))
  shapes = backbone_shapes(config)
  for which in ("teacher", "student"):
    config.init_which = which
    got = flat(init_checkpoint.init_backbone(config, shapes))
    want = flat(weights[10][which])
    assert sorted(got) == sorted(want) and any("adapter" in k for k in got)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The run's model fields are checked against the pre-training config.json.
  config.model.adapter_scale = 0.2
  with pytest.raises(CheckpointMismatch, match=r"model.adapter_scale: pre-training 0.1, "
                                               r"fine-tuning 0.2"):
    init_checkpoint.init_backbone(config, shapes)
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    init_checkpoint.read_backbone(tmp_path)


def test_shape_mismatch_lists_every_key(tmp_path, converted):
  """A checkpoint of another width: every wrong key is named, with the path."""
  src, backbone = converted
  config = tiny_config(init_checkpoint=str(src))
  config.model.num_prefix = 1
  with pytest.raises(CheckpointMismatch, match=rf"(?s){src}.*set model.num_prefix = 2"):
    init_checkpoint.init_backbone(config, backbone_shapes(config))
  wide = jax.tree.map(lambda x: np.concatenate([x, x], -1), backbone)
  spec = ModelSpec(variant="custom", pos_grid=2, width=128, depth=2, num_heads=2, mlp_dim=128)
  save_converted(tmp_path / "wide", {"backbone": wide}, spec)
  config = tiny_config(init_checkpoint=str(tmp_path / "wide"))
  with pytest.raises(CheckpointMismatch) as e:
    init_checkpoint.init_backbone(config, backbone_shapes(config))
  msg = str(e.value)
  assert str(tmp_path / "wide") in msg
  assert "backbone/block_1/mlp/fc2/kernel: checkpoint (128, 128), model (128, 64)" in msg
  assert "backbone/norm/scale: checkpoint (128,), model (64,)" in msg


def test_confusion_matrices_gather_exactly_in_int64():
  cm = metrics_lib.ConfusionMatrix(3)
  cm.total[:] = [[2 ** 40 + 7, 3, 0], [5, 2 ** 33, 1], [0, 0, 2 ** 31 - 1]]
  out = finetune.gather_confusion(cm)       # one process: the sum is itself, exactly
  assert out.total.dtype == np.int64
  np.testing.assert_array_equal(out.total, cm.total)


def test_optimizer_decays_by_name_like_mmseg():
  """With zero gradients AdamW's step is -lr * wd * w on decayed weights: biases and
  BatchNorms decay, norms / pos_embed / cls_token do not; frozen rules hold."""
  config = tiny_config()
  config.optim.warmup_steps = 0
  params = {"backbone": {"pos_embed": np.ones((1, 4, 2), np.float32),
                         "cls_token": np.ones((1, 2, 2), np.float32),
                         "patch_embed": {"bias": np.ones((2,), np.float32)},
                         "block_0": {"norm1": {"scale": np.ones((2,), np.float32)}}},
            "head": {"bn_0": {"scale": np.ones((2,), np.float32)},
                     "classifier": {"kernel": np.ones((2, 3), np.float32)}}}
  tx, _ = finetune.build_optimizer(config, params)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  step = -6e-5 * 0.01
  got = {k: float(v.ravel()[0]) for k, v in flat(updates).items()}
  assert got == pytest.approx({
      "backbone/pos_embed": 0.0, "backbone/cls_token": 0.0, "backbone/patch_embed/bias": step,
      "backbone/block_0/norm1/scale": 0.0, "head/bn_0/scale": step,
      "head/classifier/kernel": step}, rel=1e-5)
  config.optim.param_rules = (("backbone/.*", "freeze"),)
  tx, _ = finetune.build_optimizer(config, params)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(float(np.abs(v).max()) == 0 for k, v in flat(updates).items()
             if k.startswith("backbone/"))
  assert float(flat(updates)["head/classifier/kernel"].max()) < 0


def test_demo_config_fine_tunes_the_demo_pretraining_backbone():
  """configs/demo_seg.py: the seg protocol's optimizer on configs/demo.py's ViT, so
  a demo pre-training workdir is a valid init_checkpoint."""
  from configs import demo, demo_seg
  c, pre = demo_seg.get_config(), demo.get_config()
  assert "python -m glare_jax.main --config=configs/demo_seg.py" in demo_seg.__doc__
  assert (c.mode, c.dataset, c.batch_size, c.num_seeds) == ("finetune", "demo", 16, 3)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.power) == (6e-5, 0.01, 1.0)
  assert c.model.pos_grid * c.model.patch_size == c.crop_size
  assert max(c.fpn.feature_blocks) < size_kwargs(c.model.variant)["depth"]
  init_checkpoint.check_architecture(c.model, pre.model.to_dict(), "demo")
  assert demo_seg.get_config("tiny").total_steps < c.total_steps
