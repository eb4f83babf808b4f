"""Fine-tune a pre-trained ViT-S/16 with Semantic FPN on Pascal Context (20k iterations).

    python -m glare_jax.main --config configs/pascal_context_seg.py \
        --workdir runs/pascal_context_seg --config.init_checkpoint=runs/pc_glare
    # the paper's 3 seeds, mean and std in runs/pascal_context_seg_3seeds/report.json:
    python -m glare_jax.evaluation.multiseed --config configs/pascal_context_seg.py \
        --workdir runs/pascal_context_seg_3seeds --config.init_checkpoint=runs/pc_glare

Protocol: batch 16, 512 crops from images resized keep-ratio to (2048, 512) x
U(0.5, 2.0), 60 classes (background included, labels kept as stored), AdamW
6e-5, poly decay, 1500 warm-up steps; whole-image evaluation of the 5105
validation images; 3 seeds. (mmseg's own Pascal Context configs use 520 / 480
crops; the paper fine-tunes every dataset at 512.)

Expected (paper Table 1, mIoU, mean over 3 seeds):
    UDI 49.1 (+-0.04), UDI -> UDI 49.2 (+-0.04), UDI -> FLSL 48.7 (+-0.04),
    UDI -> GLARE 49.3 (+-0.01); after pre-training on LoveDA (Table 4):
    UDI -> UDI 48.8, UDI -> GLARE 49.0.
"""

from glare_jax.configs import seg_common


def get_config(arg=None):
  return seg_common.finetune_config("pascal_context", arg)
