"""A random UDI training checkpoint, for smoke runs of the conversion path.

    from glare_jax.testing import write_udi_checkpoint
    write_udi_checkpoint("udi_random.pth")               # tiny_test sizes, 4x4 grid
    # python -m glare_jax.convert --src udi_random.pth --out ckpt/udi_random

The file has the layout of UDI's `checkpoint.pth` (docs/parity.md, "Converting a PyTorch checkpoint"): `student` and
`teacher` networks (the ViT under `backbone.backbone.`, UDI's cross-attention
`backbone.attn.*` + `backbone.norm1.*`, the shared head stored three times as
`head.{0,1,2}.*`, the student's keys under `module.`), plus the `optimizer`,
`epoch`, `args`, `udi_loss` and `fp16_scaler` entries a real one carries. The
weights are random (seeded); the query/key weights are scaled up so that the
last block's attention is peaked rather than uniform, which makes attention maps
and attention-aware regions of such a checkpoint worth looking at.

Writing the file needs PyTorch (`pip install 'glare-jax[convert]'`).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from glare_jax.models.vit import SIZES

UDI_NUM_PREFIX = 2   # [CLS] and [CLS+]


def _vit_shapes(width: int, depth: int, mlp: int, patch: int, grid: int) -> dict[str, tuple]:
  """torch key -> shape of a UDI ViT state dict (timm names)."""
  s = {"cls_token": (1, UDI_NUM_PREFIX, width),
       "pos_embed": (1, UDI_NUM_PREFIX + grid * grid, width),
       "patch_embed.proj.weight": (width, 3, patch, patch),
       "patch_embed.proj.bias": (width,),
       "norm.weight": (width,), "norm.bias": (width,)}
  for i in range(depth):
    b = f"blocks.{i}."
    s.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,),
              b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
              b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
              b + "norm2.weight": (width,), b + "norm2.bias": (width,),
              b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,),
              b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,)})
  return s


def _cross_attention_shapes(width: int) -> dict[str, tuple]:
  return {"norm1.weight": (width,), "norm1.bias": (width,),
          "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
          "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
          "attn.norm.weight": (width,), "attn.norm.bias": (width,)}


def _head_shapes(width: int, hidden: int, bottleneck: int, out_dim: int) -> dict[str, tuple]:
  """DINO head: Linear, GELU, Linear, GELU, Linear (mlp.0/2/4), weight-normed last layer."""
  dims = (width, hidden, hidden, bottleneck)
  s = {}
  for j in range(3):
    s[f"mlp.{2 * j}.weight"] = (dims[j + 1], dims[j])
    s[f"mlp.{2 * j}.bias"] = (dims[j + 1],)
  s["last_layer.weight_g"] = (out_dim, 1)
  s["last_layer.weight_v"] = (out_dim, bottleneck)
  return s


def _random(shapes: dict[str, tuple], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Norm scales 1 + N(0, 0.1), biases N(0, 0.1), tokens N(0, 0.5), matrices
  uniform with std 1/sqrt(fan_in); qkv 2x that, for peaked attention."""
  out = {}
  for name, shape in shapes.items():
    if name.endswith("weight_g") or (len(shape) == 1 and "norm" in name
                                      and name.endswith("weight")):
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
      v = 0.1 * rng.standard_normal(shape)
    elif name in ("cls_token", "pos_embed"):
      v = 0.5 * rng.standard_normal(shape)
    else:
      bound = np.sqrt(3.0 / np.prod(shape[1:])) * (2.0 if "qkv" in name else 1.0)
      v = rng.uniform(-bound, bound, shape)
    out[name] = v.astype(np.float32)
  return out


def udi_state_dicts(*, variant: str = "tiny_test", patch_size: int = 16, pos_grid: int = 4,
                    out_dim: int = 256, hidden_dim: int = 128, bottleneck_dim: int = 32,
                    seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """{'teacher', 'student'}: flat NumPy state dicts in UDI's key layout (the
  student's keys without DDP's 'module.'). Sizes as `glare_jax.models.vit.SIZES`."""
  if variant not in SIZES:
    raise ValueError(f"unknown variant {variant!r}; known: {sorted(SIZES)}")
  width, depth, _, mlp = SIZES[variant]
  rng = np.random.default_rng(seed)
  nets = {}
  for name in ("teacher", "student"):
    sd = {f"backbone.backbone.{k}": v for k, v in _random(
        _vit_shapes(width, depth, mlp, patch_size, pos_grid), rng).items()}
    sd.update({f"backbone.{k}": v for k, v in _random(_cross_attention_shapes(width),
                                                       rng).items()})
    head = _random(_head_shapes(width, hidden_dim, bottleneck_dim, out_dim), rng)
    for i in range(3):  # UDI's one head, stored once per loss level
      sd.update({f"head.{i}.{k}": v for k, v in head.items()})
    nets[name] = sd
  return nets


def write_udi_checkpoint(path: str | os.PathLike, **sizes) -> pathlib.Path:
  """Writes a random UDI training checkpoint (`udi_state_dicts(**sizes)`) with torch.save."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("writing a .pth file needs PyTorch: pip install 'glare-jax[convert]'") from e
  nets = udi_state_dicts(**sizes)
  as_torch = lambda sd, prefix="": {prefix + k: torch.from_numpy(v) for k, v in sd.items()}
  out_dim = nets["teacher"]["head.0.last_layer.weight_v"].shape[0]
  ckpt = dict(
      teacher=as_torch(nets["teacher"]),
      student=as_torch(nets["student"], "module."),
      optimizer={"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04,
                                                "params": []}]},
      epoch=0,
      args=argparse.Namespace(arch="vit_" + sizes.get("variant", "tiny_test"),
                              out_dim=out_dim, norm_last_layer=True),
      udi_loss={"center": torch.zeros(3, out_dim)},
      fp16_scaler=None)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(ckpt, path)
  return path
