"""Faults of converted checkpoints and of the readers of checkpoints: a kill during
`convert --overwrite`, flipped bits and truncations seen by every reader
(load_converted, embed, visualize, fine-tuning's init checkpoint)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from glare_jax import embed, integrity, visualize
from glare_jax.models import load
from glare_jax.models.vit import ModelSpec
from glare_jax.train import checkpoint, init_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = ModelSpec(variant="custom", patch_size=4, num_prefix=1, pos_grid=2, width=64, depth=1,
                 num_heads=1, mlp_dim=64, source_format="udi")


def params_of(value: float):
  return {"backbone": {"w": np.full((256, 64), value, np.float32),
                       "b": np.arange(64, dtype=np.float32) + value}}


def assert_holds(out: pathlib.Path, value: float) -> None:
  params, spec = load.load_converted(out)
  np.testing.assert_array_equal(params["backbone"]["w"], params_of(value)["backbone"]["w"])
  assert spec == SPEC


# The overwrite in a child process, SIGKILLed at one point of it.
KILLER = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from glare_jax import integrity
from glare_jax.models import load
import test_convert_faults as t

point = sys.argv[2]
def kill_after(fn):
  def wrapped(*a, **k):
    out = fn(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
  return wrapped
def kill_before(fn):
  def wrapped(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
  return wrapped
if point == "params written":
  import orbax.checkpoint as ocp
  ocp.StandardCheckpointer.save = kill_after(ocp.StandardCheckpointer.save)
elif point == "manifest written":
  integrity.write_manifest = kill_after(integrity.write_manifest)
elif point == "before the swap":
  load._exchange = kill_before(load._exchange)
elif point == "after the swap":
  load._exchange = kill_after(load._exchange)
load.save_converted(sys.argv[1], t.params_of(2.0), t.SPEC, overwrite=True)
"""
POINTS = {"params written": 1.0, "manifest written": 1.0, "before the swap": 1.0,
          "after the swap": 2.0}   # -> what the folder must hold after the kill


@pytest.mark.slow
def test_kill_during_overwrite_leaves_the_old_or_the_new_conversion(tmp_path):
  outs = {point: tmp_path / f"out{i}" for i, point in enumerate(POINTS)}
  for out in outs.values():
    load.save_converted(out, params_of(1.0), SPEC)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  procs = {point: subprocess.Popen(
      [sys.executable, "-c", KILLER, str(out), point, str(REPO / "tests")], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for point, out in outs.items()}
  for point, proc in procs.items():
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, (point, log)
  for point, out in outs.items():
    assert_holds(outs[point], POINTS[point])
    left = list(tmp_path.glob(f".{out.name}.convert-tmp-*"))
    if point == "after the swap":
      assert left                       # the old conversion, not yet removed
    notes = load.save_converted(out, params_of(3.0), SPEC, overwrite=True)
    assert_holds(out, 3.0)
    assert len(notes) == len(left) and all("interrupted conversion" in n for n in notes)
    assert not list(tmp_path.glob(f".{out.name}.convert-tmp-*"))


def test_overwrite_without_an_atomic_exchange(tmp_path, monkeypatch):
  out = tmp_path / "c"
  load.save_converted(out, params_of(1.0), SPEC)
  monkeypatch.setattr(load, "_exchange", lambda a, b: False)
  load.save_converted(out, params_of(2.0), SPEC, overwrite=True)
  assert_holds(out, 2.0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_exchange_swaps_two_folders(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  (a / "x").write_text("a"), (b / "x").write_text("b")
  if not load._exchange(a, b):
    pytest.skip("this system has no atomic exchange (the two-rename path is tested)")
  assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_conversion_into_a_folder_of_other_files_is_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=r"other files than a conversion.*notes.txt"):
    load.save_converted(tmp_path, params_of(1.0), SPEC)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def flip_bit(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset % len(data)] ^= 0x01
  path.write_bytes(bytes(data))


def largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"),
             key=lambda p: p.stat().st_size)


DAMAGE = {
    "array data, first byte": lambda d: flip_bit(largest_file(d / "params"), 0),
    "array data, middle": lambda d: flip_bit(largest_file(d / "params"),
                                             largest_file(d / "params").stat().st_size // 2),
    "array data, last byte": lambda d: flip_bit(largest_file(d / "params"), -1),
    "model.json": lambda d: flip_bit(d / "model.json", 20),
    "orbax metadata": lambda d: flip_bit(d / "params" / "_METADATA", 30),
    "truncated array data": lambda d: largest_file(d / "params").write_bytes(b"\0" * 10),
    "truncated manifest": lambda d: (d / "manifest.json").write_text("{\"files\": {"),
    "no manifest": lambda d: (d / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_conversion_is_refused_by_every_reader(damage, tmp_path, capsys):
  out = tmp_path / "c"
  load.save_converted(out, params_of(1.0), SPEC)
  assert_holds(out, 1.0)
  DAMAGE[damage](out)
  with pytest.raises(integrity.Damaged, match=r"--overwrite"):
    load.load_converted(out)
  with pytest.raises(ValueError, match=str(out)):
    init_checkpoint.read_backbone(out)
  with pytest.raises(ValueError, match=str(out)):
    visualize.load_backbone(out)
  code = embed.main(["--checkpoint", str(out), "--out", str(tmp_path / "e.npz"),
                     str(tmp_path / "image.png")])
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {out}: "), err


def test_damage_names_the_file(tmp_path):
  out = tmp_path / "c"
  load.save_converted(out, params_of(1.0), SPEC)
  flip_bit(out / "model.json", 5)
  with pytest.raises(integrity.Damaged, match=r"model\.json: its content differs"):
    load.load_converted(out)


def pretrain_workdir(path: pathlib.Path, steps=(5, 10)) -> pathlib.Path:
  """The layout init_checkpoint reads: config.json + checkpoints of {'teacher', 'params'}."""
  import jax  # pylint: disable=g-import-not-at-top
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps({"mode": "pretrain", "model": {}}))
  with checkpoint.Checkpointer(path, every_steps=1, keep=5) as ckpt:
    for s in steps:
      ckpt.save(s, jax.tree.map(np.asarray, {"teacher": params_of(s), "params": params_of(-s)}))
  return path / "checkpoints"


def test_init_checkpoint_of_a_workdir_skips_a_damaged_newest_step(tmp_path, caplog):
  root = pretrain_workdir(tmp_path / "run")
  flip_bit(largest_file(root / "10" / "state"), 9)
  assert init_checkpoint.latest_step(tmp_path / "run") == 5
  assert any("skipped step 10: state/" in r.getMessage() for r in caplog.records)
  assert (root / "10").is_dir()          # someone else's run: nothing renamed
  backbone = init_checkpoint.read_subtree(root / "5" / "state", "teacher", "backbone")
  np.testing.assert_array_equal(backbone["w"], params_of(5)["backbone"]["w"])
  (root / "5" / "manifest.json").unlink()
  with pytest.raises(integrity.Damaged, match=r"no intact checkpoint \(step 10: .*; step 5: "
                                              r"no manifest.json"):
    init_checkpoint.latest_step(tmp_path / "run")


def test_a_conversion_left_between_two_renames_is_named(tmp_path, monkeypatch):
  """Without the atomic exchange a kill between the two renames leaves no DIR:
  loading it names the complete conversion beside it."""
  out = tmp_path / "c"
  load.save_converted(out, params_of(1.0), SPEC)
  monkeypatch.setattr(load, "_exchange", lambda a, b: False)

  def killed(self, target):
    raise KeyboardInterrupt   # stands in for the kill, after DIR was moved aside

  original = pathlib.Path.rename
  monkeypatch.setattr(pathlib.Path, "rename", lambda self, target: (
      original(self, target) if self == out else killed(self, target)))
  with pytest.raises(KeyboardInterrupt):
    load.save_converted(out, params_of(2.0), SPEC, overwrite=True)
  monkeypatch.undo()
  assert not out.exists()
  with pytest.raises(FileNotFoundError, match=r"holds a complete conversion left by an "
                                              r"interrupted overwrite: rename it to c"):
    load.load_converted(out)
  notes = load.save_converted(out, params_of(3.0), SPEC)
  assert_holds(out, 3.0)
  assert len(notes) == 2 and not list(tmp_path.glob(".c.convert-tmp-*"))
