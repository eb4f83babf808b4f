"""The README's quickstart, shrunk: GLARE pre-training on the generated demo
dataset through `glare_jax.main`, FPN fine-tuning of that run's teacher, the
evaluation file, and the attention figure of the run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from glare_jax.data import prepare
from glare_jax.train import logging as train_logging

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(args, cache_dir):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0",
         "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
  out = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


@pytest.mark.slow
def test_demo_pretraining_then_fine_tuning_then_figure(tmp_path):
  data_dir = tmp_path / "tfds"
  prepare.prepare("demo", data_dir, num_train=32, num_validation=4, image_size=96)
  pre, seg = tmp_path / "demo", tmp_path / "demo_seg"
  cache = tmp_path / "cache"

  # 1. configs/demo.py as the README runs it, for one epoch of the small dataset.
  run(["glare_jax.main", "--config=configs/demo.py", f"--workdir={pre}",
       f"--config.data_dir={data_dir}", "--config.num_epochs=1",
       "--config.tensorboard=False"], cache)
  logged = train_logging.read_metrics(pre / "metrics.jsonl")
  trained = [r for r in logged if "loss" in r]
  assert trained[-1]["step"] == 2                       # 32 records / batch 16
  for term in ("loss/glob", "loss/reg", "loss/loc1", "loss/loc2"):
    assert term in trained[-1]
  # the dense linear probe at step 0 (the starting backbone) and at the end
  assert [r["step"] for r in logged if "probe/mIoU" in r] == [0, 2]
  assert (pre / "checkpoints" / "2").is_dir()

  # 2. fine-tuning of that run's teacher (configs/demo_seg.py, the `tiny` length).
  run(["glare_jax.main", "--config=configs/demo_seg.py:tiny", f"--workdir={seg}",
       f"--config.init_checkpoint={pre}", f"--config.data_dir={data_dir}",
       "--config.eval.every_steps=20", "--config.tensorboard=False"], cache)
  result = json.loads((seg / "eval.json").read_text())
  text = json.dumps(result)
  for metric in ("aAcc", "mIoU", "mAcc"):
    assert metric in text
  assert "init_checkpoint" in (seg / "config.json").read_text()

  # 3. the attention figure of the pre-training run.
  figure = pre / "attention.png"
  run(["glare_jax.visualize", "--checkpoint", str(pre), "--out", str(figure),
       "--demo-images", "2", "--size", "64"], cache)
  assert figure.stat().st_size > 1000
