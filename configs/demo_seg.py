"""Fine-tune on the program-generated demo dataset (5 texture classes, 256 px).

    python -m glare_jax.data.prepare demo          # writes the TFDS records
    python -m glare_jax.main --config configs/demo_seg.py --workdir runs/demo_seg
    python -m glare_jax.main --config configs/demo_seg.py:tiny --workdir /tmp/demo_seg

A pipeline check, not a paper experiment: 256 px crops of images resized to
256 x U(0.5, 2.0), 2000 steps, whole-image evaluation at 256. There is no paper
number; the loss should fall steadily and the mIoU end far above the 20% of a
constant prediction.
"""

from configs import seg_common


def get_config(arg=None):
  c = seg_common.finetune_config("demo", arg)
  if c.model.variant != "tiny_test":
    c.crop_size = 256
    c.model.pos_grid = c.crop_size // c.model.patch_size
    c.eval.crop_size = 256
    c.eval.stride = 171
    seg_common.set_schedule(c, total_steps=2_000, warmup_steps=150)
  return c
