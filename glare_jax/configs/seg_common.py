"""Segmentation fine-tuning defaults (the UDI/FLSL mmseg protocol, docs/DESIGN.md
"Segmentation fine-tuning").

Every number of the protocol lives here once; dataset files
(`configs/loveda_seg.py`, ...) call `finetune_config(dataset, arg)` and change
what differs. Config arguments after the colon:

    tiny                 a minutes-long CPU smoke run of the same pipeline
    adapter_mode=none    a backbone without adapters (UDI / DINO / FLSL / HPT checkpoints)
    multiscale           the XCiT 4x/2x/1x/0.5x pyramid instead of four stride-16 maps
    slide                sliding-window evaluation (512 / 341) instead of whole images

e.g. `configs/loveda_seg.py:adapter_mode=none,tiny`.
"""

from __future__ import annotations

import ml_collections as mlc

from glare_jax.configs import common
from glare_jax.data import datasets
from glare_jax.data.seg_transforms import MMSEG_MEAN, MMSEG_STD

# mmseg paramwise_cfg custom_keys: decay_mult 0 where the name contains one of
# these. The FPN head's BatchNorms are named 'bn' (as in mmcv) and stay decayed.
SEG_NO_DECAY = (r".*pos_embed.*", r".*cls_token.*", r".*norm.*")


def finetune_config(dataset: str, arg: str | None = None) -> mlc.ConfigDict:
  """The full fine-tuning config for `dataset` (a name in glare_jax.data.datasets)."""
  a = common.parse_arg(arg, tiny=False, adapter_mode="sequential", multiscale=False,
                       slide=False)
  # A folder of your own (configs/folder_seg.py) has its scales in its prepared
  # metadata: () here reads them at run time.
  info = None if dataset.startswith("folder/") else datasets.get_info(dataset)
  base = common.pretrain_config(dataset)   # shared runtime fields (mesh, I/O, logging)

  c = mlc.ConfigDict()
  c.mode = "finetune"
  c.seed = 0
  c.num_seeds = 3                 # seeds seed .. seed + num_seeds - 1; report mean +- std
  c.dataset = dataset
  c.data_dir = base.data_dir
  c.train_split = "train"
  c.val_split = "validation"
  # The backbone to fine-tune: a converted checkpoint (python -m glare_jax.convert) or a
  # GLARE pre-training workdir (its latest checkpoint); '' = random init (smoke runs only).
  c.init_checkpoint = ""
  c.init_which = "teacher"        # of a pre-training workdir: 'teacher' (EMA, as UDI/DINO
                                  # evaluate) or 'student'
  c.total_steps = 20_000
  c.batch_size = 16               # global batch
  c.crop_size = 512
  c.num_workers = base.num_workers
  c.prefetch = base.prefetch

  # Backbone: mmseg resizes the checkpoint's position table once to the crop's
  # grid (torch bicubic by size) and fine-tunes that 32x32 table.
  c.model = common.model_config("S")
  c.model.pos_resize = "size"
  c.model.pos_grid = c.crop_size // c.model.patch_size
  c.model.drop_path = 0.1         # FLSL's semfpn config: drop_path_rate 0.1 (linear over depth)
  c.model.adapter_mode = a.adapter_mode

  c.fpn = mlc.ConfigDict(dict(
      feature_blocks=(2, 5, 8, 11),   # 0-indexed block outputs, no final norm
      multiscale=a.multiscale,        # XCiT pyramid (strides 4/8/16/32) instead of 4 x stride 16
      neck_dim=256,
      head_dim=128,
      feature_strides=(4, 8, 16, 32),  # nominal strides, as mmseg's FPNHead is configured
      dropout=0.1,
      bn_momentum=0.9,                # torch momentum 0.1
      bn_eps=1e-5,
  ))

  c.aug = mlc.ConfigDict(dict(
      scale=info.train_scale if info else (),  # (long, short) before the random ratio
      ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75,
      max_crop_tries=10,
      flip_p=0.5,
      photometric=True,
      brightness_delta=32,
      contrast_range=(0.5, 1.5),
      saturation_range=(0.5, 1.5),
      hue_delta=18,
      mean=MMSEG_MEAN,
      std=MMSEG_STD,
  ))
  c.loss = mlc.ConfigDict(dict(avg_non_ignore=False))  # mmseg default: mean over all pixels

  c.optim = mlc.ConfigDict(dict(
      name="adamw",
      lr=6e-5,
      b1=0.9,
      b2=0.999,
      weight_decay=0.01,
      no_decay=SEG_NO_DECAY,          # by name only: biases and BatchNorms decay (mmseg) ...
      decay_1d=(r".*",),              # ... so every 1-D array not named above decays
      power=1.0,                      # poly decay to min_lr
      min_lr=0.0,
      warmup_steps=1500,
      warmup_ratio=1e-6,              # linear warm-up from 1e-6 x the lr
      clip_grad=0.0,                  # mmseg optimizer_config=dict(): no clipping
      param_preset="full",            # everything is fine-tuned
      param_rules=(),                 # extra (regex, 'train'|'freeze') pairs, tried first
  ))

  c.eval = mlc.ConfigDict(dict(
      mode="slide" if a.slide else "whole",
      scale=info.test_scale if info else (),   # keep-ratio test resize
      crop_size=512,                  # slide mode
      stride=341,
      window_batch=8,
      every_steps=2_000,              # mmseg schedule_20k: evaluation interval 2000
      max_images=0,                   # 0 = the whole validation split
      save_predictions=False,         # PNGs in the dataset's label ids under workdir/predictions
  ))

  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 1
  c.log_every_steps = 50          # mmseg log interval
  c.tensorboard = base.tensorboard
  c.mesh = base.mesh
  c.distributed = base.distributed

  if a.tiny:
    apply_tiny(c)
  return c


def set_schedule(c: mlc.ConfigDict, total_steps: int, warmup_steps: int) -> None:
  """Change the iteration budget (and the evaluation / checkpoint interval with it)."""
  c.total_steps = total_steps
  c.optim.warmup_steps = warmup_steps
  c.eval.every_steps = total_steps // 10
  c.checkpoint_every_steps = total_steps // 10


def apply_tiny(c: mlc.ConfigDict) -> None:
  """A minutes-long smoke run on 2 CPU cores: tiny ViT, 64 px crops, 20 steps."""
  common.apply_tiny_model(c.model)
  c.crop_size = 64
  c.model.pos_grid = c.crop_size // c.model.patch_size
  c.fpn.feature_blocks = (0, 0, 1, 1)
  c.fpn.neck_dim = 32
  c.fpn.head_dim = 16
  c.aug.scale = (128, 128)
  c.eval.scale = (128, 128)
  c.eval.crop_size = 64
  c.eval.stride = 43
  c.eval.max_images = 4
  c.batch_size = 4
  c.num_workers = 0
  set_schedule(c, total_steps=20, warmup_steps=5)
  c.log_every_steps = 1
