r"""Score a backbone with the dense linear probe: `python -m glare_jax.probe`.

    python -m glare_jax.probe --config=configs/demo.py --checkpoint=/tmp/glare_demo
    python -m glare_jax.probe --config=configs/loveda.py --checkpoint=checkpoints/udi_vits16 \
        [--which=student] [--out=FILE] [--config.probe.image_size=256]

CHECKPOINT is a converted checkpoint (python -m glare_jax.convert) or a
pre-training workdir (its latest checkpoint's teacher, or student with
--which=student). The probe of `glare_jax/evaluation/probe.py` runs with the
config's `probe` block on its dataset and model (adapters included; a
checkpoint without adapters is probed without them). Writes probe.json
(CHECKPOINT/probe.json unless --out) and prints one line:

    probe mIoU 68.91  aAcc 82.48  mAcc 81.62  (demo validation, teacher of /tmp/glare_demo) -> ...

A bad checkpoint or an unprepared dataset prints one `error:` line and exits 2.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from glare_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pre-training config whose dataset, model and `probe` block are used, "
    "e.g. configs/demo.py", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A converted checkpoint or a pre-training workdir.")
_WHICH = flags.DEFINE_enum("which", None, ["teacher", "student"],
                           "Network of a pre-training workdir (default: config.probe.which).")
_OUT = flags.DEFINE_string("out", None, "Where probe.json goes (default: CHECKPOINT/probe.json).")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from glare_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from glare_jax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from glare_jax.evaluation.probe import score_checkpoint  # pylint: disable=g-import-not-at-top
  from glare_jax.models.load import CheckpointMismatch  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  which = _WHICH.value or config.probe.which
  checkpoint = pathlib.Path(_CHECKPOINT.value).expanduser()
  try:
    metrics, about = score_checkpoint(config, str(checkpoint), which)
  except (FileNotFoundError, CheckpointMismatch, ValueError) as e:
    raise cli.BadInput(e) from e
  out = pathlib.Path(_OUT.value).expanduser() if _OUT.value else checkpoint / "probe.json"
  class_names = datasets.get_info(config.dataset, config.data_dir).class_names
  metrics_lib.write_eval_json(out, metrics, class_names, **about)
  logging.info("probe: %s", about)
  print(f"probe mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  "
        f"mAcc {metrics['mAcc']:.2f}  ({config.dataset} {about['split']}, {which} of "
        f"{checkpoint}) -> {out}", flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
