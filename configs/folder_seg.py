r"""Fine-tune with Semantic FPN on a folder of your own images with masks.

    python -m glare_jax.data.prepare --dataset=folder --name=tiles --images=~/tiles \
        --masks=~/tiles_masks --classes=background,building,road --val_fraction=0.1
    python -m glare_jax.main --config=configs/folder_seg.py:name=tiles \
        --workdir=runs/tiles_seg --config.init_checkpoint=runs/tiles_glare

`name=NAME` picks the prepared dataset `folder/NAME`; it needs masks and a
validation split (a val/ folder or --val_fraction at prepare time). Its class
names and count, label rules (--reduce_zero_label, --ignore_index) and the
resize scale (the median image size, long x short) are read from the prepared
dataset's metadata when the run starts, not from this file.

The protocol is configs/seg_common.py's (batch 16, 512 px crops, AdamW 6e-5,
poly decay, 20k iterations, whole-image evaluation); `--config.total_steps` and
`--config.optim.warmup_steps` shorten it (LoveDA's run takes 2k and 150).
Arguments combine as in every fine-tuning config: `:name=tiles,tiny` (a CPU smoke
run), `:name=tiles,adapter_mode=none` (a converted checkpoint without adapters).
"""

from glare_jax.configs import common, seg_common

folder = common.sibling(__file__, "folder")


def get_config(arg: str | None = None):
  name, rest = folder.split_name(arg, "configs/folder_seg.py")
  return seg_common.finetune_config(f"folder/{name}", rest)
