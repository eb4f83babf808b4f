"""Fine-tune on the program-generated demo dataset (5 texture classes, 256 px), on a laptop.

    python -m glare_jax.main --config=configs/demo_seg.py --workdir=/tmp/demo_seg
    # from the demo pre-training run (python -m glare_jax.main --config=configs/demo.py ...):
    python -m glare_jax.main --config=configs/demo_seg.py --workdir=/tmp/demo_seg_glare \
        --config.init_checkpoint=/tmp/glare_demo
    # a smoke run of a few steps:
    python -m glare_jax.main --config=configs/demo_seg.py:tiny --workdir=/tmp/demo_seg_tiny

The demo records are generated into `data_dir` on first use (or beforehand with
`python -m glare_jax.data.prepare --dataset=demo --data_dir=...`).

A pipeline check, not a paper experiment: the protocol of glare_jax/configs/seg_common.py
with the `tiny_test` ViT of configs/demo.py (depth 2, width 64, adapters of 16),
128 px crops of images resized to 256 x U(0.5, 2.0), batch 16, 500 steps (AdamW
6e-5, poly decay, 50 warm-up steps), whole-image evaluation of the 64 validation
images at 256 every 50 steps.

Expected (randomly initialised backbone, 2 CPU cores: about 5 CPU-minutes): the
loss falls from 1.6 to about 0.9, the final mIoU is about 70 (aAcc 83), far above
the 5 mIoU (25 aAcc) of the most frequent class everywhere; from the demo
pre-training run's teacher it reached 77 (aAcc 88). There is no paper number.
"""

from glare_jax.configs import common, seg_common


def get_config(arg=None):
  c = seg_common.finetune_config("demo", arg)
  if c.model.variant != "tiny_test":
    # The pre-training demo's backbone (configs/demo.py), so its workdir can be fine-tuned.
    common.apply_tiny_model(c.model)
    c.crop_size = 128
    c.model.pos_grid = c.crop_size // c.model.patch_size
    c.fpn.feature_blocks = (0, 0, 1, 1)
    c.fpn.neck_dim = 64
    c.fpn.head_dim = 32
    c.eval.crop_size = 128
    c.eval.stride = 85
    c.num_workers = 0
    c.log_every_steps = 20
    seg_common.set_schedule(c, total_steps=500, warmup_steps=50)
  return c
