"""Fine-tune a pre-trained ViT-S/16 with Semantic FPN on Cityscapes (20k iterations).

    python -m glare_jax.main --config configs/cityscapes_seg.py --workdir runs/cityscapes_seg \
        --config.init_checkpoint=runs/cityscapes_glare
    # the paper's 3 seeds, mean and std in runs/cityscapes_seg_3seeds/report.json:
    python -m glare_jax.evaluation.multiseed --config configs/cityscapes_seg.py \
        --workdir runs/cityscapes_seg_3seeds --config.init_checkpoint=runs/cityscapes_glare
    python -m glare_jax.main --config configs/cityscapes_seg.py:slide ...   # 512/341 windows

Protocol: batch 16, 512 crops from images resized to (2048, 1024) x U(0.5, 2.0),
19 train ids, AdamW 6e-5, poly decay, 1500 warm-up steps; whole-image
evaluation of the 500 validation images at 2048x1024; 3 seeds.

Expected (paper Table 1, mIoU, mean over 3 seeds):
    UDI 74.7 (+-0.01), UDI -> UDI 74.9 (+-0.17), UDI -> FLSL 74.2 (+-0.28),
    UDI -> GLARE 75.3 (+-0.03); after pre-training on LoveDA (Table 4):
    UDI -> UDI 75.2, UDI -> GLARE 75.0.
"""

from glare_jax.configs import seg_common


def get_config(arg=None):
  return seg_common.finetune_config("cityscapes", arg)
