"""Every command's error path: one `error:` line, exit 2, the workdir untouched;
`--help` from any directory; the traceback only with `-v 1`."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from glare_jax import cli, convert, embed, profile_summary, visualize
from glare_jax.evaluation import report

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
COMMANDS = ("main", "convert", "embed", "visualize", "bench", "data.prepare",
            "evaluation.multiseed", "evaluation.report", "probe", "profile_summary")


def command(name, *args, cwd, devices=1):
  """`python -m glare_jax.<name> args` from `cwd` (any directory)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, "-m", f"glare_jax.{name}", *map(str, args)], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=120)


def assert_one_error_line(r, *expected):
  """Exit 2, no traceback, one `error:` line with `expected` in it, and nothing after
  it but the rest of its message (a layout or a command, never a log line)."""
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  after = lines[errors[0] + 1:]
  assert not any(re.match(r"[IWEF]\d{4} ", line) for line in after), r.stderr[-2000:]
  for text in expected:
    assert text in lines[errors[0]], lines[errors[0]]


MAIN_CASES = {
    "unknown field": (["--config.batchsize=8"], ["--config.batchsize", "closest: batch_size"]),
    "nested field": (["--config.optim.base_rl=1"], ["closest: optim.base_lr"]),
    "wrong type": (["--config.batch_size=abc"], ["--config.batch_size=abc"]),
    "zero batch": (["--config.batch_size=0"], ["batch_size=0 must be a positive integer"]),
    "batch vs devices": (["--config.batch_size=3"], ["not divisible by the data-parallel size 2"]),
    "objective": (["--config.objective=glaer"], ["'glaer' is not an objective", "glare"]),
    "dataset": (["--config.dataset=lovedaa"], ["unknown dataset 'lovedaa'", "loveda"]),
    "preset": (["--config.optim.param_preset=adaptrs"], ["'adaptrs' is not a preset"]),
    "mesh": (["--config.mesh.fsdp=3"], ["fsdp=3 does not divide the 2 devices"]),
}


@pytest.mark.parametrize("case", sorted(MAIN_CASES))
def test_main_bad_config_is_one_line_and_writes_nothing(case, tmp_path):
  args, expected = MAIN_CASES[case]
  workdir = tmp_path / "run"
  r = command("main", f"--config={DEMO}:tiny", f"--workdir={workdir}", *args, cwd=tmp_path,
              devices=2)
  assert_one_error_line(r, *expected)
  assert not workdir.exists()


def test_main_bad_config_file_and_argument(tmp_path):
  workdir = tmp_path / "run"
  r = command("main", f"--config={tmp_path}/nowhere.py", f"--workdir={workdir}", cwd=tmp_path)
  assert_one_error_line(r, "No such file", "nowhere.py")
  r = command("main", f"--config={DEMO}:tinyy", f"--workdir={workdir}", cwd=tmp_path)
  assert_one_error_line(r, "unknown config argument 'tinyy'")
  assert not workdir.exists()


def test_verbose_shows_the_traceback(tmp_path):
  r = command("main", f"--config={DEMO}:tiny", f"--workdir={tmp_path}/run",
              "--config.objective=glaer", "-v", "1", cwd=tmp_path)
  assert r.returncode == 2 and "Traceback" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: ValueError: config.objective")


def test_mode_change_is_refused_even_when_allowed(tmp_path):
  """A pre-training workdir given a fine-tuning config: refused, config.json kept."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  stored = {"mode": "pretrain", "dataset": "demo", "batch_size": 16}
  (workdir / "config.json").write_text(json.dumps(stored))
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  r = command("main", f"--config={REPO}/configs/demo_seg.py:tiny", f"--workdir={workdir}",
              "--allow_config_change", cwd=tmp_path)
  assert_one_error_line(r, "holds pretrain checkpoints", "finetune config cannot resume")
  assert json.loads((workdir / "config.json").read_text()) == stored
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_allowed_change_waits_for_the_restore(tmp_path):
  """--allow_config_change writes config.json only after a restore succeeded."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from glare_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  old = mlc.ConfigDict(dict(mode="pretrain", batch_size=8))
  checkpoint.check_config(old, tmp_path)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as ckpt:
    ckpt.save(1, {"w": jnp.zeros(2)})
  new = mlc.ConfigDict(dict(mode="pretrain", batch_size=16))
  checkpoint.check_config(new, tmp_path, allow_changes=True)
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    with pytest.raises(Exception):       # a restore that fails: the old config stays
      ckpt.restore({"w": jnp.zeros(3), "v": jnp.zeros(1)})
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
    ckpt.restore({"w": jnp.zeros(2)})
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16


def test_other_programs_on_absl_flags(tmp_path):
  r = command("bench", f"--config={DEMO}:tiny", "--config.objective=dnio", cwd=tmp_path)
  assert_one_error_line(r, "'dnio' is not an objective")
  r = command("data.prepare", "--dataset=loveda", f"--data_dir={tmp_path}/d",
              f"--manual_dir={tmp_path}/nothing", cwd=tmp_path)
  assert_one_error_line(r)
  r = command("data.prepare", "--dataset=lovdea", cwd=tmp_path)
  assert_one_error_line(r, "--dataset=lovdea")
  r = command("evaluation.multiseed", f"--config={DEMO}", f"--workdir={tmp_path}/m",
              cwd=tmp_path)
  assert_one_error_line(r, "multiseed runs fine-tuning configs")
  assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("main, args, expected", [
    (convert.main, ["--out=x"], "--src is required"),
    (convert.main, ["--src=a.pth", "--out=x", "--which=both"], "--which=both"),
    (embed.main, ["--out=x.npz", "--batch-size=0", "--checkpoint=c", "i.png"], "--batch-size"),
    (embed.main, ["--checkpoint=c", "--out=x.npz"], "give at least one image"),
    (visualize.main, ["--checkpoint=c", "--out=x.png"], "--demo-images N"),
    (profile_summary.main, [], "give one trace directory"),
    (profile_summary.main, ["--tpo=3", "d"], "tpo"),
    (report.main, [], "give the eval.json files"),
    (report.main, ["missing/eval.json"], "missing/eval.json does not exist"),
    (report.main, ["--ddof=-1", "a.json"], "--ddof"),
])
def test_in_process_flag_errors(main, args, expected, capsys):
  with pytest.raises(SystemExit) as e:
    main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err[-1].startswith("error: ") and expected in err[-1], err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
  assert embed.main([f"--checkpoint={tmp_path}/none", f"--out={tmp_path}/x.npz", "a.png"]) == 2
  assert visualize.main([f"--checkpoint={tmp_path}/none", f"--out={tmp_path}/x.png",
                         "--demo-images=1"]) == 2
  assert convert.main([f"--src={tmp_path}/none.pth", f"--out={tmp_path}/o"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
  assert sorted(os.listdir(tmp_path)) == []


def test_traceback_only_with_v_1(tmp_path, capsys):
  args = [f"--src={tmp_path}/none.pth", f"--out={tmp_path}/o"]
  assert convert.main(args) == 2
  assert "Traceback" not in capsys.readouterr().err
  assert convert.main(args + ["-v", "1"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: "), err


@pytest.mark.parametrize("name", COMMANDS)
def test_help_from_another_directory(name, tmp_path):
  r = command(name, "--help", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--" in r.stdout and "Traceback" not in r.stderr


def test_verbosity_of_argv():
  assert cli.verbosity(["p", "-v", "1"]) == 1 and cli.verbosity(["p", "--verbosity=2"]) == 2
  assert cli.verbosity(["p", "-v=1"]) == 1 and cli.verbosity(["p", "--config=x"]) == 0
