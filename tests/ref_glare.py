"""An independent PyTorch (float64) reference of the whole GLARE objective (test helper).

Written from the paper (eqs. 4-10, sections 4.1-4.3) and docs/DESIGN.md
("Objectives", "Views and boxes"), one image, view and region at a time. It
uses nothing of glare_jax: its own ViT with sequential adapters (eq. 3), DINO
head, UDI-shaped or eq.-5 cross-attention, crop geometry, bilinear targets,
region placement, cell blur, centring and normalisers. Inputs are explicit:
parameter trees as arrays, the batch, the distorted cells and the region
draws (the uniforms the objective drew), so the tests can feed the same
randomness to both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
F64 = torch.float64
LN_EPS = 1e-6


# ---------------------------------------------------------------- parameters

def to_torch(tree: Any, grad: bool = False) -> Any:
  """Nested dict of arrays -> the same of float64 tensors (leaves needing grad)."""
  if isinstance(tree, dict):
    return {k: to_torch(v, grad) for k, v in tree.items()}
  return torch.tensor(np.asarray(tree, np.float64), dtype=F64, requires_grad=grad)


def leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
  """{'a/b/c': tensor} of a nested dict."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(leaves(v, f"{prefix}{k}/"))
    return out
  return {prefix[:-1]: tree}


# ---------------------------------------------------------------- layers

def dense(p, x):
  return x @ p["kernel"] + p["bias"]


def layer_norm(p, x):
  mu = x.mean(-1, keepdim=True)
  var = ((x - mu) ** 2).mean(-1, keepdim=True)
  return (x - mu) / torch.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def self_attention(p, x, heads):
  """x [V, T, D] -> (proj output [V, T, D], probabilities [V, heads, T, T])."""
  v, t, d = x.shape
  qkv = dense(p["qkv"], x).reshape(v, t, 3, heads, d // heads)
  q, k, val = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [V, H, T, hd]
  attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
  out = (attn @ val).transpose(1, 2).reshape(v, t, d)
  return dense(p["proj"], out), attn


def vit(p, images, arch, patch_mask=None):
  """images [V, H, W, 3] -> (tokens after the final norm, last block before it,
  last block's attention), all with the prefix tokens first."""
  images = torch.as_tensor(np.asarray(images), dtype=F64)
  v, hh, ww, _ = images.shape
  ps, prefix, g0 = arch["patch"], arch["num_prefix"], arch["pos_grid"]
  h, w = hh // ps, ww // ps
  cells = images.reshape(v, h, ps, w, ps, 3).permute(0, 1, 3, 2, 4, 5).reshape(v, h * w, -1)
  kernel = p["patch_embed"]["kernel"].reshape(-1, p["patch_embed"]["kernel"].shape[-1])
  x = cells @ kernel + p["patch_embed"]["bias"]                   # [V, N, D]
  if patch_mask is not None:
    m = torch.tensor(np.array(patch_mask, bool)).reshape(v, h * w, 1)
    x = torch.where(m, p["mask_token"].expand_as(x), x)
  pos = p["pos_embed"][0]
  grid = pos[prefix:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
  if (h, w) != (g0, g0):   # DINO's interpolate_pos_encoding
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g0, (w + 0.1) / g0), mode="bicubic",
                         align_corners=False)
  x = x + grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
  if prefix:
    cls = (p["cls_token"][0] + pos[:prefix]).expand(v, prefix, -1)
    x = torch.cat([cls, x], 1)
  for i in range(arch["depth"]):
    b = p[f"block_{i}"]
    y, attn = self_attention(b["attn"], layer_norm(b["norm1"], x), arch["heads"])
    a = b["adapter"]   # eq. 3: sequential adapter on the attention output
    y = y + arch["adapter_scale"] * dense(a["up"], torch.relu(dense(a["down"], y)))
    x = x + y
    z = dense(b["mlp"]["fc2"], F.gelu(dense(b["mlp"]["fc1"], layer_norm(b["norm2"], x))))
    x = x + z
  return layer_norm(p["norm"], x), x, attn


def head(p, x, num_layers=3):
  """DINO head: MLP, L2-normalise, weight-normalised linear (no bias)."""
  for i in range(num_layers - 1):
    x = F.gelu(dense(p[f"layers_{i}"], x))
  x = dense(p[f"layers_{num_layers - 1}"], x)
  x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
  v = p["weight_v"]
  return x @ (v / v.norm(dim=0, keepdim=True) * p["weight_g"])


def cross_attention(p, q, kv, heads, kv_mask=None, q_rows=None, form="udi"):
  """One view's cross-attention: q [Q, D] tokens, or q_rows [Q, N] mixing LN1(kv).

  'udi': LN(q' + proj(MHA(W_q q', W_k kv', W_v kv'))) with q' = LN1(q), kv' = LN1(kv)
  (UDI's trained module); 'paper': eq. 5 as written, (W_v Z) softmax(tau (W_k Z)^T
  W_q z) with the qkv projection only (no norms, residual or output projection).
  """
  n, d = kv.shape
  hd = d // heads
  w, bias = p["qkv"]["kernel"], p["qkv"]["bias"]
  if form == "udi":
    kv = layer_norm(p["norm1"], kv)
  if q_rows is not None:
    qn = torch.as_tensor(q_rows, dtype=F64) @ kv
  else:
    qn = layer_norm(p["norm1"], q) if form == "udi" else q
  qq = (qn @ w[:, :d] + bias[:d]).reshape(-1, heads, hd).transpose(0, 1)        # [H, Q, hd]
  kk = (kv @ w[:, d:2 * d] + bias[d:2 * d]).reshape(n, heads, hd).transpose(0, 1)
  vv = (kv @ w[:, 2 * d:] + bias[2 * d:]).reshape(n, heads, hd).transpose(0, 1)
  logits = qq @ kk.transpose(-1, -2) / math.sqrt(hd)                          # [H, Q, N]
  if kv_mask is not None:
    logits = logits.masked_fill(~torch.tensor(np.array(kv_mask, bool)), -math.inf)
  out = (torch.softmax(logits, -1) @ vv).transpose(0, 1).reshape(-1, d)
  if form == "paper":
    return out
  return layer_norm(p["norm"], qn + dense(p["proj"], out))


# ---------------------------------------------------------------- the loss H

def h_loss(t_logits, s_logits, centre, t_temp, s_temp):
  """H per row: -sum softmax((t - c) / T_t) log_softmax(s / T_s), teacher detached."""
  p_t = torch.softmax((t_logits.detach() - centre) / t_temp, -1)
  return -(p_t * torch.log_softmax(s_logits / s_temp, -1)).sum(-1)


def teacher_temperature(step, steps_per_epoch, warm, final, warm_epochs):
  epoch = step // steps_per_epoch
  return float(np.linspace(warm, final, warm_epochs)[epoch]) if epoch < warm_epochs else final


# ---------------------------------------------------------------- geometry (NumPy)

def view_to_view(rc, src_box, src_flip, src_hw, dst_box, dst_flip, dst_hw):
  """(row, col) grid units [P, 2] of one view -> grid units of another (via source pixels)."""
  rc = np.asarray(rc, np.float64)
  fy, fx = rc[:, 0] / src_hw[0], rc[:, 1] / src_hw[1]
  if src_flip:
    fx = 1 - fx
  x0, y0, x1, y1 = (float(c) for c in src_box)
  y, x = y0 + fy * (y1 - y0), x0 + fx * (x1 - x0)
  x0, y0, x1, y1 = (float(c) for c in dst_box)
  gy, gx = (y - y0) / (y1 - y0), (x - x0) / (x1 - x0)
  if dst_flip:
    gx = 1 - gx
  return np.stack([gy * dst_hw[0], gx * dst_hw[1]], 1)


def centres_of(patches, w):
  patches = np.asarray(patches)
  return np.stack([patches // w, patches % w], 1) + 0.5


def in_view(rc, hw):
  return (rc[:, 0] >= 0) & (rc[:, 0] <= hw[0]) & (rc[:, 1] >= 0) & (rc[:, 1] <= hw[1])


def bilinear_rows(rc, hw):
  """[P, h*w] weights interpolating patch centres at grid-unit points (nearest patch
  repeated past the outer centres)."""
  h, w = hw
  out = np.zeros((len(rc), h * w))
  for k, (r, c) in enumerate(rc):
    i, j = r - 0.5, c - 0.5
    i0, j0 = math.floor(i), math.floor(j)
    a, b = i - i0, j - j0
    for ii, wi in ((i0, 1 - a), (i0 + 1, a)):
      for jj, wj in ((j0, 1 - b), (j0 + 1, b)):
        out[k, min(max(ii, 0), h - 1) * w + min(max(jj, 0), w - 1)] += wi * wj
  return out


def region_rectangle(start, u, hw, min_p, max_p):
  """Region around `start` from its four uniforms: (top, left, rows, cols)."""
  h, w = hw
  n = max_p - min_p + 1
  rows, cols = min(min_p + int(u[0] * n), h), min(min_p + int(u[1] * n), w)
  off_r, off_c = int(u[2] * rows), int(u[3] * cols)
  top = min(max(start // w - off_r, 0), h - rows)
  left = min(max(start % w - off_c, 0), w - cols)
  return top, left, rows, cols


def covered_patches(corners, hw, eps=1e-3):
  """[h*w] bool: patches whose cells overlap the rectangle spanned by `corners` [2, 2]
  (clipped to the view); touching edges (within eps) do not count."""
  h, w = hw
  lo = np.clip(corners.min(0), 0, [h, w])
  hi = np.clip(corners.max(0), 0, [h, w])
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  hit = (i < hi[0] - eps) & (i + 1 > lo[0] + eps) & (j < hi[1] - eps) & (j + 1 > lo[1] + eps)
  return hit.reshape(-1)


def blur_cells(images, cells, patch, sigma, scope):
  """Gaussian blur of the chosen cells [V, h*w] of images [V, H, W, 3] (NumPy)."""
  images = np.asarray(images, np.float64)
  v, hh, ww, _ = images.shape

  def kernel(n, radius=None):
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    if radius is not None:
      k = np.where(np.abs(d) <= radius, k, 0)
    return k / k.sum(1, keepdims=True)

  out = images.copy()
  if scope == "image":
    r = math.ceil(3 * sigma)
    whole = np.einsum("ab,cd,vbdz->vacz", kernel(hh, r), kernel(ww, r), images)
  k = kernel(patch)
  w = ww // patch
  for vi in range(v):
    for cell in np.flatnonzero(np.asarray(cells)[vi]):
      ys = slice((cell // w) * patch, (cell // w + 1) * patch)
      xs = slice((cell % w) * patch, (cell % w + 1) * patch)
      if scope == "cell":
        out[vi, ys, xs] = np.einsum("ab,cd,bdz->acz", k, k, images[vi, ys, xs])
      else:
        out[vi, ys, xs] = whole[vi, ys, xs]
  return out


# ---------------------------------------------------------------- GLARE

def glare(student, teacher, centres, batch, cfg, *, step, steps_per_epoch, cells,
          size_u, start_u=None, vit_heads=2, ca_form="udi"):
  """(terms and 'total', new centres, teacher temperature, counts of the cases met).

  student, teacher: {'backbone', 'head', 'cross_attention'} of float64 tensors.
  batch: NumPy global_crops [B, 2, S, S, 3], local_crops [B, L, s, s, 3],
    boxes [B, 2 + L, 4], flips [B, 2 + L].
  cfg: the run's config (model, glare, loss, cross_attention).
  cells: [B, 2, N] bool distorted cells of the student's globals.
  size_u: [B, 2, M, 4] uniforms of each region's size and offset.
  start_u: [B, 2, M] uniforms of each region's start ('random' sampling).
  vit_heads: attention heads of the ViT's blocks.
  """
  g = cfg.glare
  depth = sum(k.startswith("block_") for k in student["backbone"])
  arch = dict(patch=cfg.model.patch_size, num_prefix=cfg.model.num_prefix,
              pos_grid=cfg.model.pos_grid, depth=depth, heads=vit_heads,
              adapter_scale=cfg.model.adapter_scale)
  ca_heads = cfg.cross_attention.num_heads
  s_temp = cfg.loss.student_temp
  t_temp = teacher_temperature(step, steps_per_epoch, cfg.loss.warmup_teacher_temp,
                               cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs)
  c = {k: torch.as_tensor(np.asarray(v), dtype=F64) for k, v in centres.items()}
  gl, lo = np.asarray(batch["global_crops"]), np.asarray(batch["local_crops"])
  boxes, flips = np.asarray(batch["boxes"]), np.asarray(batch["flips"])
  b, nl = gl.shape[0], lo.shape[1]
  prefix = arch["num_prefix"]
  ps = arch["patch"]
  hw = (gl.shape[2] // ps, gl.shape[3] // ps)
  lhw = (lo.shape[2] // ps, lo.shape[3] // ps)
  n = hw[0] * hw[1]
  pa = g.patch_aug
  distort = g.w_loc1 > 0 and pa.kind != "none"
  cells = np.asarray(cells, bool) if distort else np.zeros((b, 2, n), bool)

  # Backbones: the teacher on the clean globals; the student on the distorted globals
  # (blurred cells, or [MASK] tokens) and on the locals.
  s_in, mask = gl, None
  if distort and pa.kind == "blur":
    s_in = blur_cells(gl.reshape(b * 2, *gl.shape[2:]), cells.reshape(b * 2, n), ps,
                      pa.blur_sigma, pa.blur_scope).reshape(gl.shape)
  elif distort:
    mask = cells.reshape(b * 2, n)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  t_tok, t_last, t_attn = vit(teacher["backbone"], flat(gl), arch)
  s_tok, s_last, _ = vit(student["backbone"], flat(s_in), arch, mask)
  sl_tok, _, _ = vit(student["backbone"], flat(lo), arch)
  per_image = lambda x, v: x.reshape(b, v, *x.shape[1:])
  t_tok, t_last, t_attn = per_image(t_tok, 2), per_image(t_last, 2), per_image(t_attn, 2)
  s_tok, s_last, sl_tok = per_image(s_tok, 2), per_image(s_last, 2), per_image(sl_tok, nl)
  distorted_tok = s_tok
  if distort and g.get("student_input", "distorted") == "clean":   # f(x) of eqs. 4, 5, 9
    s_tok, s_last, _ = vit(student["backbone"], flat(gl), arch)
    s_tok, s_last = per_image(s_tok, 2), per_image(s_last, 2)
  t_head = lambda x: head(teacher["head"], x).detach()
  s_head = lambda x: head(student["head"], x)
  t_cls, t_patch = t_head(t_tok[:, :, 0]), t_head(t_tok[:, :, prefix:])  # [B,2,K], [B,2,N,K]
  s_cls = s_head(torch.cat([s_tok[:, :, 0], sl_tok[:, :, 0]], 1))      # [B, 2 + L, K]
  s_patch, sl_patch = s_head(s_tok[:, :, prefix:]), s_head(sl_tok[:, :, prefix:])
  s_distorted = s_head(distorted_tok[:, :, prefix:])
  views = [(s_patch[:, v], hw) for v in range(2)] + [(sl_patch[:, v], lhw) for v in range(nl)]

  terms, new = {}, dict(c)
  info = dict(empty_views=0, partly_outside=0, dropped=0, kept=0, matched=0, unmatched=0)
  mom = cfg.loss.center_momentum
  # Eq. 4 (DINO): each teacher global against every other student view.
  if g.w_glob > 0:
    per = [h_loss(t_cls[i, t], s_cls[i, v], c["global"], t_temp, s_temp)
           for i in range(b) for t in range(2) for v in range(2 + nl) if v != t]
    terms["glob"] = torch.stack(per).sum() / len(per)
    new["global"] = mom * c["global"] + (1 - mom) * t_cls.reshape(-1, t_cls.shape[-1]).mean(0)
  # Eq. 8: distorted student patches against the same clean teacher patches,
  # masked mean per view, mean over views.
  if distort:
    per = []
    for i in range(b):
      for v in range(2):
        sel = np.flatnonzero(cells[i, v])
        info["empty_views"] += len(sel) == 0
        ce = h_loss(t_patch[i, v, sel], s_distorted[i, v, sel], c["local"], t_temp, s_temp)
        per.append(ce.sum() / max(len(sel), 1))
    terms["loc1"] = torch.stack(per).mean()
  # Eq. 9: every student patch against its bilinear match in each other teacher global.
  if g.w_loc2 > 0:
    total, count = 0.0, 0
    for i in range(b):
      for v, (logits, vhw) in enumerate(views):
        for t in range(2):
          if t == v:
            continue
          pos = view_to_view(centres_of(range(vhw[0] * vhw[1]), vhw[1]), boxes[i, v],
                             flips[i, v], vhw, boxes[i, t], flips[i, t], hw)
          ok = in_view(pos, hw)
          rows = torch.as_tensor(bilinear_rows(pos[ok], hw), dtype=F64)
          p_t = torch.softmax((t_patch[i, t] - c["local"]) / t_temp, -1)
          target = rows @ p_t
          total = total - (target * torch.log_softmax(logits[i, ok] / s_temp, -1)).sum()
          count += int(ok.sum())
          info["unmatched"] += int((~ok).sum())
    info["matched"] = count
    terms["loc2"] = total / max(count, 1)
  if g.w_loc1 > 0 or g.w_loc2 > 0:
    new["local"] = mom * c["local"] + (1 - mom) * t_patch.reshape(-1, t_patch.shape[-1]).mean(0)
  # Eqs. 5-7: regions R of each student global X, their counterparts in X' = the other.
  if g.w_reg > 0:
    r = g.regions
    total, count, t_sum = 0.0, 0, 0.0
    for i in range(b):
      for x in range(2):
        xo = 1 - x
        for m in range(size_u.shape[2]):
          if r.sampling == "attention":
            start = int(torch.argmax(t_attn[i, x, m, 0, prefix:]))
          else:
            start = min(int(start_u[i, x, m] * n), n - 1)
          top, left, rows, cols = region_rectangle(start, size_u[i, x, m], hw, r.min_patches,
                                                   r.max_patches)
          patches = [(top + a) * hw[1] + left + bb for a in range(rows) for bb in range(cols)]
          pos = view_to_view(centres_of(patches, hw[1]), boxes[i, x], flips[i, x], hw,
                             boxes[i, xo], flips[i, xo], hw)
          ok = in_view(pos, hw)
          if ok.sum() / len(patches) < r.min_valid_fraction:
            info["dropped"] += 1
            continue
          info["kept"] += 1
          info["partly_outside"] += not ok.all()
          corners = view_to_view(np.array([[top, left], [top + rows, left + cols]], float),
                                 boxes[i, x], flips[i, x], hw, boxes[i, xo], flips[i, xo], hw)
          context = covered_patches(corners, hw)
          z_s = cross_attention(student["cross_attention"], s_last[i, x, prefix:][patches],
                                s_last[i, x, prefix:], ca_heads, form=ca_form)
          z_t = cross_attention(teacher["cross_attention"], None, t_last[i, xo, prefix:].detach(),
                                ca_heads, np.broadcast_to(context, (len(patches), n)),
                                q_rows=bilinear_rows(pos, hw), form=ca_form)
          out_t = t_head(z_t[ok])
          total = total + h_loss(out_t, s_head(z_s[ok]), c["region"], t_temp, s_temp).sum()
          count += int(ok.sum())
          t_sum = t_sum + out_t.sum(0)
    terms["reg"] = total / max(count, 1)
    new["region"] = mom * c["region"] + (1 - mom) * t_sum / max(count, 1)
  weights = {"glob": g.w_glob, "reg": g.w_reg, "loc1": g.w_loc1, "loc2": g.w_loc2}
  terms["total"] = sum(weights[k] * v for k, v in terms.items())
  return terms, new, t_temp, info
