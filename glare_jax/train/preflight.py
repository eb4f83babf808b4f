"""What a run checks before its workdir is touched, and how a failure is told.

    preflight.check(module, config, workdir)   # raises BadInput

The mode module's optional `check(config, workdir)` (the dataset is prepared,
the init checkpoint fits the model, ...) and then `checkpoint.check_config`
(the workdir's config.json allows this config to resume it) run first; a
missing file or a value that does not fit (FileNotFoundError, ValueError, of
which CheckpointMismatch and LayoutError are kinds) becomes `BadInput`, which
the programs print as one `error:` line and exit 2, as the other command-line
tools do. Errors after the checks keep their traceback.
"""

from __future__ import annotations

import os
import sys
import types

from absl import logging
import ml_collections as mlc

from glare_jax.train import checkpoint

EXIT_CODE = 2


class BadInput(Exception):
  """A run's input failed its check; the message names the file and the fault."""


def check(module: types.ModuleType, config: mlc.ConfigDict, workdir: str | os.PathLike, *,
          allow_config_change: bool = False) -> None:
  try:
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
