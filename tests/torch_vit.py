"""An independent PyTorch version of the UDI ViT, DINO head and UDI cross-attention,
and writers for every checkpoint layout the converter reads (test helper).

Written from the architecture description (paper section 3, eq. 3; docs/parity.md),
not from glare_jax, so the parity tests compare two implementations.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# One thread: the reference runs at batch 1-2, where worker threads only burn CPU
# (and the test suite runs under pytest-xdist on two cores).
torch.set_num_threads(1)


class Block(nn.Module):
  def __init__(self, d, heads, mlp):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(d, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(d, 3 * d)
    self.attn.proj = nn.Linear(d, d)
    self.norm2 = nn.LayerNorm(d, eps=1e-6)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(d, mlp)
    self.mlp.fc2 = nn.Linear(mlp, d)

  def forward(self, x):
    b, t, d = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, hd] each
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(b, t, d)
    x = x + self.attn.proj(y)
    x = x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
    return x, attn


class ViT(nn.Module):
  """Tokens after the final norm and the last block's attention; NCHW input."""

  def __init__(self, d=384, depth=12, heads=6, mlp=1536, patch=16, num_prefix=2, grid=14,
               unused_cls=False):
    super().__init__()
    self.patch, self.num_prefix, self.grid = patch, num_prefix, grid
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, d, patch, stride=patch)
    if num_prefix or unused_cls:  # FLSL keeps a cls_token it never uses
      self.cls_token = nn.Parameter(torch.zeros(1, max(num_prefix, 1), d))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + grid * grid, d))
    self.blocks = nn.ModuleList([Block(d, heads, mlp) for _ in range(depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)

  def pos_for(self, h, w, mode):
    p, g = self.num_prefix, self.grid
    prefix, grid = self.pos_embed[:, :p], self.pos_embed[:, p:]
    if (h, w) != (g, g):
      grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
      if mode == "dino":
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                             align_corners=False)
      else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
      assert grid.shape[-2:] == (h, w)
      grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return prefix, grid

  def forward(self, images, mode="dino"):
    x = self.patch_embed.proj(images)  # [B, D, h, w]
    b, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    prefix_pos, grid_pos = self.pos_for(h, w, mode)
    x = x + grid_pos
    if self.num_prefix:
      x = torch.cat([(self.cls_token + prefix_pos).expand(b, -1, -1), x], dim=1)
    for blk in self.blocks:
      x, attn = blk(x)
    return self.norm(x), attn


class Head(nn.Module):
  """DINO head: Linear, GELU, Linear, GELU, Linear, L2-normalise, weight-normed Linear."""

  def __init__(self, d, k, hidden=2048, bottleneck=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                             nn.GELU(), nn.Linear(hidden, bottleneck))
    with warnings.catch_warnings():  # the classic API: it names the keys weight_g / weight_v
      warnings.simplefilter("ignore", FutureWarning)
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, k, bias=False))

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class UDICrossAttention(nn.Module):
  """UDI's wrapper norm1 + MaskedAttention (qkv, proj, post-norm, skip connection).
  Queries: `rows` picks rows of the normed tokens (one-hot maps), or a float map
  [Q, N] multiplies the projected queries and the normed tokens of the skip
  connection, as UDI applies its bilinear maps."""

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(d, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(d, 3 * d)
    self.attn.proj = nn.Linear(d, d)
    self.attn.norm = nn.LayerNorm(d, eps=1e-6)

  def forward(self, x, rows):
    b, n, d = x.shape
    h = self.heads
    xn = self.norm1(x)
    q, k, v = self.attn.qkv(xn).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    if isinstance(rows, torch.Tensor):
      q, skip = rows @ q, rows @ xn      # [B, H, Q, hd], [B, Q, D]
    else:
      q, skip = q[:, :, rows], xn[:, rows]
    attn = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
    out = self.attn.proj((attn @ v).transpose(1, 2).reshape(b, q.shape[2], d))
    return self.attn.norm(out + skip)


def randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random weights of a scale that makes attention peaky (not the near-uniform init):
  matrices uniform with std 1/sqrt(fan_in) (qkv 1.5 times that), norms 1 + N(0, 0.1),
  biases N(0, 0.1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight_g"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith(("cls_token", "pos_embed")):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        bound = math.sqrt(3.0 / math.prod(p.shape[1:]))
        if "qkv" in name:
          bound *= 1.5  # sharper attention than plain 1/sqrt(fan_in)
        p.copy_((2 * torch.rand(p.shape, generator=g) - 1) * bound)
  return module


def sincos_table(d: int, g: int) -> torch.Tensor:
  """A fixed 2-D sin-cos position table [1, g*g, d] like FLSL's (rows first)."""
  pos = np.arange(g, dtype=np.float64)
  omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
  rows, cols = np.meshgrid(pos, pos, indexing="ij")
  parts = []
  for axis in (rows.reshape(-1), cols.reshape(-1)):
    out = np.einsum("m,k->mk", axis, omega)
    parts += [np.sin(out), np.cos(out)]
  return torch.tensor(np.concatenate(parts, axis=1), dtype=torch.float32)[None]


def _prefixed(sd, prefix):
  return {prefix + k: v.clone() for k, v in sd.items()}


def _training_extras(out_dim):
  return dict(
      optimizer={"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0.04,
                                                "params": [0, 1]}]},
      epoch=100,
      args=argparse.Namespace(arch="vit_small", out_dim=out_dim, lr=5e-4,
                              local_crops_scale=(0.05, 0.4), norm_last_layer=True),
      fp16_scaler={"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 17})


def udi_full(teacher, student, head_t, head_s, ca_t, ca_s):
  """UDI training checkpoint: ViT under backbone.backbone., CA, head.0/1/2, module.(student)."""
  def net(vit, head, ca, prefix):
    sd = _prefixed(vit.state_dict(), prefix + "backbone.backbone.")
    sd.update(_prefixed(ca.state_dict(), prefix + "backbone."))
    for i in range(3):
      sd.update(_prefixed(head.state_dict(), f"{prefix}head.{i}."))
    return sd
  out_dim = head_t.last_layer.weight_v.shape[0]
  return dict(student=net(student, head_s, ca_s, "module."), teacher=net(teacher, head_t, ca_t, ""),
              udi_loss={"center": torch.zeros(3, out_dim)}, **_training_extras(out_dim))


def flsl_full(teacher, student, head_t, head_s):
  def net(vit, head, prefix):
    sd = _prefixed(vit.state_dict(), prefix + "backbone.")
    sd.update(_prefixed(head.state_dict(), prefix + "head."))
    return sd
  out_dim = head_t.last_layer.weight_v.shape[0]
  return dict(student=net(student, head_s, "module."), teacher=net(teacher, head_t, ""),
              flsl_loss={"center": torch.zeros(1, out_dim)}, **_training_extras(out_dim))


def flat(vit):
  return {k: v.clone() for k, v in vit.state_dict().items()}


def ibot(vit, masked_embed):
  return {"state_dict": dict(flat(vit), masked_embed=masked_embed.clone())}


# ---------------------------------------------------------------------------
# Random networks in every layout, and the converter run on them.

S = dict(d=384, depth=12, heads=6, mlp=1536)
TINY = dict(d=64, depth=2, heads=2, mlp=128, grid=4)
HEAD = dict(k=1024, hidden=512, bottleneck=128)  # head sizes are read from the shapes

# layout -> (prefix tokens, expected format, training checkpoint?)
LAYOUTS = {
    "udi_full": (2, "udi", True),
    "udi_backbone": (2, "udi", False),
    "dino": (1, "dino", False),
    "ibot": (1, "ibot", False),
    "flsl": (0, "flsl", True),
}


def make_layout(layout, size=S, grid=14, seed=0, same_student=False, head=HEAD):
  """Random torch networks saved in `layout`; returns (file dict, teacher modules).
  The student of a training checkpoint differs from the teacher unless `same_student`."""
  p, _, _ = LAYOUTS[layout]
  kw = dict(d=size["d"], depth=size["depth"], heads=size["heads"], mlp=size["mlp"])

  def vit(s):
    return randomize(ViT(**kw, num_prefix=p, grid=grid, unused_cls=layout == "flsl"), s)

  teacher = vit(seed)
  if layout == "flsl":
    with torch.no_grad():
      teacher.pos_embed.copy_(sincos_table(size["d"], grid))
  mods = dict(vit=teacher)
  student = teacher if same_student else None
  if layout == "udi_full":
    student = student or vit(seed + 1)
    mods["head"] = randomize(Head(size["d"], **head), seed + 2)
    mods["ca"] = randomize(UDICrossAttention(size["d"], size["heads"]), seed + 3)
    head_s = randomize(Head(size["d"], **head), seed + 4)
    ca_s = randomize(UDICrossAttention(size["d"], size["heads"]), seed + 5)
    return udi_full(teacher, student, mods["head"], head_s, mods["ca"], ca_s), mods
  if layout == "flsl":
    mods["head"] = randomize(Head(size["d"], **head), seed + 2)
    head_s = randomize(Head(size["d"], **head), seed + 4)
    return flsl_full(teacher, student or vit(seed + 1), mods["head"], head_s), mods
  if layout == "ibot":
    mods["masked_embed"] = torch.randn(1, size["d"])
    return ibot(teacher, mods["masked_embed"]), mods
  return flat(teacher), mods


def torch_forward(vit, images, mode="dino"):
  """NHWC NumPy images -> (tokens, attn) NumPy from the torch ViT."""
  with torch.no_grad():
    tokens, attn = vit(torch.from_numpy(images).permute(0, 3, 1, 2), mode)
  return tokens.numpy(), attn.numpy()


def convert_file(tmp_path: pathlib.Path, ckpt, *extra, name="ckpt"):
  """Saves `ckpt`, runs the converter CLI on it; returns load_converted's (params, spec)."""
  from glare_jax import convert
  from glare_jax.models import load
  src, out = tmp_path / f"{name}.pth", tmp_path / name
  torch.save(ckpt, src)
  assert convert.main(["--src", str(src), "--out", str(out), *extra]) == 0
  return load.load_converted(out)
