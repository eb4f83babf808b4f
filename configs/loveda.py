r"""GLARE continual pre-training of UDI ViT-S/16 on LoveDA (paper Table 1).

Command (one host, 8 GPUs; the global batch 512 does not depend on the device count):

  python -m glare_jax.main --config=configs/loveda.py --workdir=workdirs/glare_loveda \
      --config.init_checkpoint=checkpoints/udi_vits16

`init_checkpoint` is a UDI checkpoint converted with `python -m glare_jax.convert`.
Smoke test of the same pipeline (minutes, CPU): `--config=configs/loveda.py:tiny`.
Every speed switch on (bf16, fused attention, device augmentation from a device
cache, ...; the same objective): `--config=configs/loveda.py:fast` (BENCHMARKS.md).
Baselines: `configs/loveda.py:objective=udi` (UDI -> UDI), `:objective=flsl`.

Hardware (paper): 8x NVIDIA A100 80GB, 100 epochs of the 2522 training tiles in
about 30 min (Table 7).

Expected (paper Table 1, FPN fine-tuned for 2k iterations, mean +- std of 3 seeds):
  mIoU 51.5 (+-0.01) on LoveDA val; the UDI starting point gives 50.9.
"""

from glare_jax.configs import common


def get_config(arg: str | None = None):
  return common.pretrain_config("loveda", arg)
