"""Cityscapes (Cordts et al., 2016): 19 training classes, 2975 / 500 images.

Labels are stored as train ids (0..18, 255 ignored): the `*_labelTrainIds.png`
files made by cityscapesScripts' createTrainIdLabelImgs when present, otherwise
the `*_labelIds.png` masks mapped with the official id -> train id table.
"""

from __future__ import annotations

import pathlib

import numpy as np

from glare_jax.data.builders import base
from glare_jax.data.builders import common

LAYOUT = """\
  MANUAL_DIR/                     leftImg8bit_trainvaltest.zip and
    leftImg8bit/{train,val}/CITY/*_leftImg8bit.png      gtFine_trainvaltest.zip
    gtFine/{train,val}/CITY/*_gtFine_labelTrainIds.png   extracted here
      (or *_gtFine_labelIds.png, mapped to train ids)"""

SPLITS = {"train": "train", "validation": "val"}

# cityscapesScripts labels.py: label id -> train id for the 19 evaluated classes.
_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
                   22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16,
                   32: 17, 33: 18}


def label_id_to_train_id() -> np.ndarray:
  """[256] uint8 lookup table: every id outside the 19 classes -> 255."""
  table = np.full(256, 255, np.uint8)
  for label_id, train_id in _ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


class Cityscapes(base.SegmentationBuilder, skip_registration=True):
  """Cityscapes fine annotations, 19 classes as train ids."""

  name = "cityscapes"
  HOMEPAGE = "https://www.cityscapes-dataset.com/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def find_pairs(self, root: pathlib.Path) -> dict[str, list[common.Pair]]:
    table = label_id_to_train_id()
    splits = {}
    for split, folder in SPLITS.items():
      image_root = common.require_dir(root / "leftImg8bit" / folder, LAYOUT)
      mask_root = common.require_dir(root / "gtFine" / folder, LAYOUT)
      images = common.list_files(image_root, "*/*_leftImg8bit.png")
      pairs, problems = [], []
      for image in images:
        city, stem = image.parent.name, image.name[:-len("_leftImg8bit.png")]
        train_ids = mask_root / city / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = mask_root / city / f"{stem}_gtFine_labelIds.png"
        name = f"{city}/{image.name}"
        if train_ids.is_file():
          pairs.append(common.Pair(image, train_ids, name))
        elif label_ids.is_file():
          pairs.append(common.Pair(image, label_ids, name, label_map=table))
        else:
          problems.append(f"image {image} has no mask (expected {train_ids} "
                          f"or {label_ids})")
      common.raise_problems(problems)
      splits[split] = pairs
    return splits
