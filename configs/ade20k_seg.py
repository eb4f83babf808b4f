"""Fine-tune a pre-trained ViT-S/16 with Semantic FPN on ADE20k (20k iterations).

    python -m glare_jax.main --config configs/ade20k_seg.py --workdir runs/ade20k_seg \
        --config.init_checkpoint=runs/ade20k_glare
    # the paper's 3 seeds, mean and std in runs/ade20k_seg_3seeds/report.json:
    python -m glare_jax.evaluation.multiseed --config configs/ade20k_seg.py \
        --workdir runs/ade20k_seg_3seeds --config.init_checkpoint=runs/ade20k_glare
    python -m glare_jax.main --config configs/ade20k_seg.py:tiny --workdir /tmp/seg_tiny

Protocol: batch 16, 512 crops from images resized keep-ratio to (2048, 512) x
U(0.5, 2.0), 150 classes (label 0 ignored), AdamW 6e-5, poly decay, 1500 warm-up
steps; whole-image evaluation of the 2000 validation images with the short
side at 512; 3 seeds.

Expected (paper Table 1, mIoU, mean over 3 seeds):
    UDI 41.2 (+-0.11), UDI -> UDI 41.1 (+-0.11), UDI -> FLSL 41.2 (+-0.06),
    UDI -> GLARE 41.6 (+-0.13); after pre-training on LoveDA (Table 4):
    UDI -> UDI 41.1, UDI -> GLARE 41.3.
"""

from glare_jax.configs import seg_common


def get_config(arg=None):
  return seg_common.finetune_config("ade20k", arg)
