"""Config files and the absl entry point: arguments, overrides, dispatch, resume check."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from glare_jax.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"loveda": "51.5", "ade20k": "41.6", "cityscapes": "75.3",
           "pascal_context": "49.3", "demo": None}


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_files(name):
  module = load(name)
  doc = module.__doc__
  assert f"python -m glare_jax.main --config=configs/{name}.py" in doc
  if CONFIGS[name]:
    assert f"mIoU {CONFIGS[name]}" in doc and "A100" in doc
  c = module.get_config()
  assert (c.mode, c.dataset, c.objective) == ("pretrain", name, "glare")
  if name == "demo":
    assert c.model.variant == "tiny_test" and c.num_epochs <= 10
  else:   # the paper's run
    assert (c.model.variant, c.batch_size, c.num_epochs, c.head.out_dim) == ("S", 512, 100, 8192)
  tiny = module.get_config("tiny,objective=udi")
  assert (tiny.model.variant, tiny.objective) == ("tiny_test", "udi")
  with pytest.raises(ValueError, match="unknown config argument 'tiyn'"):
    module.get_config("tiyn")


def main_program(args, modes=None, code=None):
  """Runs glare_jax.main's absl program in a fresh interpreter (repository root)."""
  patch = f"m.MODES.update({modes!r}); " if modes else ""
  code = code or ("import glare_jax.main as m; " + patch +
                  "m.cli.run(m.main)")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
         "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_entry_point_parses_arguments_and_overrides(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/loveda.py:tiny,objective=udi", f"--workdir={workdir}",
          "--config.batch_size=16", "--config.optim.base_lr=3e-4",
          "--config.crops.global_scale=(0.3,1.0)", "--config.mesh.data=1",
          "--config.mesh.fsdp_rules=(('backbone/.*/kernel','fsdp'),('head/.*',None))"]
  r = main_program(args, {"pretrain": "echo_mode"})
  assert r.returncode == 0, r.stderr
  got = json.loads((workdir / "received.json").read_text())
  assert got["model"]["variant"] == "tiny_test" and got["objective"] == "udi"
  assert got["batch_size"] == 16 and got["optim"]["base_lr"] == 3e-4
  assert got["crops"]["global_scale"] == [0.3, 1.0] and got["mesh"]["data"] == 1
  assert got["mesh"]["fsdp_rules"] == [["backbone/.*/kernel", "fsdp"], ["head/.*", None]]
  assert got["dataset"] == "loveda" and got["crops"]["local_size"] == 32
  assert json.loads((workdir / "config.json").read_text()) == got

  # The workdir now holds a checkpoint: a different model may not resume it.
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=1) as ckpt:
    ckpt.save(1, {"step": jnp.int32(1), "w": jax.numpy.zeros((2,))})
  r = main_program([*args, "--config.model.variant=S"], {"pretrain": "echo_mode"})
  assert r.returncode != 0
  assert "holds checkpoints of a run with a different config" in r.stderr
  assert "model.variant: 'tiny_test' -> 'S'" in r.stderr
  assert json.loads((workdir / "received.json").read_text())["model"]["variant"] == "tiny_test"
  # Operational changes resume; --allow_config_change forces the rest, but the
  # workdir's config.json changes only once a restore succeeded (echo_mode restores none).
  r = main_program([*args, "--config.log_every_steps=7", "--config.model.variant=S",
                    "--allow_config_change"], {"pretrain": "echo_mode"})
  assert r.returncode == 0, r.stderr
  assert json.loads((workdir / "received.json").read_text())["model"]["variant"] == "S"
  assert json.loads((workdir / "config.json").read_text())["model"]["variant"] == "tiny_test"


def test_bad_input_is_one_error_line_and_exit_2(tmp_path):
  """The real pre-training check: an unprepared dataset fails before the workdir
  exists, as `error: ...` naming the folder and the command that prepares it."""
  workdir, data = tmp_path / "run", tmp_path / "data"
  r = main_program(["--config=configs/loveda.py:tiny", f"--workdir={workdir}",
                    f"--config.data_dir={data}"])
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()
  assert last[-2].startswith(f"error: FileNotFoundError: dataset 'loveda' is not prepared in {data}")
  assert "python -m glare_jax.data.prepare --dataset=loveda" in last[-1]
  assert "Traceback" not in r.stderr and not workdir.exists()


def test_mode_dispatch_errors(tmp_path):
  code = "\n".join([
      "import sys; sys.path.insert(0, '.')",
      "import glare_jax.main as m",
      "from configs import demo",
      "c = demo.get_config()",
      "c.mode = 'bogus'",
      "try: m.run_mode(c, sys.argv[1])",
      "except ValueError as e: print('ERR1', e)",
      "c.mode = 'pretrain'",
      "m.MODES['pretrain'] = 'glare_jax.train.no_such_loop'",
      "try: m.run_mode(c, sys.argv[1])",
      "except ModuleNotFoundError as e: print('ERR2', e)",
  ])
  r = main_program([str(tmp_path)], code=code)
  assert r.returncode == 0, r.stderr
  assert "ERR1 config.mode='bogus' is not a known mode; known: ['finetune', 'pretrain']" in r.stdout
  assert ("ERR2 config.mode='pretrain' needs the module glare_jax.train.no_such_loop"
          in r.stdout)


def test_entry_point_requires_workdir():
  r = main_program(["--config=configs/demo.py"])
  assert r.returncode != 0 and "--workdir" in r.stderr
