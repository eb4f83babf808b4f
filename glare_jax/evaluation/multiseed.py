r"""Fine-tune with several seeds and report mean and std, as the paper's Table 1.

    python -m glare_jax.evaluation.multiseed --config=configs/loveda_seg.py \
        --workdir=runs/loveda_seg --config.init_checkpoint=runs/loveda_glare \
        [--config.num_seeds=3] [--name="UDI -> GLARE"]

Seed run k (k = 0 .. num_seeds - 1) is a complete fine-tuning run
(`glare_jax.train.finetune`) with `config.seed + k` in `DIR/seed_<k>/`: its own
config.json, checkpoints and eval.json. Run the command again after a crash:
finished seeds (eval.json of the last step) are skipped, an interrupted one
resumes from its checkpoint. Then `DIR/report.json` gets the mean and standard
deviation over the seeds of aAcc, mIoU, mAcc and the per-class IoU / Acc
(`evaluation/report.py`), and the table is printed, e.g.

    UDI -> GLARE: mIoU 51.50 (+-0.01)  aAcc 70.20 (+-0.03)  mAcc 64.30 (+-0.05)   [3 runs]
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import app, flags, logging
import ml_collections as mlc
from ml_collections import config_flags

from glare_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Fine-tuning config file, e.g. configs/loveda_seg.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Holds seed_<k>/ and report.json.")
_NAME = flags.DEFINE_string("name", "", "Row label of the printed table, e.g. 'UDI -> GLARE'.")
_DDOF = flags.DEFINE_integer("ddof", 0, "Standard deviation's delta degrees of freedom "
                             "(0: over the seeds, as NumPy; 1: the sample estimate).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume seed runs whose config.json differs.")
flags.mark_flags_as_required(["config", "workdir"])


def seed_config(config: mlc.ConfigDict, k: int) -> mlc.ConfigDict:
  """The config of seed run k: `config` with seed = config.seed + k."""
  c = config.copy_and_resolve_references()
  c.seed = config.seed + k
  return c


def seed_dir(workdir: str | pathlib.Path, k: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"seed_{k}"


def finished(config: mlc.ConfigDict, workdir: pathlib.Path) -> bool:
  """True when `workdir/eval.json` is the final evaluation of this seed's run."""
  path = workdir / "eval.json"
  if not path.is_file():
    return False
  done = json.loads(path.read_text())
  return done.get("step") == config.total_steps and done.get("seed") == config.seed


def run(config: mlc.ConfigDict, workdir: str | pathlib.Path, *, name: str = "",
        ddof: int = 0, allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) every seed, then aggregates; returns the report."""
  import jax  # pylint: disable=g-import-not-at-top

  from glare_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  from glare_jax.train import finetune, preflight  # pylint: disable=g-import-not-at-top

  if config.num_seeds < 1:
    raise ValueError(f"config.num_seeds must be >= 1, got {config.num_seeds}")
  workdir = pathlib.Path(workdir)
  for k in range(config.num_seeds):
    c, d = seed_config(config, k), seed_dir(workdir, k)
    if finished(c, d):
      logging.info("multiseed: seed %d (%s) is finished", c.seed, d)
      continue
    logging.info("multiseed: seed run %d of %d, seed %d, in %s", k + 1, config.num_seeds,
                 c.seed, d)
    # A bad init checkpoint fails (preflight.BadInput) before d is written.
    preflight.check(finetune, c, d, allow_config_change=allow_config_change)
    finetune.run(c, d)

  files = [seed_dir(workdir, k) / "eval.json" for k in range(config.num_seeds)]
  report = report_lib.aggregate(report_lib.load_runs(files), ddof=ddof)
  report.update(name=name, seeds=[config.seed + k for k in range(config.num_seeds)],
                files=[str(f) for f in files])
  if jax.process_index() == 0:
    print(report_lib.format_report(report, name), flush=True)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from glare_jax.train import distributed  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if config.get("mode") != "finetune":
    raise cli.BadInput(f"config.mode is {config.get('mode')!r}: multiseed runs "
                       "fine-tuning configs (mode 'finetune', e.g. configs/loveda_seg.py)")
  distributed.initialize(config.distributed)
  run(config, _WORKDIR.value, name=_NAME.value, ddof=_DDOF.value,
      allow_config_change=_ALLOW_CONFIG_CHANGE.value)   # bad inputs: cli.BadInput, exit 2
  return 0


if __name__ == "__main__":
  cli.run(main)
