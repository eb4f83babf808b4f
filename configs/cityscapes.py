r"""GLARE continual pre-training of UDI ViT-S/16 on Cityscapes (paper Table 1).

Command (one host, 8 GPUs):

  python -m glare_jax.main --config=configs/cityscapes.py --workdir=workdirs/glare_cityscapes \
      --config.init_checkpoint=checkpoints/udi_vits16

Smoke test: `--config=configs/cityscapes.py:tiny`.

Hardware (paper): 8x NVIDIA A100 80GB; 100 epochs of the 2975 fine-annotated training
images (labels unused in pre-training).

Expected (paper Table 1, FPN fine-tuned for 20k iterations, mean +- std of 3 seeds):
  mIoU 75.3 (+-0.03) on Cityscapes val; the UDI starting point gives 74.7.
"""

from glare_jax.configs import common


def get_config(arg: str | None = None):
  return common.pretrain_config("cityscapes", arg)
