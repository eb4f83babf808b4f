"""`python -m glare_jax.bench` end to end on CPU: one JSON line with the documented
keys, from the real step with every speed switch on (`:tiny,fast`)."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

KEYS = {"img_per_s", "step_ms", "compile_s", "peak_mem_gb", "device"}


def bench(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")  # compile fast: timing is not tested
  return subprocess.run([sys.executable, "-m", "glare_jax.bench", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_step_mode_prints_one_json_line():
  # DINO's objective keeps the compile short; the GLARE step runs in test_objectives
  # and test_device_cache. Every speed switch is on: bf16, 'auto' (= xla on CPU)
  # attention, scanned + rematerialised blocks, the device cache.
  r = bench("--config=configs/loveda.py:tiny,fast,objective=dino", "--steps=2", "--warmup=0",
            "--records=16", "--source_size=96", "--config.crops.device_image_size=64")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  record = json.loads(lines[0])
  assert KEYS <= set(record), sorted(record)
  assert record["img_per_s"] > 0 and record["step_ms"] > 0 and record["compile_s"] > 0
  assert record["device"] == "cpu" and record["peak_mem_gb"] is None  # no memory stats on CPU
  assert record["batch"] == 8 and record["records"] == 16
  assert record["config"]["data_cache"] == "device" and record["config"]["scan_blocks"]
  assert record["xla_gflop_per_img"] > 0 and math.isfinite(record["loss"])


def test_unknown_dataset_size_is_explained():
  r = bench("--config=configs/ade20k.py:tiny", "--steps=1")
  assert r.returncode != 0
  assert "give --records and --source_size" in r.stderr


def test_gpu_script_is_valid_bash():
  script = REPO / "scripts" / "gpu_bench.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  if shutil.which("shellcheck"):
    out = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
