"""What a run checks before its workdir is touched, and how a failure is told.

    preflight.check(module, config, workdir)   # raises BadInput

First the config's own values (a known objective, dataset and parameter preset,
a positive batch that the devices divide), then the mode module's optional
`check(config, workdir)` (the dataset is prepared, the init checkpoint fits the
model, ...), then `checkpoint.check_config` (the workdir's config.json allows
this config to resume it). A missing file or a value that does not fit becomes
`BadInput`, which the programs print as one `error:` line and exit 2
(`glare_jax/cli.py`). Errors after the checks keep their traceback.
"""

from __future__ import annotations

import os
import sys
import types

from absl import logging
import ml_collections as mlc

from glare_jax import cli
from glare_jax.train import checkpoint

EXIT_CODE = cli.EXIT_BAD_INPUT
BadInput = cli.BadInput


def check_values(config: mlc.ConfigDict) -> None:
  """The fields every mode reads, checked before anything is built (ValueError)."""
  from glare_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from glare_jax.train import sharding  # pylint: disable=g-import-not-at-top
  batch = config.get("batch_size")
  if not isinstance(batch, int) or batch < 1:
    raise ValueError(f"config.batch_size={batch!r} must be a positive integer")
  datasets.check_name(config.dataset)   # unknown dataset: names the known ones
  if config.get("mode") == "pretrain":
    from glare_jax.objectives import OBJECTIVES  # pylint: disable=g-import-not-at-top
    from glare_jax.configs.common import PARAM_PRESETS  # pylint: disable=g-import-not-at-top
    if config.objective not in OBJECTIVES:
      raise ValueError(f"config.objective={config.objective!r} is not an objective; "
                       f"known: {', '.join(OBJECTIVES)}")
    if config.optim.param_preset not in PARAM_PRESETS:
      raise ValueError(f"config.optim.param_preset={config.optim.param_preset!r} is not a "
                       f"preset; known: {', '.join(sorted(PARAM_PRESETS))}")
    if config.num_epochs < 1:
      raise ValueError(f"config.num_epochs={config.num_epochs!r} must be >= 1")
  sharding.local_batch_size(batch, sharding.make_mesh(config.mesh))


def check(module: types.ModuleType, config: mlc.ConfigDict, workdir: str | os.PathLike, *,
          allow_config_change: bool = False) -> None:
  try:
    check_values(config)
    if hasattr(module, "check"):
      module.check(config, workdir)
    checkpoint.check_config(config, workdir, allow_changes=allow_config_change)
  except (FileNotFoundError, ValueError) as e:
    logging.debug("the pre-run check failed", exc_info=True)   # -v 1 shows where
    raise BadInput(f"{type(e).__name__}: {e}") from e


def report(error: BadInput) -> int:
  """Prints `error` as the program's last line; returns the exit code."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  return EXIT_CODE
