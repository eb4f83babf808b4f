"""Checkpoints of a run: the train state pytree plus the data iterator position.

    ckpt = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                        keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(abstract_state(shapes, shardings), data_iter)
    ...
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
when the next run opens the manager.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


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


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """`jax.eval_shape` output + shardings -> restore target (ShapeDtypeStructs)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class Checkpointer:
  """orbax CheckpointManager over `workdir/checkpoints`, keeping the last `keep`.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices (so the state may be donated right after) and the files are written in
  the background. `every_steps` <= 0 disables periodic saves (`due` is False).
  """

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int, keep: int,
               async_save: bool = True):
    path = os.fspath(workdir)
    if "://" not in path:   # orbax refuses relative paths: `--workdir=runs/x` is common
      path = os.path.abspath(os.path.expanduser(path))
    self.directory = epath.Path(path) / "checkpoints"
    self.every_steps = int(every_steps)
    if jax.process_index() == 0:
      _remove_unfinished(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) if keep and keep > 0 else None,
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

  def save(self, step: int, state: Any, data_iter: Any = None) -> bool:
    """Saves `state` (and `data_iter.get_state()`) as `step`; False if it exists.

    Only save a state known to be good: check the metrics of every step since the
    last save for NaN/Inf first (`logging.MetricLogger.flush` does).
    """
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = DataStateSave(data_iter.get_state())
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def restore(self, target: Any, data_iter: Any = None, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) straight into `target`'s shardings.

    `target` is a pytree of jax.ShapeDtypeStructs carrying shardings (see
    `abstract_state`); each process reads only its own shards. With `data_iter`,
    its position is restored too (`set_state`).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data"] = DataStateRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(out["data"])
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return out["state"]

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
  lists the differences. `allow_changes` overrides the check. Process 0 writes.
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
    if diff and not allow_changes:
      lines = "\n".join(f"  {k}: {old.get(k, '<absent>')!r} -> {cur.get(k, '<absent>')!r}"
                        for k in diff)
      raise ValueError(
          f"{workdir} holds checkpoints of a run with a different config ({path}):\n"
          f"{lines}\nuse a new --workdir, or pass --allow_config_change to resume anyway")
    if diff:
      logging.warning("resuming %s with config changes: %s", workdir, diff)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    tmp.replace(path)
