"""Pascal Context (Mottaghi et al., 2014): 59 classes + background, 4998 / 5105.

We read the layout mmsegmentation's `tools/dataset_converters/pascal_context.py`
produces from VOC2010 and the Detail API annotations: 60-class label PNGs
(0 = background, 1..59 the classes; 255 if present is ignored), stored as is.
"""

from __future__ import annotations

import pathlib

from glare_jax.data.builders import base
from glare_jax.data.builders import common

LAYOUT = """\
  MANUAL_DIR/                     VOC2010 + mmseg's converted 60-class masks
    VOCdevkit/VOC2010/JPEGImages/ID.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/ID.png
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt   one ID a line
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt
  (MANUAL_DIR may also be the VOC2010 folder itself)"""

SPLITS = {"train": "train.txt", "validation": "val.txt"}


class PascalContext(base.SegmentationBuilder, skip_registration=True):
  """Pascal Context, 60 classes (59 + background), the mmseg split lists."""

  name = "pascal_context"
  HOMEPAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"
  IMAGE_ENCODING = "jpeg"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def find_pairs(self, root: pathlib.Path) -> dict[str, list[common.Pair]]:
    if (root / "VOCdevkit" / "VOC2010").is_dir():
      root = root / "VOCdevkit" / "VOC2010"
    image_dir = common.require_dir(root / "JPEGImages", LAYOUT)
    mask_dir = common.require_dir(root / "SegmentationClassContext", LAYOUT)
    list_dir = common.require_dir(root / "ImageSets" / "SegmentationContext", LAYOUT)
    splits = {}
    for split, list_name in SPLITS.items():
      list_file = list_dir / list_name
      if not list_file.is_file():
        raise common.LayoutError(f"{list_file} is missing; expected:\n{LAYOUT}")
      ids = [line.strip() for line in list_file.read_text().splitlines()
             if line.strip()]
      if not ids:
        raise common.LayoutError(f"{list_file} lists no image ids")
      problems = []
      for i in ids:
        if not (image_dir / f"{i}.jpg").is_file():
          problems.append(f"{list_file} lists {i} but {image_dir / (i + '.jpg')} "
                          "is missing")
        elif not (mask_dir / f"{i}.png").is_file():
          problems.append(f"image {image_dir / (i + '.jpg')} has no mask "
                          f"(expected {mask_dir / (i + '.png')})")
      common.raise_problems(problems)
      splits[split] = [common.Pair(image_dir / f"{i}.jpg", mask_dir / f"{i}.png",
                                   f"{i}.jpg") for i in ids]
    return splits
