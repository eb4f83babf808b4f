"""The backbone a fine-tuning run starts from (`config.init_checkpoint`).

The path is one of

    a converted checkpoint   DIR/model.json + DIR/params (python -m glare_jax.convert;
                             models/load.py): its 'backbone'
    a pre-training workdir   DIR/config.json + DIR/checkpoints/<step>/state, written by
                             train/checkpoint.Checkpointer with the state
                             {'params': {'backbone', 'head', 'cross_attention'},
                              'teacher': same, 'opt_state', 'centres', 'step', 'rng'}:
                             the latest step's `teacher` (or `student` = 'params')
                             backbone, described by the model fields of config.json

    backbone = init_backbone(config, fresh_backbone)   # NumPy tree shaped like the model's

Only the backbone subtree is read from a pre-training checkpoint (no optimizer
state, no head). The weights are fitted to the fine-tuning model with
`models/load.merge_converted` (prefix tokens checked, position grid resampled
with `config.model.pos_resize`), and every backbone parameter of the model must
come from the checkpoint: a model with adapters does not start from a
checkpoint without them (use `model.adapter_mode='none'`). Whatever does not
fit raises `CheckpointMismatch` naming the path and every key at fault.
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from glare_jax import integrity
from glare_jax.models import load
from glare_jax.models.vit import ModelSpec, size_kwargs

CheckpointMismatch = load.CheckpointMismatch
WHICH = {"teacher": "teacher", "student": "params"}   # init_which -> state key
# Model fields that change what a pre-trained backbone computes: the fine-tuning
# model must have the pre-training run's values (shapes alone miss adapter_scale).
ARCHITECTURE = ("variant", "patch_size", "num_prefix", "adapter_mode", "adapter_dim",
                "adapter_scale")


def _is_converted(path: pathlib.Path) -> bool:
  return (path / load.SPEC_FILE).is_file()


def _is_pretrain_workdir(path: pathlib.Path) -> bool:
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def latest_step(workdir: pathlib.Path) -> int:
  """The newest intact checkpoint step of a run: its manifest verifies
  (`glare_jax.integrity`); newer unfinished or damaged steps are skipped with a
  warning, and integrity.Damaged lists them when none is intact."""
  root = pathlib.Path(workdir) / "checkpoints"
  step, damaged = integrity.newest_intact(root)
  if step is None and not damaged:
    raise FileNotFoundError(f"{root} holds no finished checkpoint (no <step>/state)")
  if step is None:
    raise integrity.Damaged(root, f"no intact checkpoint ({integrity.describe(damaged)})")
  for bad, problem in damaged:
    logging.warning("%s: skipped step %d: %s; reading step %d", root, bad, problem, step)
  return step


def pretrain_spec(model: dict[str, Any], which: str) -> ModelSpec:
  """The ModelSpec of a pre-training run's backbone from its config.json `model`."""
  return ModelSpec(variant=model["variant"], patch_size=model["patch_size"],
                   num_prefix=model["num_prefix"], pos_grid=model["pos_grid"],
                   mask_token=bool(model.get("use_mask_token", False)),
                   source_format="glare_jax", which=which, **size_kwargs(model["variant"]))


def check_architecture(model_cfg: Any, pretrained: dict[str, Any], path: Any) -> None:
  """Raises CheckpointMismatch when `model_cfg` (the fine-tuning config.model)
  differs from the pre-training run's model in a field of ARCHITECTURE."""
  fields = ARCHITECTURE
  if model_cfg.adapter_mode == "none" and pretrained.get("adapter_mode") == "none":
    fields = tuple(f for f in fields if not f.startswith("adapter_"))
  diff = [f for f in fields if pretrained.get(f) != model_cfg.get(f)]
  if diff:
    lines = "\n  ".join(f"model.{f}: pre-training {pretrained.get(f)!r}, fine-tuning "
                        f"{model_cfg.get(f)!r} (--config.model.{f}={pretrained.get(f)})"
                        for f in diff)
    raise CheckpointMismatch(f"init_checkpoint {path}: the pre-trained model differs from "
                             f"the fine-tuning model:\n  {lines}")


class _QuietMetadata(std_logging.Filter):
  """orbax warns that a state item has no step metadata file; it never has one."""

  def filter(self, record) -> bool:
    return "Metadata file does not exist" not in record.getMessage()


def read_subtree(state_dir: str | pathlib.Path, *keys: str) -> Any:
  """state[keys[0]][keys[1]]... of an orbax state directory as NumPy arrays; only
  that subtree is read (e.g. read_subtree(d, 'teacher', 'backbone'))."""
  quiet = _QuietMetadata()
  std_logging.getLogger("absl").addFilter(quiet)
  try:
    return _read_subtree(pathlib.Path(state_dir).absolute(), keys)
  finally:
    std_logging.getLogger("absl").removeFilter(quiet)


def _read_subtree(state_dir: pathlib.Path, keys: tuple[str, ...]) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata
    node = tree
    for i, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        have = sorted(node) if hasattr(node, "keys") else type(node).__name__
        raise CheckpointMismatch(f"{state_dir} has no {'/'.join(keys[:i + 1])}; "
                                 f"{'/'.join(keys[:i]) or 'the state'} holds {have}")
      node = node[key]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(node))
    for key in reversed(keys):
      target = {key: target}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  for key in keys:
    out = out[key]
  return out


def read_backbone(path: str | pathlib.Path, which: str = "teacher",
                  model_cfg: Any = None) -> tuple[dict[str, Any], ModelSpec]:
  """(backbone params as NumPy arrays, their ModelSpec) of `path` (see module doc).

  `which` picks the teacher or the student of a pre-training workdir;
  `model_cfg` (the fine-tuning config.model), when given, is checked against
  the pre-training run's model fields (`check_architecture`).
  """
  if which not in WHICH:
    raise ValueError(f"init_which must be one of {sorted(WHICH)}, got {which!r}")
  path = pathlib.Path(path).expanduser().absolute()
  if _is_converted(path):
    params, spec = load.load_converted(path)
    if "backbone" not in params:
      raise CheckpointMismatch(f"converted checkpoint {path} has no backbone: {sorted(params)}")
    if spec.which and spec.which != which:
      raise CheckpointMismatch(
          f"converted checkpoint {path} holds the {spec.which}'s weights, init_which asks for "
          f"the {which}: convert with --which={which} or set --config.init_which={spec.which}")
    return params["backbone"], spec
  if _is_pretrain_workdir(path):
    stored = json.loads((path / "config.json").read_text())
    if stored.get("mode") != "pretrain" or "model" not in stored:
      raise CheckpointMismatch(f"{path} is a workdir of mode {stored.get('mode')!r}, not a "
                               "pre-training run")
    if model_cfg is not None:
      check_architecture(model_cfg, stored["model"], path)
    step = latest_step(path)
    logging.info("init_checkpoint: the %s backbone of %s, step %d", which, path, step)
    backbone = read_subtree(path / "checkpoints" / str(step) / "state", WHICH[which],
                            "backbone")
    return backbone, pretrain_spec(stored["model"], which)
  raise FileNotFoundError(
      f"init_checkpoint {path} is neither a converted checkpoint (needs {load.SPEC_FILE}) nor "
      "a pre-training workdir (needs config.json and checkpoints/)")


def fit_backbone(fresh: Any, backbone: dict[str, Any], spec: ModelSpec, *,
                 pos_resize: str, path: Any = "") -> dict[str, Any]:
  """The checkpoint's backbone in the shapes of `fresh` (the model's backbone
  params or their ShapeDtypeStructs), as NumPy float32 arrays.

  Raises CheckpointMismatch naming `path` and the keys whose shapes differ, that
  the model lacks, or that the checkpoint lacks.
  """
  try:
    merged, notes = load.merge_converted({"backbone": fresh}, {"backbone": backbone}, spec,
                                         parts=("backbone",), pos_resize=pos_resize)
  except CheckpointMismatch as e:
    raise CheckpointMismatch(f"init_checkpoint {path}: {e}") from None
  fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
  missing = sorted(k for k, v in traverse_util.flatten_dict(merged["backbone"], sep="/").items()
                   if v is fresh_flat[k])          # left as it was: not in the checkpoint
  if missing:
    hint = ("\n(the checkpoint has no adapters: fine-tune it with model.adapter_mode='none', "
            "e.g. configs/loveda_seg.py:adapter_mode=none)"
            if any("/adapter/" in k for k in missing) else "")
    raise CheckpointMismatch(
        f"init_checkpoint {path}: {len(missing)} backbone parameter(s) of the model are not "
        f"in the checkpoint:\n  " + "\n  ".join(f"backbone/{k}" for k in missing) + hint)
  for note in notes:
    logging.info("init_checkpoint: %s", note)
  return jax.tree.map(np.asarray, merged["backbone"])


def init_backbone(config: Any, fresh: Any) -> dict[str, Any] | None:
  """The fitted backbone of `config.init_checkpoint` (None when it is empty)."""
  if not config.init_checkpoint:
    return None
  backbone, spec = read_backbone(config.init_checkpoint, config.init_which, config.model)
  return fit_backbone(fresh, backbone, spec, pos_resize=config.model.pos_resize,
                      path=config.init_checkpoint)


__all__ = ["CheckpointMismatch", "check_architecture", "fit_backbone", "init_backbone",
           "latest_step", "pretrain_spec", "read_backbone", "read_subtree"]
