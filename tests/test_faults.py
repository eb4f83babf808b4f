"""Faults of training checkpoints: flipped bits, truncations, a full disk.

Each damaged checkpoint must be noticed (never loaded), set aside (never
deleted) and the newest intact one resumed; a failed save must stop the run at
once with one line. The manifests are checked against hashes computed here with
hashlib, apart from glare_jax.integrity.
"""

import errno
import hashlib
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_trainer
from glare_jax import integrity
from glare_jax.train import checkpoint, sharding
from glare_jax.train import logging as train_logging


def make_state(value: float):
  mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1)))
  repl = sharding.replicated(mesh)
  w = np.random.default_rng(int(value)).normal(size=(64, 32)).astype(np.float32)
  return {"w": jax.device_put(jnp.asarray(w), repl),
          "step": jax.device_put(jnp.int32(value), repl)}


def target_of(state):
  return checkpoint.abstract_state(jax.eval_shape(lambda: state),
                                   jax.tree.map(lambda x: x.sharding, state))


def save_steps(workdir, steps=(1, 2), keep=3):
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=keep) as ckpt:
    for s in steps:
      ckpt.save(s, make_state(s))
  return pathlib.Path(workdir) / "checkpoints"


def restore(workdir):
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=3) as ckpt:
    return ckpt.restore(target_of(make_state(0)))


def flip_bit(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset % len(data)] ^= 0x10
  path.write_bytes(bytes(data))


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def test_manifest_lists_every_file_with_its_hash(tmp_path):
  root = save_steps(tmp_path, steps=(1,))
  step = root / "1"
  manifest = json.loads((step / "manifest.json").read_text())["files"]
  on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
  assert sorted(manifest) == on_disk and any(f.startswith("state/") for f in on_disk)
  for rel, entry in manifest.items():
    data = (step / rel).read_bytes()
    assert entry["size"] == len(data)
    assert entry["blake2b"] == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_old_steps_are_deleted_only_after_a_newer_one_is_finished(tmp_path):
  root = save_steps(tmp_path, steps=(1, 2, 3), keep=2)
  assert sorted(p.name for p in root.iterdir()) == ["2", "3"]
  for s in ("2", "3"):
    integrity.verify(root / s)


DAMAGE = {   # name -> (file of step 2, how it is damaged)
    "array data, first byte": (largest_array_file, lambda p: flip_bit(p, 0)),
    "array data, middle": (largest_array_file, lambda p: flip_bit(p, p.stat().st_size // 2)),
    "array data, last byte": (largest_array_file, lambda p: flip_bit(p, -1)),
    "array metadata": (lambda d: d / "state" / "_METADATA", lambda p: flip_bit(p, 40)),
    "step metadata": (lambda d: d / "_CHECKPOINT_METADATA", lambda p: flip_bit(p, 5)),
    "manifest": (lambda d: d / "manifest.json", lambda p: flip_bit(p, p.stat().st_size // 2)),
    "truncated array data": (largest_array_file,
                             lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "truncated metadata json": (lambda d: d / "state" / "_METADATA",
                                lambda p: p.write_bytes(p.read_bytes()[:-7])),
    "truncated manifest": (lambda d: d / "manifest.json",
                           lambda p: p.write_bytes(p.read_bytes()[:30])),
    "manifest missing (killed before it was written)": (
        lambda d: d / "manifest.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_step_falls_back_to_the_previous(damage, tmp_path, caplog):
  root = save_steps(tmp_path)
  which, how = DAMAGE[damage]
  path = which(root / "2")
  rel = path.relative_to(root / "2").as_posix()
  how(path)
  damaged_bytes = {p.relative_to(root / "2"): p.read_bytes()
                   for p in (root / "2").rglob("*") if p.is_file()}
  with caplog.at_level(logging.WARNING):
    out = restore(tmp_path)
  assert int(out["step"]) == 1
  np.testing.assert_array_equal(out["w"], make_state(1)["w"])
  notices = [r.getMessage() for r in caplog.records if "resuming from step 1" in r.getMessage()]
  assert len(notices) == 1 and "\n" not in notices[0], notices
  assert "step 2" in notices[0] and "2.damaged" in notices[0]
  if rel != "manifest.json":
    assert rel in notices[0]              # names the file at fault
  # Nothing deleted: the damaged step is kept, byte for byte, beside the checkpoints.
  assert not (root / "2").exists()
  kept = {p.relative_to(root / "2.damaged"): p.read_bytes()
          for p in (root / "2.damaged").rglob("*") if p.is_file()}
  assert kept == damaged_bytes
  # The run goes on: step 2 is saved again, the damaged folder stays.
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, make_state(2))
  assert sorted(p.name for p in root.iterdir()) == ["1", "2", "2.damaged"]


def test_no_intact_step_is_one_error_listing_what_was_found(tmp_path):
  root = save_steps(tmp_path)
  flip_bit(largest_array_file(root / "1"), 3)
  (root / "2" / "manifest.json").unlink()
  with pytest.raises(checkpoint.NoIntactCheckpoint) as e:
    restore(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and "no intact checkpoint" in msg
  assert "step 2: no manifest.json" in msg and "step 1: state/" in msg
  assert sorted(p.name for p in root.iterdir()) == ["1", "2"]   # nothing renamed


def test_restoring_a_given_damaged_step_raises(tmp_path):
  root = save_steps(tmp_path)
  flip_bit(largest_array_file(root / "1"), 7)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    with pytest.raises(integrity.Damaged, match=r"1: state/.*differs"):
      ckpt.restore(target_of(make_state(0)), step=1)


def enospc(path="checkpoints/x"):
  return OSError(errno.ENOSPC, "No space left on device", path)


def test_enospc_in_the_background_stops_at_the_next_check(tmp_path, monkeypatch):
  """A failure in orbax's background commit (fault injected into its futures)."""
  save_steps(tmp_path, steps=(1,))
  original = ocp.StandardCheckpointHandler.async_save

  class FailingFuture:
    def result(self, timeout=None):
      del timeout
      raise enospc(str(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "state"))

  async def async_save(self, directory, *args, **kwargs):
    return list(await original(self, directory, *args, **kwargs) or []) + [FailingFuture()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    ckpt.save(2, make_state(2))            # returns: the files are written in the background
    with pytest.raises(checkpoint.SaveFailed) as e:
      for _ in range(200):                 # the loop's per-step check
        ckpt.check()
        time.sleep(0.02)
  msg = str(e.value)
  assert "\n" not in msg and "No space left on device" in msg
  assert "saving step 2" in msg and str(tmp_path / "checkpoints" / "2") in msg
  assert "step 1 is intact" in msg
  integrity.verify(tmp_path / "checkpoints" / "1")
  assert int(restore(tmp_path)["step"]) == 1


def test_enospc_writing_the_manifest_stops_the_loop(tmp_path, monkeypatch):
  def full(folder):
    raise enospc(str(pathlib.Path(folder) / "manifest.json.tmp"))

  monkeypatch.setattr(checkpoint.integrity, "write_manifest", full)
  opts = tiny_trainer.Options(steps=12, checkpoint_every=4, log_every=1)
  with pytest.raises(checkpoint.SaveFailed, match=r"saving step 4 .*No space left on device"):
    tiny_trainer.train(tmp_path, opts)
  # At the first check after orbax finished writing (on this tiny model that may
  # take until the next save; test_enospc_in_the_background pins the check itself).
  steps = [r["step"] for r in train_logging.read_metrics(tmp_path / "metrics.jsonl")]
  assert 4 <= steps[-1] <= 8, steps
  root = tmp_path / "checkpoints"
  assert integrity.problem(root / "4").startswith("no manifest.json")


def test_enospc_in_the_data_writer_is_reported_at_once(tmp_path, monkeypatch):
  save_steps(tmp_path, steps=(1,))

  def full(self, directory, args):
    raise enospc(str(directory))

  monkeypatch.setattr(checkpoint.DataStateHandler, "save", full)
  data = tiny_trainer.make_pipeline(tiny_trainer.make_data(), 8, seed=0)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    with pytest.raises(checkpoint.SaveFailed, match="saving step 2 .*No space left"):
      ckpt.save(2, make_state(2), data)
  integrity.verify(tmp_path / "checkpoints" / "1")


def test_a_disk_too_small_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
  state = make_state(1)
  need = 64 * 32 * 4 + 4
  assert checkpoint.state_bytes(jax.eval_shape(lambda: state)) == need
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda _: type("U", (), {"free": need - 1, "total": 0, "used": 0})())
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"GB free, one checkpoint needs"):
      ckpt.check_space(jax.eval_shape(lambda: state))
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda _: type("U", (), {"free": need, "total": 0, "used": 0})())
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    ckpt.check_space(jax.eval_shape(lambda: state))


def test_nan_message_names_the_newest_intact_checkpoint(tmp_path):
  opts = tiny_trainer.Options(steps=12, checkpoint_every=4, log_every=3, nan_at_step=10)
  with pytest.raises(train_logging.NonFiniteError,
                     match=r"newest intact checkpoint is step 8 \(.*checkpoints/8\)"):
    tiny_trainer.train(tmp_path / "a", opts)
  opts = tiny_trainer.Options(steps=12, checkpoint_every=4, log_every=3, nan_at_step=2)
  with pytest.raises(train_logging.NonFiniteError, match="there is no intact checkpoint"):
    tiny_trainer.train(tmp_path / "b", opts)


@pytest.mark.slow
def test_flipped_bit_in_the_latest_checkpoint_resumes_from_the_previous(tmp_path):
  """End to end: a program run, a bit flipped in its last save, a re-run: one
  notice, exit 0, the same parameters as a run that never saw the fault."""
  cache = tmp_path / "jax_cache"
  common = ["--checkpoint_every=4", "--log_every=2", "--keep=3"]
  first = tiny_trainer.launch([f"--workdir={tmp_path / 'w'}", "--steps=8", *common],
                              cache_dir=cache)
  clean = tiny_trainer.launch([f"--workdir={tmp_path / 'clean'}", "--steps=12",
                               f"--out={tmp_path / 'clean.npz'}", *common], cache_dir=cache)
  out_first, out_clean = tiny_trainer.finish(first, clean)
  assert first.returncode == 0 and clean.returncode == 0, out_first + out_clean
  flip_bit(largest_array_file(tmp_path / "w" / "checkpoints" / "8"), 11)
  again = tiny_trainer.launch([f"--workdir={tmp_path / 'w'}", "--steps=12",
                               f"--out={tmp_path / 'w.npz'}", *common], cache_dir=cache)
  (out,) = tiny_trainer.finish(again)
  assert again.returncode == 0, out
  notices = [line for line in out.splitlines() if "resuming from step 4" in line]
  assert len(notices) == 1 and "step 8: state/" in notices[0], out
  a, b = np.load(tmp_path / "clean.npz"), np.load(tmp_path / "w.npz")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  names = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
  assert names == ["12", "4", "8", "8.damaged"]


def test_prepare_removes_the_folder_a_killed_prepare_left(tmp_path, caplog):
  from glare_jax.data import builders, prepare  # pylint: disable=g-import-not-at-top
  kw = dict(num_train=3, num_validation=1, image_size=32, seed=1)
  final = pathlib.Path(builders.get_builder("demo", tmp_path, **kw).data_dir)
  left = final.parent / f"incomplete.AB12CD_{final.name}"       # as tfds names it
  other = final.parent / "incomplete.EF34GH_0.0.1"               # another version's: kept
  for d in (left, other):
    (d / "demo-train.array_record-00000-of-00001").parent.mkdir(parents=True)
    (d / "demo-train.array_record-00000-of-00001").write_bytes(b"\0" * 100)
  with caplog.at_level(logging.WARNING):
    assert prepare.prepare("demo", tmp_path, **kw) == final
  assert not left.exists() and other.exists() and final.is_dir()
  said = [r.getMessage() for r in caplog.records if "interrupted prepare" in r.getMessage()]
  assert said == [f"removing {left}, left by an interrupted prepare"]


def test_the_program_resumes_past_a_flipped_bit_and_stops_when_none_is_intact(tmp_path):
  """glare_jax.main: a damaged newest step is one notice and exit 0; no intact step
  is one `error:` line and exit 2, without a traceback."""
  from test_main_config import main_program  # pylint: disable=g-import-not-at-top
  root = save_steps(tmp_path / "run")
  flip_bit(largest_array_file(root / "2"), 1)
  args = ["--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'run'}",
          f"--config.data_dir={tmp_path / 'data'}"]
  modes = {"pretrain": "restore_mode"}
  r = main_program(args, modes)
  assert r.returncode == 0, r.stderr
  assert "resumed step 1" in r.stdout
  notices = [ln for ln in r.stderr.splitlines() if "resuming from step 1" in ln]
  assert len(notices) == 1 and "step 2: state/" in notices[0], r.stderr
  flip_bit(largest_array_file(root / "1"), 1)
  r = main_program(args, modes)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {root}: no intact checkpoint to resume from (step 1: state/")
  assert "step 2.damaged" not in last and "Traceback" not in r.stderr
