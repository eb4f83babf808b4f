"""Content hashes of a finished checkpoint folder.

    integrity.write_manifest(folder)   # once every file of the save is written
    integrity.verify(folder)           # raises Damaged naming the file at fault

`folder/manifest.json` lists every other file under `folder` (relative path,
size, BLAKE2b-128 of the bytes). It is written last, to a temporary name and
then renamed, so a folder without it is a save that did not finish. Training
checkpoints (`train/checkpoint.py`) and converted checkpoints
(`models/load.py`) both carry one; whoever reads them verifies it first
(docs/DESIGN.md, "The training loop": Checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

MANIFEST = "manifest.json"
ALGORITHM = "blake2b-128"
_CHUNK = 1 << 20   # bytes read at a time


class Damaged(ValueError):
  """A checkpoint folder that is not as its save left it (or never finished)."""

  def __init__(self, folder: os.PathLike | str, problem: str):
    super().__init__(f"{folder}: {problem}")
    self.folder, self.problem = pathlib.Path(folder), problem


def _digest(path: pathlib.Path) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _files(folder: pathlib.Path) -> list[str]:
  """Relative POSIX paths of the regular files under `folder`, the manifest aside."""
  out = []
  for root, _, names in os.walk(folder):
    for name in names:
      rel = pathlib.Path(root, name).relative_to(folder).as_posix()
      if not rel.startswith(MANIFEST):
        out.append(rel)
  return sorted(out)


def _sync_dir(folder: pathlib.Path) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:   # e.g. a filesystem that cannot open directories
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_manifest(folder: os.PathLike | str) -> pathlib.Path:
  """Hashes every file under `folder` and writes `folder/manifest.json` (atomically)."""
  folder = pathlib.Path(folder)
  files = {rel: {"size": (folder / rel).stat().st_size, "blake2b": _digest(folder / rel)}
           for rel in _files(folder)}
  path, tmp = folder / MANIFEST, folder / (MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"algorithm": ALGORITHM, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _sync_dir(folder)
  return path


def problem(folder: os.PathLike | str) -> str | None:
  """What is wrong with `folder` against its manifest, or None when it is intact.

  Every listed file is read and hashed; the first fault found is described
  (files not listed are not checked).
  """
  folder = pathlib.Path(folder)
  path = folder / MANIFEST
  if not folder.is_dir():
    return "no such folder"
  if not path.is_file():
    return (f"no {MANIFEST}: the save did not finish (or was written before checkpoints "
            "carried one)")
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    if manifest["algorithm"] != ALGORITHM or not isinstance(files, dict):
      raise ValueError(f"algorithm {manifest['algorithm']!r}")
    expected = {rel: (int(e["size"]), str(e["blake2b"])) for rel, e in files.items()}
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
  for rel, (size, digest) in sorted(expected.items()):
    file = folder / rel
    if not file.is_file():
      return f"{rel} is missing"
    if (got := file.stat().st_size) != size:
      return f"{rel} has {got} bytes, {size} were written (truncated or overwritten)"
    try:
      if _digest(file) != digest:
        return f"{rel}: its content differs from what was written (flipped bits?)"
    except OSError as e:
      return f"{rel} cannot be read ({e.strerror or e})"
  return None


def newest_intact(root: os.PathLike | str) -> tuple[int | None, list[tuple[int, str]]]:
  """(the newest `root/<step>` folder that verifies, or None; (step, problem) of
  each newer one that does not). Reads every file of the steps it checks."""
  root = pathlib.Path(root)
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()),
                 reverse=True) if root.is_dir() else []
  damaged = []
  for step in steps:
    if (p := problem(root / str(step))) is None:
      return step, damaged
    damaged.append((step, p))
  return None, damaged


def describe(damaged: list[tuple[int, str]]) -> str:
  """newest_intact's damaged steps as "step N: problem; step M: ..."."""
  return "; ".join(f"step {step}: {p}" for step, p in damaged)


def verify(folder: os.PathLike | str) -> None:
  """Raises Damaged when `folder` is not as its manifest says."""
  if (p := problem(folder)) is not None:
    raise Damaged(folder, p)
