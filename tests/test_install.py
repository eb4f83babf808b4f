"""A wheel built from a copy of the checkout runs every command from another directory."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("main", "convert", "embed", "visualize", "bench", "bench_table", "data.prepare",
            "evaluation.multiseed", "profile_summary")
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", "tmp", "workdir*", ".whl",
                                    ".bench_ref", "ckpt")


@pytest.mark.slow
def test_wheel_runs_every_command_outside_the_checkout(tmp_path):
  source, wheels, site, elsewhere = (tmp_path / n for n in ("src", "whl", "site", "elsewhere"))
  shutil.copytree(REPO, source, ignore=NOT_SOURCE)
  pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source],
                 check=True, capture_output=True, cwd=tmp_path)
  (wheel,) = wheels.glob("glare_jax-*.whl")
  subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True,
                 capture_output=True, cwd=tmp_path)
  elsewhere.mkdir()
  # The installed dependencies, this wheel's glare_jax, and neither the checkout nor
  # its editable install.
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)

  def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)

  r = run("-c", "import glare_jax, glare_jax.train.optim; print(glare_jax.__file__)")
  assert r.returncode == 0 and r.stdout.strip().startswith(str(site)), r.stderr[-2000:]
  for name in COMMANDS:
    r = run("-m", f"glare_jax.{name}", "--help")
    assert r.returncode == 0 and "--" in r.stdout, (name, r.stderr[-2000:])
  workdir = tmp_path / "run"
  r = run("-m", "glare_jax.main", f"--config={source}/configs/demo.py:tiny",
          f"--workdir={workdir}", f"--config.data_dir={tmp_path}/data",
          "--config.num_epochs=1", "--config.batch_size=32", "--config.tensorboard=False")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (workdir / "checkpoints" / "8").is_dir() and "next: python -m" in r.stdout
