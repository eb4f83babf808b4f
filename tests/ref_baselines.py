"""Independent PyTorch (float64) references of the DINO, UDI and FLSL baselines
(test helper), built on the layers of tests/ref_glare.py and written from the
methods' descriptions in docs/DESIGN.md and the objectives' docstrings, not
from glare_jax. The stratified token samples are placed here from the
uniforms the objective drew.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import ref_glare as ref

F64 = torch.float64


def arch_of(params, cfg, heads, num_prefix=None):
  depth = sum(k.startswith("block_") for k in params)
  return dict(patch=cfg.model.patch_size, pos_grid=cfg.model.pos_grid, depth=depth, heads=heads,
              num_prefix=cfg.model.num_prefix if num_prefix is None else num_prefix,
              adapter_scale=cfg.model.adapter_scale)


def run(params, images, arch, drop_prefix=0):
  """ViT on views [B, V, ...] -> (tokens, last) [B, V, T, D]; drop_prefix runs the
  ViT without the first `drop_prefix` tokens (cls_token and their position rows)."""
  if drop_prefix:
    params = {k: v for k, v in params.items() if k != "cls_token"}
    params["pos_embed"] = params["pos_embed"][:, drop_prefix:]
    arch = dict(arch, num_prefix=0)
  images = np.asarray(images)
  b, v = images.shape[:2]
  tok, last, _ = ref.vit(params, images.reshape(b * v, *images.shape[2:]), arch)
  return tok.reshape(b, v, *tok.shape[1:]), last.reshape(b, v, *last.shape[1:])


def temperature(cfg_loss, step, spe):
  return ref.teacher_temperature(step, spe, cfg_loss.warmup_teacher_temp, cfg_loss.teacher_temp,
                                 cfg_loss.warmup_teacher_temp_epochs)


def dino_pairs(t_cls, s_cls, centre, t_temp, s_temp):
  """Mean over images of the mean over (teacher global t, student view v != t) of H."""
  b, g = t_cls.shape[:2]
  per = [torch.stack([ref.h_loss(t_cls[i, t], s_cls[i, v], centre, t_temp, s_temp)
                      for t in range(g) for v in range(s_cls.shape[1]) if v != t]).mean()
         for i in range(b)]
  return torch.stack(per).mean()


# ---------------------------------------------------------------- DINO

def dino(student, teacher, centres, batch, cfg, *, step, steps_per_epoch, vit_heads=2):
  arch = arch_of(student["backbone"], cfg, vit_heads)
  t_temp = temperature(cfg.loss, step, steps_per_epoch)
  c = torch.as_tensor(np.asarray(centres["global"]), dtype=F64)
  t_tok, _ = run(teacher["backbone"], batch["global_crops"], arch)
  s_g, _ = run(student["backbone"], batch["global_crops"], arch)
  s_l, _ = run(student["backbone"], batch["local_crops"], arch)
  t_cls = ref.head(teacher["head"], t_tok[:, :, 0]).detach()
  s_cls = ref.head(student["head"], torch.cat([s_g[:, :, 0], s_l[:, :, 0]], 1))
  loss = dino_pairs(t_cls, s_cls, c, t_temp, cfg.loss.student_temp)
  m = cfg.loss.center_momentum
  new = {"global": m * c + (1 - m) * t_cls.reshape(-1, t_cls.shape[-1]).mean(0)}
  return {"glob": loss, "total": loss}, new, t_temp


# ---------------------------------------------------------------- sampling and UDI geometry

def window_tokens(u, grid, window, random):
  """One token per window x window window of a square of (grid // window) windows in
  the corner that u's last two numbers pick; u [n*n + 2] -> flat indices [n*n]."""
  n = grid // window
  span = n * window
  out = []
  top, left = (int(u[n * n + k] < 0.5) * (grid - span) for k in range(2))
  for wi in range(n):
    for wj in range(n):
      off = int(u[wi * n + wj] * window * window) if random else 0
      out.append((top + wi * window + off // window) * grid + left + wj * window + off % window)
  return np.array(out)


def corner_aligned(tokens, f_src, box, flip, dst_box, dst_flip, f_dst):
  """UDI's geometry: token k of F sits at k / (F - 1) between the centres of the crop's
  first and last source pixels (flipped views count from the right). Returns each
  token's (row, col) position in destination token units and whether it falls
  strictly inside the destination's span."""
  r, c = tokens // f_src, tokens % f_src
  fr, fc = r / (f_src - 1), c / (f_src - 1)
  if flip:
    fc = 1 - fc
  x0, y0, x1, y1 = (float(v) for v in box)
  y = y0 + 0.5 + fr * (y1 - y0 - 1)
  x = x0 + 0.5 + fc * (x1 - x0 - 1)
  x0, y0, x1, y1 = (float(v) for v in dst_box)
  gr = (y - y0 - 0.5) / (y1 - y0 - 1)
  gc = (x - x0 - 0.5) / (x1 - x0 - 1)
  if dst_flip:
    gc = 1 - gc
  ok = (gr > 0) & (gr < 1) & (gc > 0) & (gc < 1)
  return np.stack([gr, gc], 1) * (f_dst - 1), ok


def token_rows(pos, f):
  """[P, f*f] bilinear rows at positions in token units (token i at i), clamped."""
  return ref.bilinear_rows(pos + 0.5, (f, f))


def udi(student, teacher, centres, batch, cfg, *, step, steps_per_epoch, u_global, u_local,
        vit_heads=2):
  """UDI's three levels (udi.py's docstring); u_global / u_local [B, n*n + 2] are the
  uniforms of each image's global and local samples."""
  arch = arch_of(student["backbone"], cfg, vit_heads)
  u = cfg.udi
  t_temp, s_temp = temperature(cfg.loss, step, steps_per_epoch), cfg.loss.student_temp
  c = {k: torch.as_tensor(np.asarray(v), dtype=F64) for k, v in centres.items()}
  boxes, flips = np.asarray(batch["boxes"]), np.asarray(batch["flips"])
  t_tok, t_last = run(teacher["backbone"], batch["global_crops"], arch)
  s_g, s_g_last = run(student["backbone"], batch["global_crops"], arch)
  s_l, _ = run(student["backbone"], batch["local_crops"], arch)
  b, nl = s_g.shape[0], s_l.shape[1]
  fg = int(math.isqrt(t_tok.shape[2] - 2))
  fl = int(math.isqrt(s_l.shape[2] - 2))
  heads = cfg.cross_attention.num_heads
  t_head = lambda x: ref.head(teacher["head"], x).detach()
  s_head = lambda x: ref.head(student["head"], x)
  t_cls = t_head(t_tok[:, :, 0])
  s_cls = s_head(torch.cat([s_g[:, :, 0], s_l[:, :, 0]], 1))
  s_plus = s_head(torch.cat([s_g[:, :, 1], s_l[:, :, 1]], 1))

  def geometry(tokens, f, v, t):
    if u.align_corners:
      pos, ok = corner_aligned(tokens, f, boxes[i, v], flips[i, v], boxes[i, t], flips[i, t], fg)
      return token_rows(pos, fg), ok
    pos = ref.view_to_view(ref.centres_of(tokens, f), boxes[i, v], flips[i, v], (f, f),
                           boxes[i, t], flips[i, t], (fg, fg))
    ok = ref.in_view(pos, (fg, fg))
    return ref.bilinear_rows(pos, (fg, fg)) * ok[:, None], ok

  def teacher_ca(rows, t):
    return ref.cross_attention(teacher["cross_attention"], None, t_last[i, t, 2:], heads,
                               q_rows=rows)

  patch_sum, patch_n, plus, mix_rows, patch_rows = 0.0, 0, [], [], []
  for i in range(b):
    tok_g = window_tokens(u_global[i], fg, u.global_window, u.random_sampling)
    tok_l = window_tokens(u_local[i], fl, u.local_window, u.random_sampling)
    per = []
    for v in range(2 + nl):
      for t in range(2):
        if v == t:
          continue
        tokens, f = (tok_g, fg) if v < 2 else (tok_l, fl)
        rows, ok = geometry(tokens, f, v, t)
        t_p = t_head(teacher_ca(rows, t))                     # [S, K]
        if v < 2:   # the patch level: student CA of view v's samples
          z_s = ref.cross_attention(student["cross_attention"], s_g_last[i, v, 2:][tokens],
                                    s_g_last[i, v, 2:], heads)
          ce = ref.h_loss(t_p, s_head(z_s), c["patch"], t_temp, s_temp)
          patch_sum = patch_sum + ce[ok].sum()
          patch_n += int(ok.sum())
        patch_rows.append(t_p[ok])
        mean = t_p[ok].sum(0) / max(int(ok.sum()), 1)
        mix = u.mix_weight * mean + (1 - u.mix_weight) * t_cls[i, t]
        mix_rows.append(mix)
        per.append(ref.h_loss(mix, s_plus[i, v], c["cls_plus"], t_temp, s_temp))
    plus.append(torch.stack(per).mean())
  terms = {"cls": dino_pairs(t_cls, s_cls, c["cls"], t_temp, s_temp),
           "cls_plus": torch.stack(plus).mean(), "patch": patch_sum / max(patch_n, 1)}
  terms["total"] = (terms["cls"] + terms["cls_plus"] + terms["patch"]) / 3
  m = cfg.loss.center_momentum
  rows = torch.cat(patch_rows)
  new = {"cls": m * c["cls"] + (1 - m) * t_cls.reshape(-1, t_cls.shape[-1]).mean(0),
         "cls_plus": m * c["cls_plus"] + (1 - m) * torch.stack(mix_rows).mean(0),
         "patch": m * c["patch"] + (1 - m) * rows.sum(0) / max(len(rows), 1)}
  return terms, new, t_temp


# ---------------------------------------------------------------- FLSL

def flsl(student, teacher, batch, cfg, *, step, steps_per_epoch, u_global, u_local, vit_heads=2):
  """FLSL (flsl.py's docstring): teacher on global 0, student on global 1 and the locals,
  one mean-shift step per sampled token; u_global [B, 1, .], u_local [B, L, .] uniforms."""
  f = cfg.flsl
  drop = cfg.model.num_prefix if f.drop_prefix else 0
  arch = arch_of(student["backbone"], cfg, vit_heads)
  t_temp = ref.teacher_temperature(step, steps_per_epoch, f.warmup_teacher_temp, f.teacher_temp,
                                   f.warmup_teacher_temp_epochs)
  s_temp = cfg.loss.student_temp
  gl = np.asarray(batch["global_crops"])
  prefix = 0 if drop else cfg.model.num_prefix
  t_tok, _ = run(teacher["backbone"], gl[:, :1], arch, drop)
  s_g, _ = run(student["backbone"], gl[:, 1:], arch, drop)
  s_l, _ = run(student["backbone"], batch["local_crops"], arch, drop)
  cos, ce, probs = [], [], []
  for i in range(gl.shape[0]):
    z_t = t_tok[i, 0, prefix:].detach()
    for views, us, window in ((s_g, u_global, f.global_window), (s_l, u_local, f.local_window)):
      for v in range(views.shape[1]):
        z = views[i, v, prefix:]
        grid = int(math.isqrt(z.shape[0]))
        x = z[window_tokens(us[i, v], grid, window, f.random_sampling)]
        mode_s = torch.softmax(f.meanshift_sa_scale * x @ z.T, -1) @ z
        mode_t = torch.softmax(f.meanshift_ca_scale * x.detach() @ z_t.T, -1) @ z_t
        cos.append(torch.nn.functional.cosine_similarity(x, mode_s, dim=-1, eps=1e-12))
        p_s = ref.head(student["head"], mode_s)
        ce.append(ref.h_loss(ref.head(teacher["head"], mode_t).detach(), p_s, 0.0, t_temp, s_temp))
        probs.append(torch.softmax(p_s / s_temp, -1))
  p_bar = torch.cat(probs).mean(0)
  terms = {"meanshift": 2 - 2 * torch.cat(cos).mean(), "kmeans": torch.cat(ce).mean(),
           "vmr": (p_bar * torch.log(p_bar)).sum() + math.log(p_bar.shape[0])}
  terms["total"] = f.w_ms * terms["meanshift"] + f.w_ce * terms["kmeans"] + f.w_vol * terms["vmr"]
  return terms, t_temp
