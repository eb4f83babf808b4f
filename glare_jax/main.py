r"""Entry point: `python -m glare_jax.main --config=configs/loveda.py --workdir=DIR`.

A config file takes an argument after a colon and any field can be overridden:

    python -m glare_jax.main --config=configs/loveda.py:tiny --workdir=/tmp/glare \
        --config.batch_size=16 --config.optim.base_lr=3e-4

Run it from the repository root (config files import `configs.common`). The
program starts `jax.distributed` when the environment asks for it (see
`glare_jax/train/distributed.py`), lets the mode check its inputs (a mode
module's optional `check(config, workdir)`, e.g. that fine-tuning's init
checkpoint fits the model) before anything is written, keeps the config in
`DIR/config.json` (refusing to resume under an incompatible one) and runs
`config.mode`. A failed check prints one `error:` line and exits 2
(`train/preflight.py`), and so does a checkpoint fault during the run (no intact
checkpoint to resume, a failed save, a disk too small: `checkpoint.CheckpointError`).
"""

from __future__ import annotations

import importlib
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Heavy imports after flag parsing: `--help` stays fast.
  # pylint: disable-next=g-import-not-at-top
  from glare_jax.train import checkpoint, distributed, preflight
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  config, workdir = _CONFIG.value, _WORKDIR.value
  distributed.initialize(config.distributed)
  module = mode_module(config)
  try:                                  # bad inputs fail before the workdir is touched
    preflight.check(module, config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except preflight.BadInput as e:
    return preflight.report(e)
  logging.info("config: %s/config.json", workdir)
  try:
    module.run(config, workdir)
  except checkpoint.CheckpointError as e:   # no intact checkpoint, a failed save, a full disk
    return preflight.report(e)
  return 0


if __name__ == "__main__":
  app.run(main)
