"""Fine-tune a pre-trained ViT-S/16 with Semantic FPN on LoveDA (2k iterations).

    python -m glare_jax.main --config configs/loveda_seg.py --workdir runs/loveda_seg \
        --config.init_checkpoint=runs/loveda_glare
    # the paper's 3 seeds, mean and std in runs/loveda_seg_3seeds/report.json:
    python -m glare_jax.evaluation.multiseed --config configs/loveda_seg.py \
        --workdir runs/loveda_seg_3seeds --config.init_checkpoint=runs/loveda_glare
    # baselines without adapters (original UDI / DINO / FLSL weights, HPT):
    python -m glare_jax.main --config configs/loveda_seg.py:adapter_mode=none ...
    # smoke run on CPU:
    python -m glare_jax.main --config configs/loveda_seg.py:tiny --workdir /tmp/seg_tiny

init_checkpoint is a GLARE pre-training workdir (its latest teacher backbone,
adapters included; `--config.init_which=student` for the student) or a
converted checkpoint (python -m glare_jax.convert; use adapter_mode=none).

Protocol: batch 16, 512 crops from images resized to 1024 x U(0.5, 2.0), AdamW
6e-5, poly decay, 150 warm-up steps, 2000 steps; whole-image evaluation of the
1669 validation tiles at 1024x1024; 3 seeds.

Expected (paper, validation, percent; Table 1: mean (std) mIoU over 3 seeds;
Table 2: the adapter (UniAdapter) rows):
                   Table 1 mIoU    Table 2 mIoU  aAcc   mAcc
    UDI            50.9 (0.02)     50.9          70.0   63.8
    UDI -> UDI     51.1 (0.01)     51.1          70.1   63.9
    UDI -> FLSL    49.9 (0.12)     49.0          68.5   60.9
    UDI -> GLARE   51.5 (0.01)     51.5          70.2   64.3
    HPT (every weight trained, no adapters; Table 2): UDI -> UDI 50.4,
    UDI -> FLSL 50.9, UDI -> GLARE 12.7 mIoU.
    Other starting points (Table 3): DINO 50.3 -> 50.6, FLSL 50.3 -> 50.5 with GLARE.
"""

from glare_jax.configs import seg_common


def get_config(arg=None):
  c = seg_common.finetune_config("loveda", arg)
  if c.model.variant != "tiny_test":
    seg_common.set_schedule(c, total_steps=2_000, warmup_steps=150)
  return c
