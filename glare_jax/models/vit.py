"""Vision Transformer in the UDI architecture, with bottleneck adapters.

Layout of the parameter tree mirrors the PyTorch state dicts of UDI / DINO /
iBOT / FLSL (see `glare_jax/convert.py`):

  patch_embed/{kernel [p, p, 3, D], bias [D]}
  cls_token [1, P, D]               (absent when P == 0)
  pos_embed [1, P + g0*g0, D]       (g0 = pretraining grid, 14 for 224 px)
  mask_token [D]                    (only with `use_mask_token`)
  block_{i}/norm1, attn/{qkv, proj}, adapter/{down, up[, norm]}, norm2, mlp/{fc1, fc2}
  norm

`ViT.__call__` returns `(tokens, aux)`: `tokens` [B, P + h*w, D] after the final
LayerNorm, and `aux` with the per-block outputs (before the final norm), the
last block's softmax attention [B, heads, T, T], the patch grid and P.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# ViT sizes: name -> (width, depth, heads, mlp_dim).
SIZES = {
    "tiny_test": (64, 2, 2, 128),  # for unit tests
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}

LN_EPS = 1e-6
trunc_normal = nn.initializers.truncated_normal(0.02)


def size_kwargs(variant: str) -> dict[str, int]:
  """`'S'` -> dict(width=384, depth=12, num_heads=6, mlp_dim=1536)."""
  width, depth, heads, mlp = SIZES[variant]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp)


def resize_pos_grid(grid: Array, out_hw: tuple[int, int], mode: str) -> Array:
  """Bicubic resampling of a position table with PyTorch semantics.

  Args:
    grid: [g0, g0, D] patch rows of the position table.
    out_hw: target grid (h, w).
    mode: 'size' = torch `interpolate(size=(h, w), mode='bicubic',
      align_corners=False)`; 'dino' = DINO's `interpolate(scale_factor=
      ((h + 0.1) / g0, (w + 0.1) / g0), mode='bicubic')`, whose sampling
      positions differ slightly from the by-size mode.
  Returns:
    [h, w, D] in float32.
  """
  g0h, g0w, d = grid.shape
  h, w = out_hw
  grid = grid.astype(jnp.float32)
  if (h, w) == (g0h, g0w):
    return grid
  if mode == "size":
    return jax.image.resize(grid, (h, w, d), method="bicubic-pytorch",
                            antialias=False)
  if mode == "dino":
    scale = jnp.array([(h + 0.1) / g0h, (w + 0.1) / g0w], jnp.float32)
    return jax.image.scale_and_translate(
        grid, (h, w, d), spatial_dims=(0, 1), scale=scale,
        translation=jnp.zeros(2, jnp.float32), method="bicubic-pytorch",
        antialias=False)
  raise ValueError(f"unknown pos-embed resize mode {mode!r} (use 'size' or 'dino')")


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D]
    d = x.shape[-1]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=trunc_normal, name=name)
    x = dense(self.mlp_dim, "fc1")(x)
    x = nn.gelu(x, approximate=False)
    return dense(d, "fc2")(x)


ATTENTION_IMPLS = ("explicit", "xla", "cudnn", "auto")


class Attention(nn.Module):
  """Multi-head self-attention.

  impl: 'explicit' computes softmax(q k^T / sqrt(hd)) itself and also returns those
  probabilities [B, H, T, T]; 'xla' / 'cudnn' call `jax.nn.dot_product_attention`
  with that implementation (cuDNN's fused flash attention needs a GPU and bf16/fp16)
  and return None for the probabilities, which they never materialise; 'auto' is
  'cudnn' on a GPU with a 16-bit dtype where cuDNN takes the shapes (JAX checks
  them while tracing), else 'xla'.
  """
  num_heads: int
  dtype: Any = jnp.float32
  impl: str = "explicit"

  @nn.compact
  def __call__(self, x):  # x: [B, T, D]
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention implementation {self.impl!r}: use one of {ATTENTION_IMPLS}")
    b, t, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=trunc_normal, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, hd)  # rows [q; k; v], head-major
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
    if self.impl == "explicit":
      logits = jnp.einsum("bqhc,bkhc->bhqk", q * (hd ** -0.5), k)
      attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, H, T, T]
      out = jnp.einsum("bhqk,bkhc->bqhc", attn.astype(self.dtype), v)
    else:
      attn = None
      out = _fused_attention(q, k, v, hd ** -0.5, self.impl, self.dtype)
    out = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(
        out.reshape(b, t, d))
    return out, attn


def _fused_attention(q, k, v, scale: float, impl: str, dtype: Any):
  """jax.nn.dot_product_attention of [B, T, H, hd] q, k, v with `impl`; 'auto'
  tries cuDNN (GPU, 16-bit dtype) and falls back to XLA when cuDNN refuses the
  call while tracing (an unsupported shape, no cuDNN found)."""
  if impl == "auto":
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if half and jax.default_backend() == "gpu":
      try:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
      except (NotImplementedError, RuntimeError) as e:
        logging.log_first_n(logging.WARNING, "model.attention='auto': cuDNN refused %d "
                            "tokens x %d heads of %d (%s); using XLA's attention", 4,
                            q.shape[1], q.shape[2], q.shape[3], e)
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


class Adapter(nn.Module):
  """Bottleneck adapter: delta(y) = s * W_up(ReLU(W_down(y))), W_up zero-initialised.

  Returns only the delta: the sequential form adds it to the attention output
  (paper eq. 3), the parallel form adds it beside the MLP. `with_norm` puts a
  LayerNorm before W_down (the published UniAdapter code).
  """
  dim: int = 64
  scale: float = 0.1
  with_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y):  # [B, T, D]
    d = y.shape[-1]
    if self.with_norm:
      y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(y)
    h = nn.Dense(self.dim, dtype=self.dtype, kernel_init=trunc_normal, name="down")(y)
    h = nn.relu(h)
    h = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, name="up")(h)
    return self.scale * h


def drop_path(x: Array, key: Array, rate) -> Array:
  """Per-sample stochastic depth, DINO's drop_path: each sample of x [B, ...] is
  zeroed with probability `rate`, else scaled by 1 / (1 - rate). `rate` may be a
  traced scalar (scanned blocks each have their own)."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class Block(nn.Module):
  """Pre-norm transformer block with an optional adapter.

  adapter_mode:
    'none'       x = x + Attn(LN1 x);              x = x + MLP(LN2 x)
    'sequential' y = Attn(LN1 x); x = x + y + A(y); x = x + MLP(LN2 x)   (paper eq. 3)
    'parallel'   x = x + Attn(LN1 x); x = x + MLP(LN2 x) + A(LN x)       (UniAdapter)

  The residual stream keeps the dtype of `x` (float32 in the ViT); the branches
  compute in `dtype`.
  """
  num_heads: int
  mlp_dim: int
  adapter_mode: str = "sequential"
  adapter_dim: int = 64
  adapter_scale: float = 0.1
  dtype: Any = jnp.float32
  attention: str = "explicit"   # see Attention.impl

  @nn.compact
  def __call__(self, x, drop_key: Array | None = None, drop_rate=0.0):
    """x: [B, T, D] -> (x, attention probabilities [B, H, T, T] or None).

    With `drop_key` (training) each branch is dropped per sample with
    probability `drop_rate` (stochastic depth); without it the block is deterministic.
    """
    keys = (None, None) if drop_key is None else jax.random.split(drop_key)
    drop = lambda z, k: z if k is None else drop_path(z, k, drop_rate)
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)
    y, attn = Attention(self.num_heads, dtype=self.dtype, impl=self.attention,
                        name="attn")(ln("norm1")(x))
    adapter = None
    if self.adapter_mode != "none":
      adapter = Adapter(self.adapter_dim, self.adapter_scale,
                        with_norm=self.adapter_mode == "parallel", dtype=self.dtype,
                        name="adapter")
    if self.adapter_mode == "sequential":
      y = y + adapter(y)
    elif self.adapter_mode not in ("none", "parallel"):
      raise ValueError(f"unknown adapter_mode {self.adapter_mode!r}")
    x = x + drop(y, keys[0])
    z = Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(ln("norm2")(x))
    if self.adapter_mode == "parallel":
      z = z + adapter(x)
    x = x + drop(z, keys[1])
    return x, attn


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


class ViT(nn.Module):
  """UDI-style ViT: conv patch embedding, P prefix tokens, learned positions.

  Attributes:
    num_prefix: prefix tokens ([CLS], [CLS+]): 2 for UDI, 1 for DINO/iBOT, 0 for FLSL.
    pos_grid: side of the stored position grid (14 for 224 px / 16).
    pos_resize: 'dino' or 'size' (see `resize_pos_grid`).
    drop_path: maximum stochastic-depth rate (linear over depth).
    use_mask_token: learn a [MASK] embedding that replaces masked patches (iBOT-style).
    dtype: compute dtype of the layers; parameters, the residual stream, LayerNorm
      statistics and softmaxes stay float32.
    attention: implementation of every block but the last ('explicit', 'xla',
      'cudnn'; see `Attention`). The last block always runs 'explicit': its
      probabilities are returned in `aux['attn']`.
    scan_blocks: run blocks 0 .. depth-2 as one `jax.lax.scan` (one compiled body
      instead of depth - 1 copies). The parameters stay `block_{i}`: they are
      stacked for the scan inside the forward pass. Same outputs as unrolled.
    remat: recompute each block's activations in the backward pass, keeping what
      `remat_policy` (a `jax.checkpoint_policies` name) saves.
  """
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  num_prefix: int = 2
  pos_grid: int = 14
  pos_resize: str = "dino"
  drop_path: float = 0.0
  adapter_mode: str = "sequential"
  adapter_dim: int = 64
  adapter_scale: float = 0.1
  use_mask_token: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_blocks: bool = False
  attention: str = "explicit"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               patch_mask: Array | None = None) -> tuple[Array, dict[str, Any]]:
    """images: [B, H, W, 3] normalised; patch_mask: [B, h*w] bool, only with a mask token."""
    b = images.shape[0]
    d, p = self.width, self.num_prefix
    x = nn.Conv(d, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="patch_embed")(images.astype(self.dtype))
    _, h, w, _ = x.shape
    x = x.reshape(b, h * w, d).astype(jnp.float32)  # [B, N, D], row-major (h, then w)

    if self.use_mask_token:
      mask_token = self.param("mask_token", nn.initializers.zeros, (d,))
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)
    elif patch_mask is not None:
      raise ValueError("patch_mask given but the model has no mask token (use_mask_token=False)")

    g0 = self.pos_grid
    pos = self.param("pos_embed", trunc_normal, (1, p + g0 * g0, d))
    pos_patch = resize_pos_grid(pos[0, p:].reshape(g0, g0, d), (h, w), self.pos_resize)
    x = x + pos_patch.reshape(1, h * w, d).astype(x.dtype)
    if p:
      cls = self.param("cls_token", trunc_normal, (1, p, d))
      prefix = (cls + pos[:, :p]).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b, p, d)), x], axis=1)

    blocks, attn = self._blocks(x, train)
    tokens = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(blocks[-1])
    aux = dict(blocks=blocks, attn=attn, grid=(h, w), num_prefix=p)
    return tokens, aux

  def _blocks(self, x: Array, train: bool) -> tuple[tuple[Array, ...], Array]:
    """The depth blocks on x [B, T, D] -> (each block's output, last block's attention)."""
    depth = self.depth
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r}: use one of {REMAT_POLICIES}")
    policy = getattr(jax.checkpoint_policies, self.remat_policy)
    rates = [self.drop_path * i / max(depth - 1, 1) for i in range(depth)]
    keys = None  # [depth] per-block stochastic-depth keys, the same scanned or unrolled
    if train and self.drop_path > 0:
      root = self.make_rng("dropout")
      keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(depth))
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, adapter_mode=self.adapter_mode,
              adapter_dim=self.adapter_dim, adapter_scale=self.adapter_scale, dtype=self.dtype)

    blocks = []
    num_scanned = depth - 1 if self.scan_blocks and not self.is_initializing() else 0
    if num_scanned > 0:
      params = self.variables["params"]
      stacked = jax.tree.map(lambda *a: jnp.stack(a),
                             *(params[f"block_{i}"] for i in range(num_scanned)))
      block = Block(**kw, attention=self.attention, parent=None)

      def body(x, inputs):
        p, key, rate = inputs
        x, _ = block.apply({"params": p}, x, key, rate)
        return x, x

      if self.remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      xs = (stacked, None if keys is None else keys[:num_scanned],
            jnp.asarray(rates[:num_scanned], jnp.float32))
      x, outs = jax.lax.scan(body, x, xs)  # outs [depth - 1, B, T, D]
      blocks.extend(outs[i] for i in range(num_scanned))

    block_cls = nn.remat(Block, policy=policy) if self.remat else Block
    attn = None
    for i in range(num_scanned, depth):
      impl = "explicit" if i == depth - 1 else self.attention
      x, attn = block_cls(**kw, attention=impl, name=f"block_{i}")(
          x, None if keys is None else keys[i], rates[i])
      blocks.append(x)
    return tuple(blocks), attn


def cls_patch_attention(attn: Array, num_prefix: int) -> Array:
  """[B, H, T, T] -> [B, H, h*w]: the [CLS] query's attention over patch tokens."""
  return attn[:, :, 0, num_prefix:]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a converted checkpoint records about its model (`model.json` beside it).

  The sizes are read from the checkpoint's shapes; `variant` names the matching
  entry of `SIZES` ('custom' when none matches, then width/depth/heads/mlp_dim
  carry the architecture).
  """
  variant: str = "S"
  patch_size: int = 16
  num_prefix: int = 2
  pos_grid: int = 14
  head_dim_out: int | None = None  # K of the projection head, if the file has one
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  mask_token: bool = False         # the file has a [MASK] embedding (iBOT)
  head: dict[str, int] | None = None             # hidden_dim, bottleneck_dim, num_layers, out_dim
  cross_attention: dict[str, int] | None = None  # num_heads
  source_format: str = ""          # 'udi', 'dino', 'ibot' or 'flsl'
  which: str = ""                  # 'teacher', 'student' or '' (backbone-only file)

  def vit_kwargs(self) -> dict[str, Any]:
    return dict(patch_size=self.patch_size, num_prefix=self.num_prefix,
                pos_grid=self.pos_grid, width=self.width, depth=self.depth,
                num_heads=self.num_heads, mlp_dim=self.mlp_dim)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model.json has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**d)


def grid_side(image_size: int, patch_size: int = 16) -> int:
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
  return image_size // patch_size


def param_count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


__all__: Sequence[str] = (
    "ViT", "Block", "Attention", "Adapter", "Mlp", "resize_pos_grid", "drop_path",
    "ATTENTION_IMPLS", "REMAT_POLICIES",
    "cls_patch_attention", "size_kwargs", "ModelSpec", "SIZES", "grid_side",
    "param_count")
