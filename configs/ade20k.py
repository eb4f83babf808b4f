r"""GLARE continual pre-training of UDI ViT-S/16 on ADE20k (paper Table 1).

Command (one host, 8 GPUs):

  python -m glare_jax.main --config=configs/ade20k.py --workdir=workdirs/glare_ade20k \
      --config.init_checkpoint=checkpoints/udi_vits16

Subsets (Figure 3, Table 5 runs on 20%): `--config.train_fraction=0.2`.
Smoke test: `--config=configs/ade20k.py:tiny`.

Hardware (paper): 8x NVIDIA A100 80GB; 100 epochs of the 20210 training images.

Expected (paper Table 1, FPN fine-tuned for 20k iterations, mean +- std of 3 seeds):
  mIoU 41.6 (+-0.13) on ADE20k val; the UDI starting point gives 41.2.
"""

from glare_jax.configs import common


def get_config(arg: str | None = None):
  return common.pretrain_config("ade20k", arg)
