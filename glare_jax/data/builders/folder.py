r"""Your own images as a dataset: `folder/NAME`, from any folder of images.

    python -m glare_jax.data.prepare --dataset=folder --name=tiles --images=~/tiles \
        [--masks=~/tiles_masks --classes=background,building,road] [--val_fraction=0.1]

Images are found recursively (png, jpg/jpeg, tif/tiff, webp, bmp; hidden files
skipped) and stored as 8-bit RGB: greyscale and palette images are converted,
EXIF orientation applied. Masks, when given, pair with images by relative path
and stem (`images/a/b.jpg` with `masks/a/b.png`) and hold the dataset's own label
ids, as mmsegmentation's: `--reduce_zero_label` makes id 0 ignored and k class
k - 1, `--ignore_index` is the training id to ignore (stored as 255 in the records).
The validation split is a top-level `val/` folder, or `--val_fraction` of the
images drawn with `--seed`; otherwise there is none.

Every file is decoded and checked before anything is written, and every bad file
listed; then the records are written as array_record under
`DATA_DIR/folder/NAME/`, with the class names, label rules and typical image size
in the dataset's metadata (`dataset_info`). Both passes stream over the files on
a few threads and log their rate and ETA.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from glare_jax.data import datasets
from glare_jax.data.builders import base
from glare_jax.data.builders import common
from glare_jax.data.builders import folder_files
from glare_jax.data.builders.folder_files import Item

PREFIX = "folder/"                  # config.dataset of a folder dataset: 'folder/NAME'
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def largest_crop() -> int:
  """The side of the largest pre-training crop (glare_jax/configs/common.py): smaller images
  are refused at prepare time unless --min_size upsamples them."""
  from glare_jax.configs import common as config_common  # pylint: disable=g-import-not-at-top
  return config_common.crops_config().global_size


@dataclasses.dataclass(frozen=True)
class Options:
  """What `python -m glare_jax.data.prepare --dataset=folder` was asked for."""
  images: pathlib.Path
  masks: pathlib.Path | None = None
  classes: tuple[str, ...] = ()       # names of ids 0.. (1.. with reduce_zero_label)
  val_fraction: float = 0.0
  ignore_index: int = datasets.IGNORE_INDEX
  reduce_zero_label: bool = False
  min_size: int = 0                   # 0: refuse images under the largest crop
  seed: int = 0
  num_threads: int = 0                # 0: one per CPU

  @property
  def source_ignore(self) -> int:
    """The mask value that is ignored: mmseg's ignore_index is a training id,
    counted after reduce_zero_label (k -> k - 1)."""
    if self.reduce_zero_label and self.ignore_index != datasets.IGNORE_INDEX:
      return self.ignore_index + 1
    return self.ignore_index

  def threads(self) -> int:
    return self.num_threads or min(16, os.cpu_count() or 1)


def parse_classes(text: str | None) -> tuple[str, ...]:
  """'a,b,c' or the path of a text file with one name per line -> names."""
  if not text:
    return ()
  path = pathlib.Path(text).expanduser()
  names = path.read_text().splitlines() if path.is_file() else text.split(",")
  return tuple(n.strip() for n in names if n.strip())


@dataclasses.dataclass(frozen=True)
class _Checked:
  hw: tuple[int, int]                 # as stored
  ids: np.ndarray | None              # [256] bool: mask values present
  problem: str = ""


class Folder(base.RecordBuilder, skip_registration=True):
  """Images (and optional masks) from a folder of your own."""

  name = "folder"

  def __init__(self, *, config: str, options: Options | None = None, **kwargs):
    if not _NAME.fullmatch(config or ""):
      raise ValueError(f"--name={config!r}: use letters, digits, '_', '.', '-'")
    self._options = options
    self._metadata = tfds.core.MetadataDict()
    self._splits: dict[str, list[Item]] | None = None
    super().__init__(config=tfds.core.BuilderConfig(name=config), **kwargs)

  def _create_builder_config(self, builder_config, version):
    del version  # every name is a folder of one's own: nothing to look up (nor warn of)
    return builder_config

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    return tfds.core.DatasetInfo(builder=self, description=info.description,
                                 features=info.features, metadata=self._metadata)

  @property
  def options(self) -> Options:
    if self._options is None:
      raise ValueError(f"{PREFIX}{self.builder_config.name} is read, not written: "
                       "no prepare options")
    return self._options

  def check(self) -> dict[str, list[Item]]:
    """Decodes every image and mask; raises one LayoutError listing every bad file;
    writes nothing. Fills the metadata the records are written with."""
    if self._splits is not None:
      return self._splits
    o = self.options
    splits, problems = folder_files.find_items(o.images, o.masks, o.val_fraction, o.seed)
    items = [it for split in splits.values() for it in split]
    progress = folder_files.Progress("checked", len(items))
    checked = []
    for c in folder_files.ordered_map(self._check_one, items, o.threads()):
      checked.append(c)
      progress.step()
    problems += [c.problem for c in checked if c.problem]
    class_names = self._class_names(items, checked, problems)
    common.raise_problems(problems)
    hws = np.array([c.hw for c in checked[:len(splits["train"])]])   # [N, 2]
    long_short = (int(np.median(hws.max(1))), int(np.median(hws.min(1))))
    self._metadata.update(
        class_names=list(class_names), has_masks=o.masks is not None,
        reduce_zero_label=o.reduce_zero_label, ignore_index=datasets.IGNORE_INDEX,
        source_ignore_index=o.source_ignore, scale=list(long_short),
        images=str(o.images), masks=str(o.masks or ""), min_size=o.min_size,
        val_fraction=o.val_fraction, seed=o.seed,
        check_rate=round(progress.rate(), 2))
    self._splits = splits
    return splits

  def _check_one(self, item: Item) -> _Checked:
    o = self.options
    try:
      before = folder_files.read_image(item.image).shape[:2]   # after EXIF orientation
      floor = o.min_size or largest_crop()
      if min(before) < floor and not o.min_size:
        return _Checked(before, None, (
            f"image {item.image} is {before[1]}x{before[0]}, under the {floor} px crops "
            f"of configs/folder.py; pass --min_size={floor} to upsample such images"))
      hw = folder_files.upsampled_hw(before, o.min_size)
      if item.mask is None:
        return _Checked(hw, None)
      ids, _ = folder_files.read_mask(item.mask)
    except common.LayoutError as e:
      return _Checked((0, 0), None, str(e))
    if ids.shape != before:
      return _Checked(hw, None, (
          f"size mismatch: image {item.image} is {before[1]}x{before[0]} (after its EXIF "
          f"orientation) but mask {item.mask} is {ids.shape[1]}x{ids.shape[0]}"))
    return _Checked(hw, np.bincount(ids.ravel(), minlength=256) > 0)

  def _class_names(self, items: list[Item], checked: list[_Checked],
                   problems: list[str]) -> tuple[str, ...]:
    """--classes, or ids 0..max found; adds masks holding ids out of range to `problems`."""
    o = self.options
    if o.masks is None:
      return o.classes
    first = 1 if o.reduce_zero_label else 0
    ignored = {datasets.IGNORE_INDEX, o.source_ignore} | ({0} if first else set())
    names = o.classes
    if not names:
      found = set().union(*(np.flatnonzero(c.ids) for c in checked if c.ids is not None))
      top = max(found - ignored, default=first - 1)
      names = tuple(str(i) for i in range(first, top + 1))
      logging.warning("no --classes: naming the ids %d..%d found in the masks by number",
                      first, top)
    if first <= o.source_ignore < first + len(names):
      raise common.LayoutError(f"--ignore_index={o.ignore_index} is class "
                               f"{names[o.source_ignore - first]!r}'s id")
    allowed = np.zeros(256, bool)
    allowed[first:first + len(names)] = True
    allowed[sorted(ignored)] = True
    for it, c in zip(items, checked):
      if c.ids is not None and (c.ids & ~allowed).any():
        problems.append(
            f"mask {it.mask} holds label values {np.flatnonzero(c.ids & ~allowed).tolist()} "
            f"outside the ids {common.describe_ids(allowed)} of {len(names)} classes")
    return names

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {name: self._generate_examples(name, items)
            for name, items in self.check().items()}

  def _generate_examples(self, split: str, items: list[Item]):
    progress = folder_files.Progress(f"wrote {split}", len(items))
    for item, example in folder_files.ordered_map(
        lambda it: (it, self._example(it)), items, self.options.threads()):
      progress.step()
      yield item.file_name, example

  def _example(self, item: Item) -> dict[str, Any]:
    o = self.options
    hw = folder_files.as_is_hw(item.image, o.min_size)   # checked already: no decoding
    if hw is not None:
      image = item.image.read_bytes()
    else:
      rgb = folder_files.read_image(item.image, o.min_size)
      image, hw = common.encode_png(rgb, compress_level=1), rgb.shape[:2]
    if item.mask is None:
      label = common.encode_png(np.zeros(hw, np.uint8), compress_level=1)
    else:
      ids, as_is = folder_files.read_mask(item.mask, hw)
      if o.source_ignore != datasets.IGNORE_INDEX and (ids == o.source_ignore).any():
        ids, as_is = np.where(ids == o.source_ignore, datasets.IGNORE_INDEX, ids), False
      label = item.mask.read_bytes() if as_is else common.encode_png(ids.astype(np.uint8))
    return {"image": image, "label": label, "file_name": item.file_name}


def prepare(name: str, data_dir: os.PathLike | str, options: Options) -> pathlib.Path:
  """Checks every file, then writes `folder/NAME` under `data_dir`; returns its folder.

  An already prepared `folder/NAME` is kept (delete its folder to prepare it again).
  """
  builder = Folder(config=name, options=options,
                   data_dir=os.path.expanduser(os.fspath(data_dir)))
  path = pathlib.Path(builder.data_dir)
  if builder.is_prepared():
    was = builder.info.metadata.get("images")
    logging.warning("%s%s is already prepared in %s (from %s); nothing to do. Delete that "
                    "folder to prepare it again.", PREFIX, name, path, was)
    return path
  builder.check()                       # every problem reported before anything is written
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  for split, info in builder.info.splits.items():
    logging.info("%s%s %s: %d records", PREFIX, name, split, info.num_examples)
  return path


def has_labels(dataset: str, data_dir: os.PathLike | str) -> bool:
  """Whether a prepared `folder/NAME` has masks and a validation split to score."""
  try:
    dataset_info(dataset, data_dir)
  except ValueError:
    return False
  return True


def dataset_info(dataset: str, data_dir: os.PathLike | str) -> datasets.DatasetInfo:
  """The DatasetInfo of a prepared `folder/NAME`, from its metadata."""
  name = dataset[len(PREFIX):]
  builder = Folder(config=name, data_dir=os.path.expanduser(os.fspath(data_dir)))
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {dataset!r} is not prepared in {builder.data_dir}; run:\n  python -m "
        f"glare_jax.data.prepare --dataset=folder --name={name} --images=DIR "
        f"[--masks=DIR] --data_dir={data_dir}")
  m = builder.info.metadata
  if not m.get("has_masks"):
    raise ValueError(f"{dataset} in {builder.data_dir} was prepared without --masks: it "
                     "has no classes to fine-tune or evaluate on")
  if "validation" not in builder.info.splits:
    raise ValueError(f"{dataset} in {builder.data_dir} has no validation split to evaluate "
                     "on; prepare it again with --val_fraction=F or a val/ folder")
  scale = tuple(m["scale"])
  return datasets.DatasetInfo(dataset, tuple(m["class_names"]), m["reduce_zero_label"],
                              scale, scale, m["ignore_index"])
