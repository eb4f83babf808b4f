"""Shared pieces of the GLARE configs: every default of the paper's runs lives here once.

Dataset configs (`configs/loveda.py`, ...) call `pretrain_config(...)` and set
their dataset fields; they import only `glare_jax` and `ml_collections`. A config argument after the colon selects switches,
big_vision style: `configs/loveda.py:tiny` (a minutes-long run of the same
pipeline), `configs/loveda.py:objective=udi,tiny`, `configs/loveda.py:fast` (every
speed switch on, see `apply_fast` and BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import pathlib
import types

import ml_collections as mlc

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Parameter-rule presets: ordered (regex, rule) lists, the first match wins.
# Rules: 'train' or 'freeze'. Paths look like 'backbone/block_3/adapter/up/kernel'.
PARAM_PRESETS = {
    # The paper's setting: adapters + projection head + cross-attention.
    "adapters": (
        (r"backbone/block_\d+/adapter/.*", "train"),
        ("backbone/mask_token", "train"),  # only present with patch_aug.kind = 'mask'
        ("head/.*", "train"),
        ("cross_attention/.*", "train"),
        (".*", "freeze"),
    ),
    # HPT (Table 2): every parameter trains (use with model.adapter_mode='none').
    "full": (
        (".*", "train"),
    ),
    "head": (
        ("backbone/mask_token", "train"),
        ("head/.*", "train"),
        ("cross_attention/.*", "train"),
        (".*", "freeze"),
    ),
}

# Weight decay (docs/DESIGN.md "Parameters", as DINO's get_params_groups): none on biases and on
# 1-D parameters. `weight_g` [K] and `mask_token` [D] are 1-D here but 2-D in the
# PyTorch models ([K, 1], [1, D]), where they decay, so they decay here too (when
# trained: weight_g only with head.norm_last_layer=False, mask_token only with
# patch_aug.kind='mask'). cls_token and pos_embed decay (3-D), as in DINO.
NO_DECAY = (r".*/bias",)
DECAY_1D = (r".*/weight_g", r".*/mask_token")


# The paper's GLARE ablations as named presets, selected by config arguments
# (`configs/loveda.py:levels=glob_reg`, `:patch_aug=mask_block`, `:regions=random3`).
# Table 5: (w_glob, w_reg, w_loc1, w_loc2); "Local" is L_loc1 + L_loc2.
LEVELS = {
    "glob": (1.0, 0.0, 0.0, 0.0),
    "glob_loc": (1.0, 0.0, 1.0, 1.0),
    "glob_reg": (1.0, 1.0, 0.0, 0.0),
    "reg_loc": (0.0, 1.0, 1.0, 1.0),
    "all": (1.0, 1.0, 1.0, 1.0),
}
# Table 6: (kind, placement) of the patch augmentation; 'none' drops L_loc1.
PATCH_AUGS = {
    "mask_block": ("mask", "block"),
    "mask_random": ("mask", "random"),
    "blur_random": ("blur", "random"),
    "blur_block": ("blur", "block"),
    "none": ("none", "random"),
}
# Table 8: (sampling, M). Attention-aware sampling draws one region per head.
REGION_SAMPLINGS = {
    "random3": ("random", 3),
    "random6": ("random", 6),
    "attention6": ("attention", 6),
}


def sibling(this_file: str, name: str) -> types.ModuleType:
  """The config file `name`.py beside `this_file`, loaded by path (no `configs` package)."""
  path = pathlib.Path(this_file).resolve().parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_glare_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults):
  """'tiny,objective=udi' -> ConfigDict(tiny=True, objective='udi', ...).

  Every key must be in `defaults`; values are cast to the default's type.
  """
  out = mlc.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not value:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out


def model_config(variant: str = "S") -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      variant=variant,          # 'S' (ViT-S/16), 'B', 'tiny_test'
      patch_size=16,
      num_prefix=2,             # UDI: [CLS] and [CLS+]; read from the checkpoint when converting
      pos_grid=14,              # stored position grid (224 / 16)
      pos_resize="dino",        # 'dino' ((g + 0.1) / g0 scale factor) or 'size'
      drop_path=0.1,            # student only; the teacher runs deterministically
      adapter_mode="sequential",  # 'sequential' (paper eq. 3), 'parallel' (UniAdapter), 'none'
      adapter_dim=64,           # bottleneck r
      adapter_scale=0.1,        # s
      use_mask_token=False,     # set by patch_aug.kind == 'mask'
      # Speed switches (BENCHMARKS.md says what each buys; none changes the maths beyond
      # rounding). dtype: compute dtype of the layers, 'float32' or 'bfloat16' (params,
      # residual stream, LayerNorm statistics, softmaxes, head logits and losses stay fp32).
      dtype="float32",
      # Attention of every block but the last (whose probabilities GLARE's regions
      # need): 'explicit' (softmax written out), 'xla' or 'cudnn' (jax.nn.dot_product_
      # attention; 'cudnn' is the fused flash kernel, GPU + bfloat16 only), 'auto'
      # ('cudnn' where it runs, else 'xla').
      attention="explicit",
      scan_blocks=False,        # blocks 0..depth-2 as one lax.scan (compile time); params stay block_{i}
      remat=False,              # recompute block activations in the backward pass ...
      remat_policy="nothing_saveable",  # ... saving what this jax.checkpoint_policies name keeps
  ))


def head_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      out_dim=8192,             # K
      hidden_dim=2048,
      bottleneck_dim=256,
      num_layers=3,
      norm_last_layer=True,     # DINO's: weight_g stays 1 (frozen); False trains it
  ))


def crops_config() -> mlc.ConfigDict:
  """Multi-crop augmentation, paper appendix B.1."""
  return mlc.ConfigDict(dict(
      num_global=2,
      num_local=10,
      global_size=224,
      local_size=96,
      global_scale=(0.25, 1.0),
      local_scale=(0.05, 0.25),
      ratio=(3.0 / 4.0, 4.0 / 3.0),
      flip_p=0.5,
      jitter_p=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_p=0.2,
      blur_sigma=(0.1, 2.0),
      blur_p=(1.0, 0.1, 0.5),       # global 1, global 2, locals
      solarize_p=(0.0, 0.2, 0.0),   # global 1, global 2, locals
      solarize_threshold=128,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      global_overlap=True,          # re-draw global 2 until it overlaps global 1 (UDI)
      locals_in_union=True,         # draw locals inside the union of the global boxes
      max_redraws=100,
      augment_on="host",            # 'host' (grain workers) or 'device' (inside the step)
      device_image_size=512,        # 'device': images shrunk to fit, padded to this square (crops
                                    # then resample a shrunk source: slightly less fine detail than
                                    # the host path; 1024 keeps LoveDA's tiles whole, 7.9 GB cached)
      device_resample="float32",    # 'device' crop resampling: 'float32' (HIGHEST) or 'bfloat16'
                                    # (matrix units, ~0.2/255 mean difference; multicrop.py)
  ))


def glare_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      # Speed switch: run the projection head and the losses over chunks of this
      # many images (0: the whole batch at once), recomputing each chunk in the
      # backward pass. Same sums; the [rows, K = 8192] float32 logits of one chunk
      # instead of the batch's are alive at a time (~0.2 GB per image otherwise).
      head_chunk_size=0,
      # What the student's globals are for L_glob, L_reg and L_loc2: 'distorted' (one
      # pass with L_loc1's patch augmentation, iBOT's convention) or 'clean' (a second
      # pass on the clean views, f(x) of eqs. 4, 5 and 9); docs/DESIGN.md.
      student_input="distorted",
      # Per-term weights; Table 5's rows are these switched to 0.
      w_glob=1.0,
      w_reg=1.0,
      w_loc1=1.0,
      w_loc2=1.0,
      regions=dict(
          sampling="attention",     # 'attention' (one region per head) or 'random'
          num_regions=6,            # M; with 'attention' it must equal the head count
          min_patches=2,
          max_patches=6,
          min_valid_fraction=0.5,   # regions with less of themselves inside the other view drop out
      ),
      patch_aug=dict(
          kind="blur",              # 'blur' (default), 'mask' (learned mask token), 'none'
          placement="random",       # 'random' or 'block'
          zero_prob=0.5,            # r = 0 with this probability
          ratio=(0.1, 0.5),         # else r ~ U[0.1, 0.5] (iBOT's 0.3 +- 0.2)
          blur_sigma=5.0,           # pixels, inside each chosen 16x16 cell
          blur_scope="cell",        # 'cell': Gaussian restricted to the cell; 'image': blur once, copy cells
          block_aspect=(0.3, 1 / 0.3),
          block_min_patches=16,     # iBOT: (min(h, w) // 3) ** 2 = 16 on the 14x14 global grid
      ),
  ))


def loss_config() -> mlc.ConfigDict:
  """DINO-style cross-entropy shared by every objective."""
  return mlc.ConfigDict(dict(
      student_temp=0.1,
      teacher_temp=0.07,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_epochs=30,
      center_momentum=0.9,
  ))


def udi_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      mix_weight=0.5,               # [CLS+] target: 0.5 * patch logits + 0.5 * [CLS] logits
      global_window=3,              # one sampled token per 3x3 window on global views
      local_window=2,               # 2x2 on local views
      random_sampling=True,         # UDI: a random token per window (False: the window's first)
      align_corners=True,           # UDI's geometry: token k at k/(F-1) between the crop's
                                    # first and last pixel centres; False: patch centres (GLARE's)
      num_heads=6,                  # must equal cross_attention.num_heads (one module)
  ))


def flsl_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      w_ms=0.03,                    # mean-shift term, 0.03 * (2 - 2 cos)
      w_ce=1.0,
      w_vol=5.0,                    # volume maximisation
      drop_prefix=True,             # FLSL runs without prefix tokens
      # FLSL's main_flsl.py defaults: a constant teacher temperature, no centring.
      teacher_temp=0.04,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_epochs=0,
      # Mean-shift attention scales: FLSL's constants 0.1 / sqrt(384) and 0.2 / sqrt(384),
      # whatever the width (its main_flsl.py hard-codes 384, ViT-S's).
      meanshift_sa_scale=0.1 / 384 ** 0.5,
      meanshift_ca_scale=0.2 / 384 ** 0.5,
      global_window=3,              # sampled tokens: one per 3x3 window on the student global view
      local_window=2,               # 2x2 on local views
      random_sampling=False,        # FLSL's default: the first token of each window
  ))


def optim_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      base_lr=1.5e-4,               # for batch 512; lr = base_lr * batch / 512
      base_batch=512,
      min_lr=1e-6,
      warmup_epochs=1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.999,
      clip_grad=3.0,
      clip_mode="per_param",        # DINO/UDI's clip_gradients (each array's norm); or 'global'
      freeze_last_layer_epochs=1,
      ema_momentum=0.996,           # -> 1 on a per-step cosine
      ema_final=1.0,
      param_preset="adapters",      # 'adapters', 'full', 'head' (see PARAM_PRESETS)
      param_rules=(),               # extra (regex, 'train'|'freeze') pairs, tried first
      no_decay=NO_DECAY,            # (regex, ...): never decayed
      decay_1d=DECAY_1D,            # (regex, ...): 1-D arrays that decay (others do not)
      lr_mults=(),                  # (regex, multiplier) pairs
  ))


def probe_config() -> mlc.ConfigDict:
  """The dense linear probe run during pre-training (glare_jax/evaluation/probe.py)."""
  return mlc.ConfigDict(dict(
      every_epochs=10,              # at step 0, every this many epochs and at the end; 0: off
                                    # (a dataset without labels must set 0; a folder
                                    # dataset without masks turns it off itself)
      which="teacher",              # backbone probed: 'teacher' (EMA) or 'student'
      image_size=512,               # images and labels resized to this square
      max_train_images=500,         # the first N records of train_split fit the classifier
      max_val_images=500,           # the first N records of val_split score it (0: all)
      batch_size=32,                # global batch of the feature pass
      feature_blocks=(),            # (): final-norm patch tokens; (2, 5, 8, 11): the FPN's
                                    # block outputs, concatenated
      ridge=1e-3,                   # ridge strength, relative to the mean feature variance
      train_split="train",
      val_split="validation",
  ))


def pretrain_config(dataset: str, arg: str | None = None) -> mlc.ConfigDict:
  """The full pre-training config with the paper's defaults for `dataset`."""
  a = parse_arg(arg, tiny=False, fast=False, objective="glare", levels="all",
                patch_aug="blur_random", regions="attention6")
  c = mlc.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0
  c.objective = a.objective       # 'glare', 'udi', 'flsl', 'dino'

  c.dataset = dataset             # TFDS builder name
  c.data_dir = "~/tensorflow_datasets"
  c.train_split = "train"
  c.train_fraction = 1.0          # 0.1 / 0.2 / 0.5 / 1.0 of the train split (appendix C.3)
  c.train_fraction_seed = 0       # picks the subset (nested: 10% inside 20% ...)
  c.num_epochs = 100
  c.batch_size = 512              # global batch; independent of the device count
  c.num_workers = 8               # grain worker processes per host
  c.prefetch = 2
  # 'device': decode each training image once and keep the uint8 sources on the
  # accelerators (each device holds its process's shard, glare_jax/data/device_cache.py);
  # the host then sends only record indices and views. Needs crops.augment_on='device';
  # LoveDA's 2522 tiles take 2.0 GB per device at crops.device_image_size=512.
  c.data_cache = "none"

  c.model = model_config("S")
  c.head = head_config()
  c.cross_attention = mlc.ConfigDict(dict(
      num_heads=6,
      # 'udi': UDI's trained module (norm1, qkv, proj, residual, post-norm; converts from
      # its checkpoints); 'paper': eq. 5 as written, the qkv projection only.
      form="udi",
  ))
  c.crops = crops_config()
  c.loss = loss_config()
  c.glare = glare_config()
  c.udi = udi_config()
  c.flsl = flsl_config()
  c.optim = optim_config()
  c.probe = probe_config()

  c.init_checkpoint = ""          # a converted checkpoint (python -m glare_jax.convert)
  # Parts taken from init_checkpoint when it has them (glare_jax/models/load.py). UDI's
  # head has K = 65536, ours 8192, so by default only the backbone is loaded (UDI's
  # own load_pretrained_weights does the same); add 'head' / 'cross_attention' to reuse them.
  c.init_parts = ("backbone",)
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  c.tensorboard = True

  c.mesh = mlc.ConfigDict(dict(
      data=-1,                    # -1: every device on the data axis
      fsdp=1,
      fsdp_rules=(),              # (regex, axis) pairs for sharding parameters over 'fsdp'
  ))
  c.distributed = mlc.ConfigDict(dict(
      coordinator_address="",     # 'host:port'; 'auto' = JAX's cluster detection; '' = SLURM
                                  # (several tasks) or TPU pod detected, else single process
      num_processes=1,
      process_id=0,
  ))

  apply_ablations(c, levels=a.levels, patch_aug=a.patch_aug, regions=a.regions)
  if a.tiny:
    apply_tiny(c)
  if a.fast:
    apply_fast(c)
  return c


def apply_ablations(c: mlc.ConfigDict, *, levels: str = "all",
                    patch_aug: str = "blur_random", regions: str = "attention6") -> None:
  """Set the GLARE fields of one row of Tables 5, 6 and 8 (see LEVELS, PATCH_AUGS,
  REGION_SAMPLINGS); the defaults are the paper's main setting."""
  for name, value, table in (("levels", levels, LEVELS), ("patch_aug", patch_aug, PATCH_AUGS),
                             ("regions", regions, REGION_SAMPLINGS)):
    if value not in table:
      raise ValueError(f"unknown {name}={value!r}; known: {sorted(table)}")
  g = c.glare
  g.w_glob, g.w_reg, g.w_loc1, g.w_loc2 = LEVELS[levels]
  g.patch_aug.kind, g.patch_aug.placement = PATCH_AUGS[patch_aug]
  c.model.use_mask_token = g.patch_aug.kind == "mask"
  g.regions.sampling, g.regions.num_regions = REGION_SAMPLINGS[regions]


def apply_fast(c: mlc.ConfigDict) -> None:
  """Every speed switch of BENCHMARKS.md (`configs/loveda.py:fast`): the same
  objective and augmentation, computed faster. bf16 compute (fp32 parameters,
  residual stream, softmaxes, logits and losses), fused attention, scanned and
  rematerialised blocks, the head and losses in chunks of 32 images, augmentation
  on the device from sources decoded once into device memory, their resampling
  on the matrix units."""
  c.model.dtype = "bfloat16"
  c.model.attention = "auto"
  c.model.scan_blocks = True
  c.model.remat = True
  c.model.remat_policy = "nothing_saveable"   # batch 512 in 80 GB (BENCHMARKS.md)
  c.crops.augment_on = "device"
  c.crops.device_resample = "bfloat16"
  c.data_cache = "device"
  c.glare.head_chunk_size = 32


def apply_tiny_model(model: mlc.ConfigDict) -> None:
  """The tiny ViT of every `:tiny` config and of the demos (depth 2, width 64,
  adapters of 16): one definition, so a demo pre-training run fine-tunes."""
  model.variant = "tiny_test"
  model.drop_path = 0.0
  model.adapter_dim = 16


def apply_tiny(c: mlc.ConfigDict) -> None:
  """A minutes-long smoke run of the same pipeline on 2 CPU cores."""
  apply_tiny_model(c.model)
  c.cross_attention.num_heads = 2
  if c.glare.regions.sampling == "attention":
    c.glare.regions.num_regions = 2  # one region per head of the tiny ViT
  c.udi.num_heads = 2
  c.head.out_dim = 256
  c.head.hidden_dim = 128
  c.head.bottleneck_dim = 32
  c.crops.global_size = 64
  c.crops.local_size = 32
  c.crops.num_local = 4
  c.model.pos_grid = 4
  c.batch_size = 8
  c.num_epochs = 2
  c.num_workers = 0
  c.loss.warmup_teacher_temp_epochs = 1
  c.checkpoint_every_steps = 5
  c.log_every_steps = 1
  c.probe.every_epochs = 0          # off in smoke runs; --config.probe.every_epochs=1 tries it
  c.probe.image_size = 64
  c.probe.max_train_images = 16
  c.probe.max_val_images = 16
  c.probe.batch_size = 8
