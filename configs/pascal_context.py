r"""GLARE continual pre-training of UDI ViT-S/16 on Pascal Context (paper Table 1).

Command (one host, 8 GPUs):

  python -m glare_jax.main --config=configs/pascal_context.py \
      --workdir=workdirs/glare_pascal_context --config.init_checkpoint=checkpoints/udi_vits16

Smoke test: `--config=configs/pascal_context.py:tiny`.

Hardware (paper): 8x NVIDIA A100 80GB; 100 epochs of the 4998 training images.

Expected (paper Table 1, FPN fine-tuned for 20k iterations, mean +- std of 3 seeds):
  mIoU 49.3 (+-0.01) on Pascal Context val (60 classes); the UDI starting point gives 49.1.
"""

from glare_jax.configs import common


def get_config(arg: str | None = None):
  return common.pretrain_config("pascal_context", arg)
