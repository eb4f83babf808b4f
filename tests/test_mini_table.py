"""The miniature Table 1 recipe: its configs fit together, and the script runs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import demo_mini
from glare_jax.train import init_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_source_stage_trains_every_weight_of_a_plain_vit_on_the_source_domain():
  c = demo_mini.get_config("stage=source")
  assert (c.dataset, c.objective, c.model.adapter_mode) == ("demo_source", "udi", "none")
  assert c.optim.param_preset == "full" and c.probe.every_epochs > 0
  assert c.num_epochs >= 4 * demo_mini.get_config().num_epochs   # a real schedule


@pytest.mark.parametrize("objective,levels,weights", [
    ("glare", "all", (1, 1, 1, 1)), ("glare", "glob", (1, 0, 0, 0)),
    ("glare", "glob_loc", (1, 0, 1, 1)), ("glare", "glob_reg", (1, 1, 0, 0)),
    ("glare", "reg_loc", (0, 1, 1, 1)), ("udi", "all", None), ("flsl", "all", None)])
def test_continual_stage_trains_adapters_on_the_target(objective, levels, weights):
  c = demo_mini.get_config(f"objective={objective},levels={levels}")
  assert (c.dataset, c.objective, c.optim.param_preset) == ("demo", objective, "adapters")
  if weights:
    g = c.glare
    assert (g.w_glob, g.w_reg, g.w_loc1, g.w_loc2) == weights
  # the fine-tune fits the continual run's backbone, and (without adapters) the source's
  seg = demo_mini.get_config("stage=seg")
  init_checkpoint.check_architecture(seg.model, c.model.to_dict(), "continual")
  seg.model.adapter_mode = "none"
  init_checkpoint.check_architecture(seg.model, demo_mini.get_config("stage=source")
                                     .model.to_dict(), "source")


def test_unknown_stage_is_refused():
  with pytest.raises(ValueError, match="stage='sauce'"):
    demo_mini.get_config("stage=sauce")


@pytest.mark.slow
def test_the_script_writes_a_table(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "scripts/mini_table.py", f"--workdir={tmp_path / 'mini'}", "--quick",
       "--seeds=2", "--rows=source,glob", f"--dataset_dir={tmp_path / 'tfds'}"],
      cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / "mini" / "table.md").read_text()
  assert "| UDI (source model, no continual step) |" in table
  assert "| GLARE: global only |" in table and "±" in table
  result = json.loads((tmp_path / "mini" / "table.json").read_text())
  assert len(result["rows"]["glob"]["probe"]) == 2
  assert len(result["rows"]["source"]["finetune"]) == 2
