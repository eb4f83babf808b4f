r"""A complete GLARE pre-training run on the generated demo dataset, on a laptop.

Command (2 CPU cores, a few minutes; the dataset is generated into data_dir on first use):

  python -m glare_jax.main --config=configs/demo.py --workdir=/tmp/glare_demo

Same pipeline as the paper's runs, shrunk: the `tiny_test` ViT (depth 2, width 64,
randomly initialised: no checkpoint needed), 256x256 source images, 2 global crops
of 64 px and 4 local crops of 32 px, a 256-way head, batch 16, 10 epochs.
`configs/demo.py:objective=udi` runs the UDI objective instead.

Expected: about two minutes on 2 CPU cores (~50 images/s after compiling), the four
GLARE terms logged every 5 steps, checkpoints in the workdir; re-running the command
resumes. The backbone is random, so the terms stay near log(256) (this config checks
the machinery, not the method); fine-tune on it with configs/demo_seg.py. The dense
linear probe (probe/mIoU in metrics.jsonl) runs at step 0 and every 2 epochs: about
69 mIoU from the random backbone, unchanged after a 2-epoch run (README.md, "A miniature
Table 1" explains why).
"""

from glare_jax.configs import common


def get_config(arg: str | None = None):
  c = common.pretrain_config("demo", arg)
  common.apply_tiny(c)
  c.batch_size = 16
  c.num_epochs = 10
  c.checkpoint_every_steps = 50
  c.log_every_steps = 5
  # The tiny backbone starts from random weights: a larger step than the paper's
  # 1.5e-4 at batch 512 (4.7e-6 at 16) lets the adapters and head move in 160 steps.
  c.optim.base_lr = 1e-3
  c.optim.base_batch = 16
  # The dense linear probe (probe/mIoU in metrics.jsonl) at step 0 and every 2 epochs,
  # on every demo image at full size.
  c.probe.every_epochs = 2
  c.probe.image_size = 256
  c.probe.max_train_images = 256
  c.probe.max_val_images = 64
  c.probe.batch_size = 32
  return c
