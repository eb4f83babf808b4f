r"""Entry point: `python -m glare_jax.main --config=configs/loveda.py --workdir=DIR`.

A config file takes an argument after a colon and any field can be overridden:

    python -m glare_jax.main --config=configs/loveda.py:tiny --workdir=/tmp/glare \
        --config.batch_size=16 --config.optim.base_lr=3e-4

Config files are given by any path (they import only `glare_jax` and
`ml_collections`). The program starts `jax.distributed` when the environment
asks for it (`train/distributed.py`), checks the config and the inputs before
anything is written (`train/preflight.py`: a bad one is one `error:` line and
exit 2), keeps the config in `DIR/config.json` (refusing to resume under an
incompatible one), runs `config.mode` and ends with a summary: final metrics,
the files written and the next command. A checkpoint fault during the run (no
intact checkpoint to resume, a failed save, a disk too small:
`checkpoint.CheckpointError`) is one `error:` line and exit 2 too.
"""

from __future__ import annotations

import importlib
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from glare_jax import cli

# config.mode -> module whose run(config, workdir) runs it (imported on demand).
MODES = {
    "pretrain": "glare_jax.train.pretrain",
    "finetune": "glare_jax.train.finetune",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/loveda.py:tiny",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if the config differs from the workdir's config.json in fields "
    "that change the experiment.")
flags.mark_flags_as_required(["config", "workdir"])


def mode_module(config):
  """The module of `config.mode` (imported here: each mode pulls in its own code)."""
  mode = config.get("mode")
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r} is not a known mode; known: {sorted(MODES)}")
  name = MODES[mode]
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name and name.startswith(e.name):
      raise ModuleNotFoundError(
          f"config.mode={mode!r} needs the module {name}, which this installation "
          f"does not have ({e})") from e
    raise
  return module


def run_mode(config, workdir: str):
  """Imports the module of `config.mode` and calls its run(config, workdir)."""
  return mode_module(config).run(config, workdir)


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps INFO chatter of orbax / tfds / jax internals out of the run's log."""
  QUIET = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/", "/grain/")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(q in record.pathname for q in self.QUIET)


def summary(config, workdir: str, result) -> list[str]:
  """The lines a finished run ends with: metrics, files written, next command."""
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(workdir)
  lines = []
  if isinstance(result, dict) and result:
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    keys = [k for k in shown if k in ("loss", "mIoU", "aAcc", "mAcc") or k.startswith("loss/")]
    lines.append("final: " + ", ".join(f"{k} {shown[k]:.4g}" for k in keys or list(shown)[:4]))
  for name in ("checkpoints", "metrics.jsonl", "eval.json", "tensorboard"):
    if (root / name).exists():
      lines.append(f"wrote: {root / name}")
  if config.mode == "pretrain":
    lines.append(f"next: python -m glare_jax.main --config=configs/{config.dataset}_seg.py "
                 f"--workdir={root}_seg --config.init_checkpoint={root}")
  else:
    lines.append(f"next: python -m glare_jax.visualize --checkpoint={root} --out=regions.png "
                 "<images>   (or glare_jax.evaluation.multiseed for mean +- std over seeds)")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Heavy imports after flag parsing: `--help` stays fast.
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from glare_jax.train import checkpoint, distributed, preflight
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  config, workdir = _CONFIG.value, _WORKDIR.value
  distributed.initialize(config.distributed)
  try:                                  # bad inputs fail before the workdir is touched
    module = mode_module(config)
    preflight.check(module, config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except ValueError as e:
    raise cli.BadInput(f"{type(e).__name__}: {e}") from e
  logging.info("config: %s/config.json", workdir)
  try:
    result = module.run(config, workdir)
  except checkpoint.CheckpointError as e:   # no intact checkpoint, a failed save, a full disk
    raise cli.BadInput(str(e)) from e
  if jax.process_index() == 0 and result is not None:
    print("\n".join(summary(config, workdir, result)), flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
