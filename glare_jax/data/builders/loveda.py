"""LoveDA (Wang et al., 2021): 1024x1024 aerial tiles, urban and rural domains.

Masks: 0 no-data (ignored), 1 background, 2 building, 3 road, 4 water, 5 barren,
6 forest, 7 agriculture; stored as is (reduce_zero_label happens at training).
The test split has no public masks: its records carry all-zero labels (no-data).
"""

from __future__ import annotations

import pathlib

from glare_jax.data.builders import base
from glare_jax.data.builders import common

LAYOUT = """\
  MANUAL_DIR/                     the official archives Train.zip, Val.zip
    Train/{Urban,Rural}/images_png/N.png      (and Test.zip) extracted here
    Train/{Urban,Rural}/masks_png/N.png       one domain may be absent
    Val/{Urban,Rural}/images_png/N.png
    Val/{Urban,Rural}/masks_png/N.png
    Test/{Urban,Rural}/images_png/N.png       optional, no masks"""

# split name -> folder; the test split is optional.
SPLITS = {"train": "Train", "validation": "Val", "test": "Test"}
DOMAINS = ("Urban", "Rural")


class LoveDA(base.SegmentationBuilder, skip_registration=True):
  """LoveDA land-cover segmentation (7 classes + no-data)."""

  name = "loveda"
  HOMEPAGE = "https://github.com/Junjue-Wang/LoveDA"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def find_pairs(self, root: pathlib.Path) -> dict[str, list[common.Pair]]:
    splits = {}
    for split, folder in SPLITS.items():
      split_dir = root / folder
      if split == "test" and not split_dir.exists():
        continue
      common.require_dir(split_dir, LAYOUT)
      domains = [split_dir / d for d in DOMAINS if (split_dir / d).is_dir()]
      if not domains:
        raise common.LayoutError(
            f"{split_dir} holds neither Urban/ nor Rural/; expected:\n{LAYOUT}")
      pairs = []
      for domain in domains:
        image_dir = common.require_dir(domain / "images_png", LAYOUT)
        mask_dir = (None if split == "test"
                    else common.require_dir(domain / "masks_png", LAYOUT))
        pairs += common.pair_folders(image_dir, mask_dir, ".png",
                                     name_prefix=f"{domain.name}/")
      splits[split] = pairs
    return splits
