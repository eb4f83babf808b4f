"""Projection head (shared by all GLARE levels) and the cross-attention module.

Parameter names follow the PyTorch checkpoints so that the converter is a
renaming: head `layers_{0,1,2}` (DINO's `mlp.{0,2,4}`), `weight_v`, `weight_g`
(`last_layer.weight_{v,g}`); cross-attention `qkv`, `proj`, `norm` (UDI's
`attn.{qkv, proj, norm}`) and `norm1`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glare_jax.models.vit import LN_EPS, trunc_normal

Array = jax.Array
FORMS = ("udi", "paper")


class ProjectionHead(nn.Module):
  """MLP (D -> hidden -> hidden -> bottleneck), L2-normalise, weight-normalised
  linear bottleneck -> K without bias (DINO head).

  The weight-normalised layer keeps `weight_v` [bottleneck, K] and `weight_g` [K]:
  W[:, k] = g_k * v[:, k] / ||v[:, k]||. With `norm_last_layer` (DINO's default)
  g is fixed at 1 by the parameter rules, not here.
  """
  out_dim: int = 8192
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [..., D] -> [..., K]
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=trunc_normal,
                   name=f"layers_{i}")(x)
      x = nn.gelu(x, approximate=False)
    x = nn.Dense(self.bottleneck_dim, dtype=self.dtype, kernel_init=trunc_normal,
                 name=f"layers_{self.num_layers - 1}")(x)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("weight_v", trunc_normal, (self.bottleneck_dim, self.out_dim))
    g = self.param("weight_g", nn.initializers.ones, (self.out_dim,))
    kernel = v * (g / jnp.linalg.norm(v, axis=0))[None, :]
    # Logits leave in float32 even under bf16 compute: the teacher divides them by
    # T_t = 0.04, which would magnify bf16's output rounding (2^-9) 25-fold.
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)


class CrossAttention(nn.Module):
  """Multi-head cross-attention in the shape of UDI's trained module.

    q' = LN1(q)  or  q' = q_map @ LN1(kv),   kv' = LN1(kv)
    out = LN(q' + proj(MHA(W_q q', W_k kv', W_v kv')))

  A shared pre-LayerNorm `norm1`, one `qkv` projection (its query third applied
  to the queries, its key and value thirds to the context), a residual from the
  normalised queries and a post-LayerNorm `norm`: UDI's `MaskedAttention` with
  its skip connection (its `attn.{qkv, proj, norm}`, plus the wrapper's
  `norm1`), so a UDI checkpoint's module converts by renaming. Queries are
  tokens `q` [B, Q, D], or a map `q_map` [B, Q, S] mixing the normalised context
  tokens (UDI's maps: bilinear rows for positions between patches; the mix
  comes after `norm1`, as UDI multiplies its map into the normalised tokens).
  `kv_mask` marks valid context tokens, either for all queries ([B, S]) or per
  query ([B, Q, S], e.g. a different region R' for each group of queries).

  `form='paper'` is eq. 5 as written, out = (W_v Z) softmax(tau (W_k Z)^T W_q q)
  per head, with only the `qkv` projection (no norms, residual or output
  projection; docs/DESIGN.md, "Readings of the paper").
  """
  num_heads: int = 6
  dtype: Any = jnp.float32
  form: str = "udi"   # 'udi' (UDI's trained module) or 'paper' (eq. 5)

  @nn.compact
  def __call__(self, q: Array | None, kv: Array, kv_mask: Array | None = None,
               q_map: Array | None = None) -> Array:
    # q: [B, Q, D] or None with q_map [B, Q, S]; kv: [B, S, D]
    if (q is None) == (q_map is None):
      raise ValueError("CrossAttention takes query tokens q or a query map q_map, not both")
    if self.form not in FORMS:
      raise ValueError(f"config.cross_attention.form={self.form!r}: use one of {FORMS}")
    paper = self.form == "paper"
    b, s, d = kv.shape
    hd = d // self.num_heads
    norm1 = (lambda x: x) if paper else nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=trunc_normal, name="qkv")
    kv = norm1(kv)
    if q_map is None:
      q = norm1(q)
    else:   # the bilinear mix in float32 (bf16 weights would not sum to 1)
      q = jnp.einsum("bqs,bsd->bqd", q_map.astype(jnp.float32),
                     kv.astype(jnp.float32)).astype(kv.dtype)
    nq = q.shape[1]
    q_all = qkv(q).reshape(b, nq, 3, self.num_heads, hd)[:, :, 0]  # [B, Q, H, hd]
    kv_all = qkv(kv).reshape(b, s, 3, self.num_heads, hd)
    k, v = kv_all[:, :, 1], kv_all[:, :, 2]  # [B, S, H, hd]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q_all * (hd ** -0.5), k).astype(jnp.float32)
    if kv_mask is not None:
      mask = kv_mask[:, None, None, :] if kv_mask.ndim == 2 else kv_mask[:, None, :, :]
      logits = jnp.where(mask, logits, -1e30)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", attn.astype(self.dtype), v).reshape(b, nq, d)
    if paper:
      return out
    out = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(out)
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(q + out)
