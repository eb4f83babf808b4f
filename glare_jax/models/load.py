"""Converted checkpoints: the on-disk format and all checkpoint surgery.

A converted checkpoint (written by `python -m glare_jax.convert`) is a directory

    DIR/params         orbax tree {'backbone', ['head'], ['cross_attention']}, float32
    DIR/model.json     `ModelSpec`: sizes, prefix tokens, position grid, head K, source
    DIR/manifest.json  size and hash of every file (`glare_jax.integrity`), verified
                       by `load_converted`

`merge_converted` puts such weights into a freshly initialised params dict (as
`glare_jax.models.init_params` builds it) for pre-training, fine-tuning or
embedding: it keeps the fresh adapters (zero up-projection, so the network is
unchanged), resamples the position grid when the model's differs, can drop the
prefix tokens (UDI -> FLSL), and checks every shape before anything is used.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glare_jax import integrity
from glare_jax.models.vit import ModelSpec, ViT, resize_pos_grid

PARAMS_DIR = "params"
SPEC_FILE = "model.json"
PARTS = ("backbone", "head", "cross_attention")
CONTENTS = (PARAMS_DIR, SPEC_FILE, integrity.MANIFEST)   # all a conversion folder holds


class CheckpointMismatch(ValueError):
  """Converted weights that do not fit the model; the message lists every key."""


TMP_MARK = ".convert-tmp-"   # .<name>.convert-tmp-<pid>: a conversion being written
_RENAME_EXCHANGE = 2         # renameat2(2) flag: swap two paths in one step (Linux)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps the folders `a` and `b` atomically; False where the system cannot."""
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  if not hasattr(libc, "renameat2"):
    return False
  at_cwd = -100
  if libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):   # kernel or filesystem lacks it
    return False
  raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _leftovers(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(out.parent.glob(f".{out.name}{TMP_MARK}*")) if out.parent.is_dir() else []


def save_converted(out_dir: str | pathlib.Path, params: dict[str, Any], spec: ModelSpec,
                   overwrite: bool = False) -> list[str]:
  """Writes DIR/params (orbax), DIR/model.json and DIR/manifest.json; returns notes.

  Everything is written into `.DIR.convert-tmp-<pid>` beside DIR and swapped in
  only when complete, with one atomic exchange (Linux), so a kill at any moment
  leaves either the old conversion or the new one; elsewhere two renames leave
  DIR absent for a moment (load_converted then names the folder holding it).
  The folder a killed run left is removed by the next conversion to DIR (said
  in the notes).
  """
  import orbax.checkpoint as ocp

  out = pathlib.Path(out_dir).absolute()
  notes = []
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} is a file, not a folder for a conversion")
  if (out / PARAMS_DIR).exists() or (out / SPEC_FILE).exists():
    if not overwrite:
      raise FileExistsError(f"{out} already holds a converted checkpoint (use --overwrite)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in CONTENTS)
  else:
    foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
  if foreign:
    raise FileExistsError(f"{out} holds other files than a conversion ({foreign[:5]}); "
                          "convert into a new or empty folder")
  for old in _leftovers(out):
    shutil.rmtree(old)
    notes.append(f"removed {old}, left by an interrupted conversion")
  tmp = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp.mkdir()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / PARAMS_DIR, params)
  (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
  integrity.write_manifest(tmp)
  if not out.exists():
    tmp.rename(out)
  elif _exchange(tmp, out):
    shutil.rmtree(tmp)                       # now the old conversion
  else:                                      # two renames: DIR is absent for a moment
    old = out.with_name(f".{out.name}{TMP_MARK}old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)
  return notes


def load_converted(ckpt_dir: str | pathlib.Path) -> tuple[dict[str, Any], ModelSpec]:
  """(params as NumPy float32 trees, spec) of a converted checkpoint.

  Its manifest is verified first: integrity.Damaged (a ValueError) names the
  file that differs from what `save_converted` wrote.
  """
  import orbax.checkpoint as ocp

  d = pathlib.Path(ckpt_dir).absolute()
  if not (d / SPEC_FILE).is_file() or not (d / PARAMS_DIR).is_dir():
    whole = [p for p in _leftovers(d) if integrity.problem(p) is None]
    hint = (f"; {whole[-1]} holds a complete conversion left by an interrupted overwrite: "
            f"rename it to {d.name}, or convert again" if whole else "")
    raise FileNotFoundError(f"{d} is not a converted checkpoint (needs {SPEC_FILE} and "
                            f"{PARAMS_DIR}/); make one with python -m glare_jax.convert"
                            + hint)
  if (problem := integrity.problem(d)) is not None:
    raise integrity.Damaged(d, f"{problem}; convert the PyTorch file again "
                               "(python -m glare_jax.convert ... --overwrite)")
  try:
    spec = ModelSpec.from_json(json.loads((d / SPEC_FILE).read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{d / SPEC_FILE}: unreadable model description: {e}") from e
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(d / PARAMS_DIR)
  return params, spec


def vit_from_spec(spec: ModelSpec, **overrides: Any) -> ViT:
  """The converted backbone as a ViT (no adapters, deterministic) unless overridden."""
  kw = dict(spec.vit_kwargs(), use_mask_token=spec.mask_token, adapter_mode="none",
            drop_path=0.0)
  kw.update(overrides)
  return ViT(**kw)


def _adapt_pos_embed(pos: np.ndarray, spec: ModelSpec, fresh: dict[str, Any],
                     drop_prefix: bool, pos_resize: str, problems: list[str],
                     notes: list[str]) -> np.ndarray | None:
  """[1, Pc + gc*gc, D] -> the model's [1, Pt + gt*gt, D] (drop prefix rows, resample)."""
  target = fresh["backbone/pos_embed"].shape
  p_t = fresh["backbone/cls_token"].shape[1] if "backbone/cls_token" in fresh else 0
  p_c, g_c, d = spec.num_prefix, spec.pos_grid, pos.shape[-1]
  if drop_prefix:
    if p_t:
      problems.append(f"drop_prefix needs a model without prefix tokens; it has {p_t}")
      return None
    if p_c:
      notes.append(f"dropped {p_c} prefix row(s) of pos_embed and the cls_token")
    prefix = pos[:, :0]
  elif p_t < p_c:
    problems.append(f"backbone/pos_embed: the checkpoint has {p_c} prefix token(s), the model "
                    f"{p_t} (set model.num_prefix = {p_c}, or drop them with drop_prefix)")
    return None
  else:
    # A model with more prefix tokens than the checkpoint (e.g. GLARE's [CLS] on an
    # FLSL backbone, Table 3) keeps fresh position rows for the extra tokens.
    prefix = pos[:, :p_c]
    if p_t > p_c:
      prefix = np.concatenate([prefix, np.asarray(fresh["backbone/pos_embed"])[:, p_c:p_t]], 1)
      notes.append(f"the checkpoint has {p_c} prefix token(s), the model {p_t}: the "
                   f"extra {p_t - p_c} start fresh (position rows and cls_token rows)")
  g_t = math.isqrt(target[1] - p_t)
  if g_t * g_t + p_t != target[1] or d != target[2]:
    problems.append(f"backbone/pos_embed: checkpoint {pos.shape} does not fit model {target}")
    return None
  grid = pos[0, p_c:].reshape(g_c, g_c, d)
  if g_t != g_c:
    grid = np.asarray(resize_pos_grid(jnp.asarray(grid), (g_t, g_t), pos_resize))
    notes.append(f"resampled the position grid {g_c}x{g_c} -> {g_t}x{g_t} ({pos_resize!r})")
  return np.concatenate([prefix, grid.reshape(1, g_t * g_t, d)], axis=1)


def merge_converted(fresh: dict[str, Any], converted: dict[str, Any], spec: ModelSpec, *,
                    parts: Sequence[str] = PARTS, drop_prefix: bool = False,
                    pos_resize: str = "dino") -> tuple[dict[str, Any], list[str]]:
  """Fills `fresh` with converted weights; returns (params, notes).

  Args:
    fresh: {'backbone', ...} as `init_params` builds it (or a sub-dict of it).
    converted, spec: from `load_converted`.
    parts: parts to take from the checkpoint when it has them; a part the
      checkpoint lacks stays fresh, a part the model lacks (a segmentation
      model has no head) is skipped; both said in the notes.
    drop_prefix: drop the prefix rows of pos_embed and the cls_token (for a model
      with num_prefix = 0, the UDI -> FLSL baseline).
    pos_resize: how to resample the stored position grid when the model's grid
      differs ('dino' or 'size', as `resize_pos_grid`).
  Raises:
    CheckpointMismatch listing every key whose shape does not fit, before
    anything is returned.
  """
  flat = traverse_util.flatten_dict(fresh, sep="/")
  merged, problems, notes, loaded = dict(flat), [], [], set()
  for part in parts:
    if part not in converted:
      notes.append(f"{part}: not in the checkpoint, kept fresh")
      continue
    if not any(k.startswith(part + "/") for k in flat):
      if part == "backbone":
        problems.append("backbone: the model has no 'backbone' parameters")
      else:  # e.g. a segmentation model: backbone + FPN, no projection head
        notes.append(f"{part}: in the checkpoint, the model has none; not loaded")
      continue
    for path, value in traverse_util.flatten_dict(converted[part], sep="/").items():
      key, value = f"{part}/{path}", np.asarray(value)
      if key == "backbone/cls_token" and drop_prefix:
        continue
      if (key == "backbone/cls_token" and key in flat
          and value.shape[1] < flat[key].shape[1] and value.shape[2] == flat[key].shape[2]):
        value = np.concatenate([value, np.asarray(flat[key])[:, value.shape[1]:]], axis=1)
      if key == "backbone/mask_token" and key not in flat:
        notes.append("backbone/mask_token: the model has none (use_mask_token=False); not loaded")
        continue
      if key == "backbone/pos_embed" and key in flat:
        value = _adapt_pos_embed(value, spec, flat, drop_prefix, pos_resize, problems, notes)
        if value is None:
          continue
      if key not in flat and part == "cross_attention":   # form='paper' keeps qkv only
        notes.append(f"{key}: the model's cross-attention has none; not loaded")
        continue
      if key not in flat:
        problems.append(f"{key}: in the checkpoint {value.shape}, not in the model")
      elif tuple(flat[key].shape) != value.shape:
        problems.append(f"{key}: checkpoint {value.shape}, model {tuple(flat[key].shape)}")
      else:
        merged[key] = jnp.asarray(value, dtype=flat[key].dtype)
        loaded.add(key)
  if problems:
    hint = ""
    if any(p.startswith("head/") for p in problems) and spec.head_dim_out:
      hint = (f"\n(the checkpoint's head has K = {spec.head_dim_out}: set head.out_dim to "
              "match, or leave 'head' out of the parts to start a fresh head)")
    raise CheckpointMismatch(
        f"converted {spec.source_format or 'checkpoint'} weights do not fit the model "
        f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems) + hint)
  for part in parts:
    fresh_keys = [k for k in flat if k.startswith(part + "/") and k not in loaded]
    if part in converted and fresh_keys:
      adapters = sum("/adapter/" in k for k in fresh_keys)
      others = sorted(k for k in fresh_keys if "/adapter/" not in k)
      n_loaded = sum(k.startswith(part + "/") for k in loaded)
      notes.append(f"{part}: loaded {n_loaded} arrays; "
                   f"kept fresh: {adapters} adapter arrays"
                   + (f", {others}" if others else ""))
  notes += [f"{p}: in the checkpoint, not loaded (not in parts)"
            for p in converted if p not in parts]
  return traverse_util.unflatten_dict(merged, sep="/"), notes


def load_into(fresh: dict[str, Any], ckpt_dir: str | pathlib.Path,
              **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
  """`load_converted` + `merge_converted` (keyword arguments go to the latter)."""
  converted, spec = load_converted(ckpt_dir)
  return merge_converted(fresh, converted, spec, **kwargs)
