"""ADE20k / SceneParse150 (Zhou et al., 2017): 150 classes, 0 = other (ignored).

Labels are stored as in the annotation PNGs (0..150); reduce_zero_label happens
at training. Images are JPEGs, stored byte for byte (a greyscale or CMYK JPEG is
converted to RGB and stored as PNG).
"""

from __future__ import annotations

import pathlib

from glare_jax.data.builders import base
from glare_jax.data.builders import common

LAYOUT = """\
  MANUAL_DIR/                     ADEChallengeData2016.zip extracted here
    ADEChallengeData2016/images/training/ADE_train_*.jpg
    ADEChallengeData2016/images/validation/ADE_val_*.jpg
    ADEChallengeData2016/annotations/training/ADE_train_*.png
    ADEChallengeData2016/annotations/validation/ADE_val_*.png
  (MANUAL_DIR may also be the ADEChallengeData2016 folder itself)"""

SPLITS = {"train": "training", "validation": "validation"}


class ADE20k(base.SegmentationBuilder, skip_registration=True):
  """ADE20k scene parsing, the 150-class SceneParse benchmark."""

  name = "ade20k"
  HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
  IMAGE_ENCODING = "jpeg"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def find_pairs(self, root: pathlib.Path) -> dict[str, list[common.Pair]]:
    if (root / "ADEChallengeData2016").is_dir():
      root = root / "ADEChallengeData2016"
    splits = {}
    for split, folder in SPLITS.items():
      image_dir = common.require_dir(root / "images" / folder, LAYOUT)
      mask_dir = common.require_dir(root / "annotations" / folder, LAYOUT)
      splits[split] = common.pair_folders(image_dir, mask_dir, ".jpg")
    return splits
