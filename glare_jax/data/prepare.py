r"""Writes a dataset's array_record files: `python -m glare_jax.data.prepare`.

    python -m glare_jax.data.prepare --dataset=demo --data_dir=~/tensorflow_datasets
    python -m glare_jax.data.prepare --dataset=loveda \
        --manual_dir=/data/LoveDA --data_dir=~/tensorflow_datasets
    python -m glare_jax.data.prepare --dataset=folder --name=tiles --images=~/tiles \
        [--masks=~/tiles_masks --classes=a,b,c] [--val_fraction=0.1]

A folder of your own images is described in `glare_jax/data/builders/folder.py`.
A manual dir holds the extracted official archives, laid out as the `LAYOUT`
of each builder in `glare_jax/data/builders/` says (running without
--manual_dir prints it). Every file is checked before
anything is written; a bad input stops with an error naming the path. Re-running
on a prepared dataset does nothing; re-running after a killed prepare first removes
the `incomplete.*` folder it left (and says so). No TensorFlow is needed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from glare_jax import cli
from glare_jax.data import builders
from glare_jax.data.builders import demo
from glare_jax.data.builders import folder

INCOMPLETE_PREFIX = "incomplete."   # tfds's prefix for a dataset folder being written
# Datasets the program generates (no download; sized by the demo_* flags).
GENERATED = ("demo", "demo_source")

_DATASET = flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS),
                             "Dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets",
                                "Where the prepared records are written.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "The extracted official archives (not for --dataset=demo).")
_DEMO_NUM_TRAIN = flags.DEFINE_integer("demo_num_train", demo.NUM_TRAIN,
                                       "demo: training images.")
_DEMO_NUM_VALIDATION = flags.DEFINE_integer(
    "demo_num_validation", demo.NUM_VALIDATION, "demo: validation images.")
_DEMO_IMAGE_SIZE = flags.DEFINE_integer("demo_image_size", demo.IMAGE_SIZE,
                                        "demo: image side in pixels.")
_DEMO_SEED = flags.DEFINE_integer("demo_seed", demo.SEED, "demo: generator seed.")

# The folder flags are defined only when this module runs as the program: other
# programs import it (for `prepare_generated`) and have their own --name or --seed.
_FOLDER: dict[str, flags.FlagHolder] = {}


def _define_folder_flags() -> None:
  d = flags   # short, to keep each definition on its lines
  _FOLDER.update(
      name=d.DEFINE_string("name", None, "folder: the dataset's name (config name=NAME)."),
      images=d.DEFINE_string("images", None, "folder: the images, searched recursively."),
      masks=d.DEFINE_string("masks", None, "folder: masks of label ids, paired with the "
                            "images by relative path and stem."),
      classes=d.DEFINE_string("classes", None, "folder: class names of ids 0.. (1.. with "
                              "--reduce_zero_label), comma-separated or a file of lines."),
      val_fraction=d.DEFINE_float("val_fraction", 0.0, "folder: this fraction of the "
                                  "images is the validation split (else a val/ folder)."),
      ignore_index=d.DEFINE_integer("ignore_index", folder.Options.ignore_index,
                                    "folder: the training id to ignore (as mmseg's)."),
      reduce_zero_label=d.DEFINE_bool("reduce_zero_label", False, "folder: id 0 is "
                                      "ignored and id k is class k - 1 (as mmseg's)."),
      min_size=d.DEFINE_integer("min_size", 0, "folder: upsample images whose shorter "
                                "side is under this (0: refuse those under the largest crop)."),
      seed=d.DEFINE_integer("seed", 0, "folder: seed of the --val_fraction draw."),
      threads=d.DEFINE_integer("threads", 0, "folder: threads decoding (0: one per CPU)."))


def prepare(dataset: str, data_dir: os.PathLike | str,
            manual_dir: os.PathLike | str | None = None, **demo_kwargs
            ) -> pathlib.Path:
  """Prepares `dataset` under `data_dir` unless it is there; returns its folder.

  `demo_kwargs` (num_train, num_validation, image_size, seed) size a generated dataset.
  """
  if dataset in GENERATED:
    if manual_dir:
      raise ValueError(f"--dataset={dataset} is generated; it takes no --manual_dir")
    builder = builders.get_builder(dataset, data_dir, **demo_kwargs)
  else:
    if demo_kwargs:
      raise ValueError(f"{sorted(demo_kwargs)} only apply to the generated {GENERATED}")
    builder = builders.get_builder(dataset, data_dir)
  path = pathlib.Path(builder.data_dir)
  if builder.is_prepared():
    logging.log_first_n(logging.INFO, "%s is already prepared in %s; nothing to do.", 1,
                        dataset, path)   # once: a run asks again after its check
    if dataset in GENERATED:
      _warn_if_resized(builder, demo_kwargs)
    return path
  if dataset not in GENERATED:
    if not manual_dir:
      raise ValueError(f"--dataset={dataset} needs --manual_dir, a folder "
                       f"holding:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    manual_dir = os.path.expanduser(os.fspath(manual_dir))
    builder.check(manual_dir)   # every problem reported before anything is written
  _remove_leftovers(path)
  if not sys.stderr.isatty():    # tqdm bars in a log file are noise
    tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  for split, info in builder.info.splits.items():
    logging.info("%s %s: %d records", dataset, split, info.num_examples)
  return path


def _remove_leftovers(path: pathlib.Path) -> list[pathlib.Path]:
  """Deletes the `incomplete.<random>_<version>` folders that a killed prepare of
  this dataset version left beside `path` (tfds writes there, then renames)."""
  pattern = f"{INCOMPLETE_PREFIX}*_{path.name}"
  gone = sorted(path.parent.glob(pattern)) if path.parent.is_dir() else []
  for old in gone:
    logging.warning("removing %s, left by an interrupted prepare", old)
    shutil.rmtree(old)
  return gone


def prepare_generated(dataset: str, data_dir: os.PathLike | str) -> None:
  """A generated dataset (the demo, its source domain) is written on first use, so the
  README's first command needs no setup: process 0 writes it while the others wait.
  Datasets made from archives are left to `python -m glare_jax.data.prepare`."""
  if dataset not in GENERATED:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    prepare(dataset, data_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"{dataset} dataset prepared")


def _warn_if_resized(builder, demo_kwargs) -> None:
  """A prepared demo is kept as is; say so when other sizes were asked for."""
  asked = {"train": demo_kwargs.get("num_train", demo.NUM_TRAIN),
           "validation": demo_kwargs.get("num_validation", demo.NUM_VALIDATION)}
  have = {s: builder.info.splits[s].num_examples for s in asked}
  if have != asked:
    logging.warning("the prepared demo in %s has %s images, not %s; delete that "
                    "folder to regenerate it", builder.data_dir, have, asked)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  demo_kwargs = {}
  if _DATASET.value in GENERATED:
    demo_kwargs = dict(num_train=_DEMO_NUM_TRAIN.value,
                       num_validation=_DEMO_NUM_VALIDATION.value,
                       image_size=_DEMO_IMAGE_SIZE.value, seed=_DEMO_SEED.value)
  try:
    if _DATASET.value == "folder":
      path = folder.prepare(_FOLDER["name"].value, _DATA_DIR.value, _folder_options())
    else:
      path = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value, **demo_kwargs)
  except (builders.LayoutError, FileNotFoundError, ValueError) as e:
    raise cli.BadInput(e) from e
  print(f"{_DATASET.value} is ready in {path}")


def _folder_options() -> folder.Options:
  f = {k: v.value for k, v in _FOLDER.items()}
  if not f["name"] or not f["images"]:
    raise ValueError("--dataset=folder needs --name=NAME and --images=DIR")
  expand = lambda d: pathlib.Path(d).expanduser() if d else None  # noqa: E731
  return folder.Options(
      images=expand(f["images"]), masks=expand(f["masks"]),
      classes=folder.parse_classes(f["classes"]), val_fraction=f["val_fraction"],
      ignore_index=f["ignore_index"], reduce_zero_label=f["reduce_zero_label"],
      min_size=f["min_size"], seed=f["seed"], num_threads=f["threads"])

if __name__ == "__main__":
  _define_folder_flags()
  flags.mark_flag_as_required("dataset")
  cli.run(main)
