"""The README's "Your own images" commands, as written there, on real aerial tiles (the
LoveDA sample's images, unlabelled and then with their masks): convert, prepare,
GLARE pre-training and FPN fine-tuning with `:tiny`, on CPU."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from glare_jax.data import datasets
from glare_jax.train import logging as train_logging


def readme_commands() -> list[list[str]]:
  """The commands of the README section's bash block (continuations joined)."""
  text = (REPO / "README.md").read_text()
  section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
  return [shlex.split(ln) for ln in block.splitlines()
          if ln.strip() and not ln.strip().startswith("#")]


def with_args(cmd: list[str], replace: dict[str, str], extra=()) -> list[str]:
  """`cmd` with the values of the flags in `replace` swapped (each must be there)."""
  out, seen = [], set()
  for arg in cmd:
    flag, eq, _ = arg.partition("=")
    if out and out[-1] in replace and out[-1] not in seen:   # `--flag value`
      arg, _ = replace[out[-1]], seen.add(out[-1])
    elif flag in replace and eq:                             # `--flag=value`
      arg, _ = f"{flag}={replace[flag]}", seen.add(flag)
    out.append(arg)
  assert seen == set(replace), (cmd, replace)
  return out + list(extra)


def run(cmd: list[str], cache: pathlib.Path) -> subprocess.CompletedProcess:
  assert cmd[:2] == ["python", "-m"], cmd
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0",
         "JAX_COMPILATION_CACHE_DIR": str(cache)}
  out = subprocess.run([sys.executable, *cmd[1:]], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, shlex.join(cmd) + "\n" + out.stdout[-2000:] + out.stderr[-4000:]
  return out


def test_readme_section_has_the_four_steps():
  cmds = readme_commands()
  assert [c[2] for c in cmds] == ["glare_jax.convert", "glare_jax.data.prepare", "glare_jax.main",
                                  "glare_jax.data.prepare", "glare_jax.main"]
  assert "--config=configs/folder.py:name=tiles" in cmds[2]
  assert any(a.startswith("--masks=") for a in cmds[3])
  assert any(a.startswith("--config=configs/folder_seg.py:name=") for a in cmds[4])


@pytest.mark.slow
def test_readme_commands_on_the_loveda_sample(loveda_sample, tmp_path):
  pytest.importorskip("torch", reason="the convert step reads a .pth: needs the 'convert' extra")
  from glare_jax.testing import write_udi_checkpoint
  convert, prepare, pretrain, prepare_labelled, finetune = readme_commands()
  # The sample as someone's own folders: images (nested), masks mirroring them.
  images, masks = tmp_path / "tiles", tmp_path / "masks"
  for tile in sorted(loveda_sample.glob("*/*/images_png/*.png")):
    domain = tile.parents[1].name
    for dst, src in ((images, tile), (masks, tile.parents[1] / "masks_png" / tile.name)):
      (dst / domain).mkdir(parents=True, exist_ok=True)
      shutil.copy(src, dst / domain / tile.name)
  data_dir, cache = tmp_path / "tfds", tmp_path / "cache"
  ckpt, pre, seg = tmp_path / "ckpt", tmp_path / "glare", tmp_path / "seg"
  pth = write_udi_checkpoint(tmp_path / "udi_random.pth")

  run(with_args(convert, {"--src": str(pth), "--out": str(ckpt)}), cache)
  # 1. unlabelled: prepare, then GLARE pre-training (:tiny, batch 2 of the 3 tiles)
  out = run(with_args(prepare, {"--images": str(images)}, [f"--data_dir={data_dir}"]), cache)
  assert "ETA" in out.stderr
  name = next(a for a in prepare if a.startswith("--name=")).split("=")[1]
  tiny = ["--config.batch_size=2", "--config.num_epochs=2", "--config.tensorboard=False",
          f"--config.data_dir={data_dir}"]
  config = next(a for a in pretrain if a.startswith("--config=")).split("=", 1)[1]
  run(with_args(pretrain, {"--config": config + ",tiny", "--workdir": str(pre),
                           "--config.init_checkpoint": str(ckpt)}, tiny), cache)
  logged = train_logging.read_metrics(pre / "metrics.jsonl")
  assert logged[-1]["step"] == 2 and "loss/reg" in logged[-1]
  assert (data_dir / "folder" / name).is_dir()

  # 2. with masks (LoveDA's ids: 0 is no-data): prepare, then fine-tune the teacher
  classes = ",".join(datasets.LOVEDA_CLASSES)
  run(with_args(prepare_labelled, {"--images": str(images), "--masks": str(masks),
                                   "--classes": classes},
                [f"--data_dir={data_dir}", "--reduce_zero_label"]), cache)
  labelled = next(a for a in prepare_labelled if a.startswith("--name=")).split("=")[1]
  info = datasets.get_info(f"folder/{labelled}", str(data_dir))
  assert (info.class_names, info.reduce_zero_label) == (datasets.LOVEDA_CLASSES, True)
  config = next(a for a in finetune if a.startswith("--config=")).split("=", 1)[1]
  run(with_args(finetune, {"--config": config + ",tiny", "--workdir": str(seg),
                           "--config.init_checkpoint": str(pre)},
                tiny[:1] + tiny[2:] + ["--config.total_steps=3",
                                       "--config.optim.warmup_steps=1"]), cache)
  result = json.loads((seg / "eval.json").read_text())
  assert "mIoU" in json.dumps(result)
  assert set(datasets.LOVEDA_CLASSES) <= set(re.findall(r'"([a-z]+)"', json.dumps(result)))


@pytest.mark.slow
def test_notebook_02_on_a_folder_of_images(loveda_sample, tmp_path, monkeypatch):
  """Notebook 02 with IMAGES_DIR (the sample's two training tiles) instead of LoveDA."""
  pytest.importorskip("torch", reason="notebook 02 converts a .pth: needs the 'convert' extra")
  from test_notebooks import NAMES, execute
  monkeypatch.delenv("XLA_FLAGS", raising=False)    # one CPU device, as a user has
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  execute(NAMES[1], tmp_path, IMAGES_DIR=str(loveda_sample / "Train" / "Rural" / "images_png"))
  run = tmp_path / "runs/glare_images"
  assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
  assert list((tmp_path / "tensorflow_datasets/folder/own_images").glob("*/*.array_record*"))
  assert not (tmp_path / "tensorflow_datasets/loveda").exists()
