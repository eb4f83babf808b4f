"""The TFDS builders our datasets derive from.

`RecordBuilder` fixes the features and the array_record format (no TensorFlow:
see `common.py`). `SegmentationBuilder` adds the manual-dir input: a subclass
names itself, describes its layout and implements `find_pairs`; the base class
checks every file, then writes.

    builder = LoveDA(data_dir="~/tensorflow_datasets")
    builder.check(manual_dir)            # raises LayoutError before writing anything
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
    source = builder.as_data_source("train")   # random access; see pipeline.py
"""

from __future__ import annotations

import abc
import inspect
import os
import pathlib

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from glare_jax.data import datasets
from glare_jax.data.builders import common


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes `image`, `label`, `file_name` records as array_record files.

  Not registered with tfds (names like 'cityscapes' exist there already):
  construct the class directly, or through `builders.get_builder`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_ENCODING = "png"    # how most source images are stored (see common.py)
  HOMEPAGE = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup goes through the optional `importlib_resources` package
    # for classes defined in a package; the file of the class is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # tfds prints a "Downloading and preparing dataset ..." banner; ours read local
  # files (or generate them), so one log line each instead.
  def _log_download_bytes(self) -> None:
    logging.info("preparing %s in %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("%s is ready in %s", self.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=common.segmentation_features(self.IMAGE_ENCODING),
        homepage=self.HOMEPAGE or None,
    )


class SegmentationBuilder(RecordBuilder, skip_registration=True):
  """Images + masks from a manual dir, checked in full before anything is written."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._checked: tuple[pathlib.Path, dict[str, list[common.Pair]]] | None = None

  @abc.abstractmethod
  def find_pairs(self, root: pathlib.Path) -> dict[str, list[common.Pair]]:
    """{split: pairs} found under the manual dir `root`; LayoutError if malformed."""

  def check(self, manual_dir: os.PathLike | str | None
            ) -> dict[str, list[common.Pair]]:
    """Checks layout and every file under `manual_dir`; returns the pairs.

    Raises LayoutError naming each bad path; writes nothing. The result is
    remembered, so `download_and_prepare` does not check the same dir twice.
    """
    root = common.check_manual_dir(manual_dir, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    if self._checked and self._checked[0] == root.resolve():
      return self._checked[1]
    splits = self.find_pairs(root)
    info = datasets.get_info(self.name)
    max_id = info.num_classes if info.reduce_zero_label else info.num_classes - 1
    common.check_pairs(splits, common.allowed_ids(max_id))
    self._checked = (root.resolve(), splits)
    return splits

  def _split_generators(self, dl_manager):
    splits = self.check(dl_manager.manual_dir)
    return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

  def _generate_examples(self, pairs: list[common.Pair]):
    for pair in pairs:
      yield pair.file_name, {
          "image": common.image_bytes(pair.image),
          "label": common.label_bytes(
              pair, None if pair.mask else common.image_hw(pair.image)),
          "file_name": pair.file_name,
      }
