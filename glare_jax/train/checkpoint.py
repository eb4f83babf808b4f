"""Checkpoints of a run: the train state pytree plus the data iterator position.

    ckpt = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                        keep=config.keep_checkpoints)
    ckpt.check_space(shapes)              # refuses a disk too small for one checkpoint
    if ckpt.latest_step() is not None:    # the newest intact step, verified
      state = ckpt.restore(abstract_state(shapes, shardings), data_iter)
    ...
    ckpt.check()                          # every step: a failed background save stops
    if ckpt.due(step) or step == total_steps:
      ckpt.save(step, state, data_iter)
    ckpt.close()   # waits for the last (asynchronous) save

Layout: `workdir/checkpoints/<step>/{state, data}`. `state` is any pytree of
jax.Arrays (params, optimizer state, EMA teacher, centres, step, rng key);
`data` holds one file per process, `process_<i>-of-<n>.json` (or `.bin` for
iterators whose `get_state()` returns bytes), so each host resumes its own
input shard where it stopped.

Atomicity comes from orbax: a step is written to `<step>.orbax-checkpoint-tmp*`
and renamed once every process has finished, so a crash mid-write leaves the
previous checkpoints intact; the unfinished directory is ignored and deleted
when the next run opens the manager. Then process 0 writes `<step>/manifest.json`
(`glare_jax.integrity`: size and hash of every file); a step without a valid one
is not intact. A resumed run verifies it, sets a damaged newest step aside as
`<step>.damaged` (never deletes it) and resumes from the newest intact one.
Failures raise CheckpointError subclasses with a one-line message
(docs/DESIGN.md, "The training loop": Checkpoints).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from glare_jax import integrity


# --- the data-iterator item ----------------------------------------------------------

def _data_file(directory: epath.Path, suffix: str) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}{suffix}"


class DataStateHandler(ocp.CheckpointHandler):
  """Saves a data iterator's `get_state()` (JSON-able object or bytes) per process."""

  def save(self, directory: epath.Path, args: DataStateSave):
    if isinstance(args.state, bytes):
      _data_file(directory, ".bin").write_bytes(args.state)
    else:
      _data_file(directory, ".json").write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
    del args
    if (f := _data_file(directory, ".json")).exists():
      return json.loads(f.read_text())
    if (f := _data_file(directory, ".bin")).exists():
      return f.read_bytes()
    written = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory} has no data-iterator state for process {jax.process_index()} of "
        f"{jax.process_count()} (it holds {written}); the checkpoint was written by a "
        "different number of processes")


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# --- the manager ---------------------------------------------------------------------

TMP_MARK = ".orbax-checkpoint-tmp"   # orbax's suffix for a step still being written
ASIDE_MARK = ".damaged"              # <step>.damaged[-k]: a step that failed its check


class CheckpointError(Exception):
  """A checkpoint problem that stops the run; the message is one line naming the path."""


class SaveFailed(CheckpointError):
  """A save (or its manifest) could not be written: full disk, lost mount, ..."""


class NoIntactCheckpoint(CheckpointError):
  """Every checkpoint of the workdir failed its check; nothing was renamed."""


def _remove_unfinished(directory: epath.Path) -> None:
  """Deletes what a save interrupted by a crash left (`<step>.orbax-checkpoint-tmp*`).

  orbax would also do it, but in the background; doing it first makes a restart
  start from a clean directory.
  """
  if directory.exists():
    for path in directory.iterdir():
      if TMP_MARK in path.name:
        logging.warning("checkpoint: removing unfinished save %s", path)
        path.rmtree()


def _cause(e: BaseException) -> str:
  """The first line of an exception, e.g. "[Errno 28] No space left on device: '...'"."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """`jax.eval_shape` output + shardings -> restore target (ShapeDtypeStructs)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def state_bytes(shapes: Any) -> int:
  """Bytes of a state's arrays: what one checkpoint needs at most (orbax compresses)."""
  return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
             for s in jax.tree.leaves(shapes) if hasattr(s, "dtype")
             and not jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key))


class Checkpointer:
  """orbax CheckpointManager over `workdir/checkpoints`, keeping the last `keep`.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices (so the state may be donated right after) and the files are written in
  the background. A save is finished when its `manifest.json` (content hashes,
  `glare_jax.integrity`) is written; only then are older steps beyond `keep`
  deleted. Call `check()` every step: it raises SaveFailed as soon as a
  background save failed. `restore` verifies the manifest and falls back to the
  newest intact step. `every_steps` <= 0 disables periodic saves (`due` is False).
  """

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    path = os.fspath(workdir)
    if "://" not in path:   # orbax refuses relative paths: `--workdir=runs/x` is common
      path = os.path.abspath(os.path.expanduser(path))
    self.directory = epath.Path(path) / "checkpoints"
    self.every_steps = int(every_steps)
    self.keep = int(keep) if keep and keep > 0 else None
    self._pending: int | None = None             # step saved, manifest not yet written
    self._hashing: concurrent.futures.Future | None = None
    self._hasher = concurrent.futures.ThreadPoolExecutor(1, "checkpoint_manifest")
    if jax.process_index() == 0:
      _remove_unfinished(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,                    # old steps go once a newer one is finished
        cleanup_tmp_directories=True,        # remove what a crashed save left behind
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def due(self, step: int) -> bool:
    """True every `every_steps` steps (the loop also saves at its last step)."""
    return self.every_steps > 0 and step % self.every_steps == 0

  def check_space(self, shapes: Any) -> None:
    """Raises CheckpointError when the disk cannot hold one more checkpoint of a
    state shaped like `shapes` (ShapeDtypeStructs); call it before training."""
    need = state_bytes(shapes)
    self.directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(os.fspath(self.directory)).free
    if free < need:
      raise CheckpointError(
          f"{self.directory}: {free / 1e9:.2f} GB free, one checkpoint needs up to "
          f"{need / 1e9:.2f} GB; free some space or use another --workdir")

  def save(self, step: int, state: Any, data_iter: Any = None) -> bool:
    """Saves `state` (and `data_iter.get_state()`) as `step`; False if it exists.

    Only save a state known to be good: check the metrics of every step since the
    last save for NaN/Inf first (`logging.MetricLogger.flush` does). Raises
    SaveFailed when this or the previous save could not be written.
    """
    self.wait()                              # the previous save is finished (or raises)
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = DataStateSave(data_iter.get_state())
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 - any write failure stops the run the same way
      raise self._failed(step, e) from e
    self._pending = step
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def _failed(self, step: int, e: BaseException) -> SaveFailed:
    kept = [s for s in self._manager.all_steps() if s != step]
    return SaveFailed(
        f"checkpoint: saving step {step} to {self.directory / str(step)} failed: {_cause(e)}; "
        + (f"step {max(kept)} is intact" if kept else "no earlier checkpoint"))

  def check(self) -> None:
    """Non-blocking: finishes a save whose files are written (manifest, old steps
    deleted); raises SaveFailed when it failed. Call it every step."""
    if self._pending is None:
      return
    if self._hashing is None:
      if self._manager.is_saving_in_progress():
        return
      self._start_manifest()
    if self._hashing.done():
      self._finish()

  def _start_manifest(self) -> None:
    step = self._pending
    try:
      self._manager.wait_until_finished()    # returns at once; raises what the save hit
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._pending = None
      raise self._failed(step, e) from e
    folder = pathlib.Path(os.fspath(self.directory / str(step)))
    if not folder.is_dir():                  # orbax logged the fault and did not finish
      self._pending = None
      raise self._failed(step, FileNotFoundError("the save did not finish (see the log)"))
    if jax.process_index() == 0:
      self._hashing = self._hasher.submit(integrity.write_manifest, folder)
    else:
      self._hashing = concurrent.futures.Future()
      self._hashing.set_result(None)

  def _finish(self) -> None:
    step, hashing = self._pending, self._hashing
    self._pending = self._hashing = None
    try:
      hashing.result()
    except Exception as e:  # noqa: BLE001
      raise self._failed(step, e) from e
    if self.keep is not None:                # delete the oldest beyond `keep`
      for old in self.all_steps()[:-self.keep]:
        self._manager.delete(old)

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is finished; raises SaveFailed."""
    if self._pending is None:
      return
    if self._hashing is None:
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001
        step, self._pending = self._pending, None
        raise self._failed(step, e) from e
      self._start_manifest()
    self._finish()

  def restore(self, target: Any, data_iter: Any = None, step: int | None = None) -> Any:
    """Restores `step` (default: the newest intact one) into `target`'s shardings.

    `target` is a pytree of jax.ShapeDtypeStructs carrying shardings (see
    `abstract_state`); each process reads only its own shards. With `data_iter`,
    its position is restored too (`set_state`). The step's manifest is verified
    first; without `step`, newer steps that fail it are renamed aside
    (`<step>.damaged`) with a one-line warning each. Raises NoIntactCheckpoint
    (nothing renamed) when no step verifies, integrity.Damaged for a given `step`.
    """
    root = pathlib.Path(os.fspath(self.directory))
    if step is None:
      step = self._newest_intact(root)
    else:
      integrity.verify(root / str(step))
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data"] = DataStateRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(out["data"])
    logging.info("checkpoint: restored step %d from %s (manifest verified)", step,
                 self.directory)
    workdir = pathlib.Path(os.fspath(self.directory)).parent
    if (pending := _PENDING_CONFIG.pop(str(workdir.resolve()), None)) is not None:
      _write_config(workdir, pending)
    return out["state"]

  def _newest_intact(self, root: pathlib.Path) -> int:
    step, damaged = integrity.newest_intact(root)
    if step is None:
      found = integrity.describe(damaged) or "none"
      raise NoIntactCheckpoint(
          f"{root}: no intact checkpoint to resume from ({found}); move the folder aside "
          "(or use another --workdir) to start afresh")
    if damaged:
      if jax.process_index() == 0:
        for bad, problem in damaged:
          aside = _set_aside(root / str(bad))
          logging.warning("checkpoint: step %d: %s; renamed to %s, resuming from step %d",
                          bad, problem, aside.name, step)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("checkpoint: damaged steps set aside")
      self._manager.reload()
    return step

  def intact_note(self) -> str:
    """Where a stopped run can resume: "the newest intact checkpoint is step N (DIR)"."""
    try:
      self.wait()
    except SaveFailed:
      pass
    step, _ = integrity.newest_intact(os.fspath(self.directory))
    if step is None:
      return f"there is no intact checkpoint in {self.directory}"
    return f"the newest intact checkpoint is step {step} ({self.directory / str(step)})"

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._hasher.shutdown()
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
      return
    try:                                      # the run already stops with an error:
      self.close()                            # do not hide it behind a second one
    except Exception as e:  # noqa: BLE001
      logging.warning("checkpoint: while stopping: %s", _cause(e))


def _set_aside(folder: pathlib.Path) -> pathlib.Path:
  """Renames a damaged step folder to `<step>.damaged` (`-2`, ... if taken)."""
  aside, k = folder.with_name(folder.name + ASIDE_MARK), 1
  while aside.exists():
    k += 1
    aside = folder.with_name(f"{folder.name}{ASIDE_MARK}-{k}")
  folder.rename(aside)
  return aside


# --- the config a workdir was started with ----------------------------------------------

# Fields that may change between a run and its resumption: they change how the
# run executes, not what it computes. `init_checkpoint` and `init_which` are only
# read by a fresh start (a resumed run takes its state from its own checkpoints);
# fine-tuning's `eval` settings only change the evaluations, which a resumed run
# repeats; `num_seeds` only says how many seed runs the multi-seed program starts;
# pre-training's `probe` only changes its evaluations.
RESUMABLE_CHANGES = ("data_dir", "num_workers", "prefetch", "log_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints", "tensorboard", "mesh",
                     "distributed", "init_checkpoint", "init_which", "eval", "num_seeds",
                     "data_cache", "probe")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a finished checkpoint (a re-run resumes from it)."""
  root = pathlib.Path(workdir).expanduser() / "checkpoints"
  return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def check_config(config: Any, workdir: str | os.PathLike,
                 allow_changes: bool = False) -> None:
  """Keeps `workdir/config.json`; refuses to resume under an incompatible config.

  When the workdir already holds checkpoints, every field except
  RESUMABLE_CHANGES must equal the stored config's (a different model size,
  objective or batch size would resume into a different experiment); the error
  lists the differences. `allow_changes` overrides the check, except for a
  change of mode; the new config.json is then written once the restore succeeded.
  Process 0 writes, and only a changed file.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  new = json.loads(config.to_json())
  if path.exists() and has_checkpoints(workdir):
    old = _flatten(json.loads(path.read_text()))
    cur = _flatten(new)
    diff = sorted(k for k in set(old) | set(cur)
                  if old.get(k, "<absent>") != cur.get(k, "<absent>")
                  and k.split(".")[0] not in RESUMABLE_CHANGES)
    if "mode" in diff:
      raise ValueError(
          f"{workdir} holds {old.get('mode')} checkpoints; a {cur.get('mode')} config cannot "
          f"resume them, even with --allow_config_change: use a new --workdir (a "
          f"fine-tuning run reads a pre-training workdir through config.init_checkpoint)")
    if diff and not allow_changes:
      lines = "\n".join(f"  {k}: {old.get(k, '<absent>')!r} -> {cur.get(k, '<absent>')!r}"
                        for k in diff)
      raise ValueError(
          f"{workdir} holds checkpoints of a run with a different config ({path}):\n"
          f"{lines}\nuse a new --workdir, or pass --allow_config_change to resume anyway")
    if diff:   # written by `Checkpointer.restore` once the old state has loaded
      logging.warning("resuming %s with config changes: %s", workdir, diff)
      _PENDING_CONFIG[str(workdir.expanduser().resolve())] = new
      return
  _write_config(workdir, new)


# workdir -> config.json of a run resumed with --allow_config_change, kept until its
# restore succeeded (a failed restore leaves the workdir as it was).
_PENDING_CONFIG: dict[str, Any] = {}


def _write_config(workdir: pathlib.Path, config: dict[str, Any]) -> None:
  path = workdir / "config.json"
  text = json.dumps(config, indent=2, sort_keys=True)
  if jax.process_index() != 0 or (path.exists() and path.read_text() == text):
    return
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(text)
  tmp.replace(path)
