"""The pre-training program: device-count invariance, init checkpoints, kill and
resume, and `:tiny` runs on the LoveDA sample tiles through the real entry point."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import ml_collections as mlc
import numpy as np
import pytest

from glare_jax.configs import common as config_lib
from glare_jax.data import multicrop, prepare
from glare_jax.models import build_models, init_params
from glare_jax.models import load as load_lib
from glare_jax.models.vit import ModelSpec
from glare_jax.train import checkpoint, logging as train_logging, pretrain, sharding
import tiny_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> mlc.ConfigDict:
  c = config_lib.pretrain_config("demo", "tiny")
  c.crops.global_size, c.crops.local_size, c.crops.num_local = 32, 16, 2
  c.model.pos_grid = 2
  c.batch_size = 8
  c.tensorboard = False
  for key, value in overrides.items():
    c[key] = value
  return c


def synthetic_batch(config, batch_size, seed=0):
  """Host-augmented multi-crop batch of random textured 48 px images."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(batch_size):
    image = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    records.append(multicrop.augment_record(image, rng, config.crops))
  return multicrop.collate(records)


def run_steps(config, devices, batches):
  mesh = sharding.make_mesh(config.mesh, devices)
  t = pretrain.build(config, mesh, steps_per_epoch=4)
  with sharding.use_mesh(mesh):
    state = t.init(None, jax.random.key(0))
    out = []
    for batch in batches:
      state, metrics = t.update(state, sharding.global_batch(batch, mesh), None)
      out.append({k: float(v) for k, v in metrics.items()})
  return out, jax.device_get(state["params"])


@functools.cache
def one_device_glare_steps():
  config = tiny_config()
  batches = [synthetic_batch(config, 8, seed=s) for s in range(2)]
  return batches, run_steps(config, jax.devices()[:1], batches)


@pytest.mark.slow
@pytest.mark.parametrize("head_chunk_size", [0, 2])
def test_one_and_eight_devices_give_the_same_glare_losses(head_chunk_size):
  """8 devices against 1; with head_chunk_size=2 the 8-device step also runs the
  head in 4 chunks of 2 images, each chunk spread over the devices."""
  batches, (one, p1) = one_device_glare_steps()
  config = tiny_config()
  config.glare.head_chunk_size = head_chunk_size
  eight, p8 = run_steps(config, jax.devices()[:8], batches)
  for a, b in zip(one, eight):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert {"loss/glob", "loss/reg", "loss/loc1", "loss/loc2"} <= set(one[0])


def converted_checkpoint(tmp_path, config, width_variant=None):
  """A converted checkpoint written from random parameters of `config`'s model."""
  c = mlc.ConfigDict(config.to_dict())
  if width_variant:
    c.model.variant = width_variant
  params = jax.device_get(init_params(build_models(c), jax.random.key(5), c))
  backbone = {k: v for k, v in params["backbone"].items()}
  for block in [k for k in backbone if k.startswith("block_")]:
    backbone[block] = {k: v for k, v in backbone[block].items() if k != "adapter"}
  width = params["backbone"]["norm"]["scale"].shape[0]
  spec = ModelSpec(variant=c.model.variant, num_prefix=c.model.num_prefix,
                   pos_grid=c.model.pos_grid, width=width,
                   depth=sum(k.startswith("block_") for k in backbone),
                   num_heads=c.cross_attention.num_heads,
                   mlp_dim=backbone["block_0"]["mlp"]["fc1"]["kernel"].shape[1])
  out = tmp_path / f"converted_{c.model.variant}"
  load_lib.save_converted(out, {"backbone": backbone}, spec)
  return out, backbone


def test_init_checkpoint_loads_the_backbone_and_keeps_fresh_adapters(tmp_path):
  config = tiny_config()
  path, backbone = converted_checkpoint(tmp_path, config)
  config.init_checkpoint = str(path)
  params = pretrain.initial_params(config, build_models(config))
  np.testing.assert_array_equal(params["backbone"]["pos_embed"], backbone["pos_embed"])
  np.testing.assert_array_equal(params["backbone"]["block_1"]["attn"]["qkv"]["kernel"],
                                backbone["block_1"]["attn"]["qkv"]["kernel"])
  assert not np.any(np.asarray(params["backbone"]["block_0"]["adapter"]["up"]["kernel"]))


def test_a_mismatching_init_checkpoint_stops_before_the_workdir_is_touched(tmp_path):
  config = tiny_config()
  path, _ = converted_checkpoint(tmp_path, config, width_variant="Ti")
  config.init_checkpoint = str(path)
  config.data_dir = str(tmp_path / "tfds")
  prepare.prepare("demo", config.data_dir, num_train=8, num_validation=2, image_size=48)
  workdir = tmp_path / "run"
  with pytest.raises(load_lib.CheckpointMismatch, match=str(path)):
    pretrain.check(config, str(workdir))     # what main runs before config.json
  assert not workdir.exists()
  with pytest.raises(load_lib.CheckpointMismatch, match=str(path)):
    pretrain.run(config, str(workdir))
  assert not (workdir / "checkpoints").exists()


def test_an_unprepared_dataset_stops_before_the_workdir_is_touched(tmp_path):
  config = tiny_config(dataset="loveda", data_dir=str(tmp_path / "empty"))
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match=r"(?s)'loveda' is not prepared in .*empty"
                     r".*glare_jax.data.prepare --dataset=loveda"):
    pretrain.check(config, str(workdir))
  assert not workdir.exists()


def test_init_checkpoint_must_be_a_converted_directory(tmp_path):
  config = tiny_config(init_checkpoint=str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="python -m glare_jax.convert"):
    pretrain.initial_params(config, build_models(config))


# ---------------------------------------------------------------------------
# Through the real entry point (subprocesses).
# ---------------------------------------------------------------------------

def main_command(config_arg, workdir, *overrides):
  return [sys.executable, "-m", "glare_jax.main", f"--config={config_arg}",
          f"--workdir={workdir}", *overrides]


def env_for(cache_dir, devices=1):
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0",
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


TINY_DEMO = ("--config.batch_size=4", "--config.num_epochs=3", "--config.crops.global_size=32",
             "--config.crops.local_size=16", "--config.crops.num_local=2",
             "--config.model.pos_grid=2", "--config.checkpoint_every_steps=2",
             "--config.tensorboard=False")


def tiny_demo_config():
  """The config TINY_DEMO's flags give (to restore those runs' checkpoints)."""
  config = config_lib.pretrain_config("demo", "tiny")
  config.batch_size, config.num_epochs = 4, 3
  config.crops.global_size, config.crops.local_size, config.crops.num_local = 32, 16, 2
  config.model.pos_grid = 2
  return config


def restore_params(config, workdir):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  t = pretrain.build(config, mesh, steps_per_epoch=3)
  with checkpoint.Checkpointer(workdir, every_steps=0, keep=2) as ckpt:
    state = ckpt.restore(checkpoint.abstract_state(t.shapes, t.shardings))
  return int(state["step"]), jax.device_get(state["params"])


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_uninterrupted_result(tmp_path):
  data_dir = tmp_path / "tfds"
  prepare.prepare("demo", data_dir, num_train=12, num_validation=2, image_size=48)
  args = (*TINY_DEMO, f"--config.data_dir={data_dir}")
  env = env_for(tmp_path / "cache")
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  subprocess.run(main_command("configs/loveda.py:tiny", straight, "--config.dataset=demo",
                              *args), env=env, cwd=REPO, check=True, capture_output=True)
  # Kill the second run as soon as its first checkpoint (step 2 of 9) is being written.
  proc = subprocess.Popen(main_command("configs/loveda.py:tiny", broken,
                                       "--config.dataset=demo", *args),
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  for line in proc.stdout:
    if "checkpoint: saving step 2" in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (broken / "checkpoints" / "9").exists()
  subprocess.run(main_command("configs/loveda.py:tiny", broken, "--config.dataset=demo",
                              *args), env=env, cwd=REPO, check=True, capture_output=True)

  step_a, params_a = restore_params(tiny_demo_config(), straight)
  step_b, params_b = restore_params(tiny_demo_config(), broken)
  assert step_a == step_b == 9
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  logged = [r["step"] for r in train_logging.read_metrics(broken / "metrics.jsonl")]
  assert logged == sorted(set(logged)) and logged[-1] == 9


@pytest.mark.slow
def test_two_processes_pretrain_as_one(tmp_path):
  """The program under jax.distributed on 127.0.0.1: 2 processes of 1 device give
  the losses and parameters of 1 process of 2 devices (the same global batches)."""
  data_dir = tmp_path / "tfds"
  prepare.prepare("demo", data_dir, num_train=12, num_validation=2, image_size=48)
  args = ("--config.dataset=demo", *TINY_DEMO, f"--config.data_dir={data_dir}")
  port = tiny_trainer.free_port()
  two = [subprocess.Popen(
      main_command("configs/loveda.py:tiny", tmp_path / "two", *args,
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2",
                   f"--config.distributed.process_id={i}"),
      env=env_for(tmp_path / f"cache_{i}"), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    one = subprocess.run(main_command("configs/loveda.py:tiny", tmp_path / "one", *args),
                         env=env_for(tmp_path / "cache_one", devices=2), cwd=REPO,
                         capture_output=True, text=True)
  finally:
    outs = tiny_trainer.finish(*two)
  assert one.returncode == 0, one.stderr[-3000:]
  for p, out in zip(two, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2" in outs[1]

  logs = [train_logging.read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two")]
  assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] and logs[0][-1]["step"] == 9
  for a, b in zip(*logs):
    for term in ("loss", "loss/glob", "loss/reg", "loss/loc1", "loss/loc2"):
      np.testing.assert_allclose(b[term], a[term], rtol=1e-5, err_msg=f"step {a['step']} {term}")
  _, params_one = restore_params(tiny_demo_config(), tmp_path / "one")
  _, params_two = restore_params(tiny_demo_config(), tmp_path / "two")
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  data = tmp_path / "two" / "checkpoints" / "9" / "data"
  assert sorted(p.name for p in data.iterdir() if p.name.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_tiny_run_on_the_loveda_sample(tmp_path, loveda_sample):
  data_dir = tmp_path / "tfds"
  env = env_for(tmp_path / "cache")
  subprocess.run([sys.executable, "-m", "glare_jax.data.prepare", "--dataset=loveda",
                  f"--manual_dir={loveda_sample}", f"--data_dir={data_dir}"],
                 env=env, cwd=REPO, check=True, capture_output=True)
  workdir = tmp_path / "run"
  out = subprocess.run(
      main_command("configs/loveda.py:tiny", workdir, f"--config.data_dir={data_dir}",
                   "--config.batch_size=2", "--config.tensorboard=False"),
      env=env, cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  records = train_logging.read_metrics(workdir / "metrics.jsonl")
  assert records[-1]["step"] == 2          # 2 tiles / batch 2 = 1 step per epoch, 2 epochs
  for term in ("loss/glob", "loss/reg", "loss/loc1", "loss/loc2"):
    assert np.isfinite(records[-1][term])
  assert (workdir / "checkpoints" / "2").is_dir()
  assert json.loads((workdir / "config.json").read_text())["dataset"] == "loveda"
  # The summary: final metrics, the files written, the next command.
  tail = out.stdout.strip().splitlines()
  assert tail[-4].startswith("final: loss ") and "loss/glob" in tail[-4]
  assert tail[-3:-1] == [f"wrote: {workdir / n}" for n in ("checkpoints", "metrics.jsonl")]
  assert tail[-1].startswith("next: python -m glare_jax.main --config=configs/loveda_seg.py")
  assert f"--config.init_checkpoint={workdir}" in tail[-1]
  assert sum("step 2/2 (100%)" in line for line in out.stdout.splitlines()) == 1
  assert all(len(line) <= 100 for line in out.stdout.splitlines() if line.startswith("step"))
  # A finished run re-run says so and writes nothing.
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  again = subprocess.run(
      main_command("configs/loveda.py:tiny", workdir, f"--config.data_dir={data_dir}",
                   "--config.batch_size=2", "--config.tensorboard=False"),
      env=env, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"already complete at step 2 ({workdir})" in again.stdout
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
