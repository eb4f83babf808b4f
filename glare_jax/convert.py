"""PyTorch checkpoints (UDI, DINO, iBOT, FLSL) -> an orbax checkpoint + model.json.

    python -m glare_jax.convert --src udi_vits16.pth --out ckpt/udi_s16

Layouts read (docs/parity.md, "Converting a PyTorch checkpoint"):
  udi   training checkpoint {'student', 'teacher', 'optimizer', 'epoch', 'args',
        'udi_loss', 'fp16_scaler'}: ViT keys under 'backbone.backbone.', UDI's
        cross-attention 'backbone.attn.{qkv,proj,norm}' + 'backbone.norm1', the
        shared head stored three times as 'head.{0,1,2}.*'; student keys carry
        'module.'. Or a flat ViT state dict (backbone only), or what UDI's
        extract_backbone_weights script writes: 'backbone.<ViT key>' beside the
        cross-attention's 'attn.*' and 'norm1.*'.
  dino  a flat ViT state dict (dino_deitsmall16_pretrain.pth) or a DINO training
        checkpoint ('backbone.*', 'head.*').
  ibot  {'state_dict': flat ViT state dict}, 'masked_embed' -> our mask_token; or
        an iBOT training checkpoint, whose patch head ('head.last_layer2.*',
        'head.mlp2.*') is left out: GLARE has one head for every level.
  flsl  like dino; a fixed sin-cos position table without prefix rows, so the
        (unused) cls_token is dropped and num_prefix = 0.
Only tensors of the chosen network are read; optimizer, loss and fp16-scaler
state and the pickled arguments are left out, and the notes say so. Sizes
(width, depth, heads, patch, prefix tokens, position grid, head K) come from
the shapes.

Output: DIR/params ({'backbone', ['head'], ['cross_attention']}, see
`glare_jax.models.load`) and DIR/model.json (`ModelSpec`).
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import pickle
import re
import sys
from typing import Any, Callable

import numpy as np
from absl import flags

from glare_jax import cli
from glare_jax.models import load
from glare_jax.models.vit import SIZES, ModelSpec, param_count

FORMATS = ("udi", "dino", "ibot", "flsl")
# Globals a checkpoint may need beyond torch's weights-only defaults: UDI/DINO/FLSL
# pickle their argparse arguments.
SAFE_GLOBALS = (argparse.Namespace,)
HEAD_DIM = 64  # ViT head dimension, used when the width matches no known size


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and why."""


# ---------------------------------------------------------------------------
# Reading the file.

def read_torch_file(path: pathlib.Path, trust_pickle: bool = False) -> Any:
  """torch.load with weights_only=True and a small allow-list of globals.

  Every failure is one ConversionError line: a global outside the allow-list
  (a pickle that could run code: refused, never run), a text file, or a file
  that is no (or a truncated) PyTorch checkpoint.
  """
  try:
    import torch
  except ImportError as e:
    raise ConversionError("converting needs PyTorch: pip install 'glare-jax[convert]'") from e
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  if _is_text(path):
    raise ConversionError(f"{path}: a text file, not a PyTorch checkpoint")
  if trust_pickle:
    try:
      return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
      raise ConversionError(f"{path}: cannot be loaded even with --trust-pickle: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
  try:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    needed = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
    if needed:
      raise ConversionError(
          f"{path}: refused: the file needs GLOBAL {', '.join(needed)} to load, which could "
          "run code; only use --trust-pickle for files you trust") from e
    raise ConversionError(f"{path}: not a PyTorch checkpoint, or a corrupt one: "
                          f"{_unpickler_detail(e)}") from e
  except Exception as e:  # noqa: BLE001 - torch raises many kinds on a damaged file
    raise ConversionError(f"{path}: truncated or corrupt PyTorch checkpoint (or another kind "
                          f"of file): {type(e).__name__}: {_first_line(e)}") from e


def _is_text(path: pathlib.Path) -> bool:
  """Whether the file starts as UTF-8 text (a torch file is a zip or a binary pickle)."""
  with open(path, "rb") as f:
    head = f.read(512)
  if not head or b"\0" in head:
    return False
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    return e.start > len(head) - 4    # a character cut at the end of the 512 bytes
  return True


def _unpickler_detail(e: Exception) -> str:
  """The unpickler's own complaint, without torch's advice about weights_only."""
  text = str(e)
  if "WeightsUnpickler error:" in text:
    text = text.split("WeightsUnpickler error:", 1)[1]
  lines = [ln.strip() for ln in text.splitlines()
           if ln.strip() and not ln.strip().startswith(("Weights only load failed",
                                                         "Check the documentation",
                                                         "Please file an issue"))]
  return (lines[0] if lines else "unreadable pickle")[:200]


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]


def _to_numpy(v: Any) -> Any:
  """Floating torch tensors -> float32 NumPy; anything else is returned as is."""
  if hasattr(v, "detach") and v.is_floating_point():
    return v.detach().cpu().float().numpy()
  return v


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
  """Removes `prefix` when every key carries it (DDP's 'module.', wrappers)."""
  if sd and all(k.startswith(prefix) for k in sd):
    return {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _is_vit(sd: dict[str, Any]) -> bool:
  return "patch_embed.proj.weight" in sd


CA_PREFIXES = ("attn.", "norm1.")   # UDI's cross-attention beside a backbone
IBOT_PATCH_HEAD = ("head.last_layer2.", "head.mlp2.")   # iBOT's head for patch tokens


def _flat_parts(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """A flat state dict -> (ViT keys, UDI cross-attention keys, other keys).

  'module.' and a 'backbone.' carried by every key are dropped; where only some
  keys carry 'backbone.' (UDI's extract_backbone_weights output), those are the
  ViT and 'attn.*' / 'norm1.*' the cross-attention."""
  sd = _strip(dict(sd), "module.")
  if not any(k.startswith("backbone.") for k in sd) or all(k.startswith("backbone.") for k in sd):
    return _strip(sd, "backbone."), {}, []
  vit = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  ca = {k: v for k, v in sd.items() if k.startswith(CA_PREFIXES)}
  rest = sorted(k for k in sd if not k.startswith(("backbone.",) + CA_PREFIXES))
  return vit, ca, rest


# ---------------------------------------------------------------------------
# Layouts -> {'backbone': flat dict, 'head': ..., 'cross_attention': ...}.

def detect_format(ckpt: Any, path: pathlib.Path) -> str:
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
  if "state_dict" in ckpt:
    return "ibot"
  if "teacher" in ckpt or "student" in ckpt:
    net = _strip(ckpt.get("teacher") or ckpt["student"], "module.")
    if any(k.startswith("backbone.backbone.") for k in net):
      return "udi"
    pos = net.get("backbone.pos_embed")
    if "flsl_loss" in ckpt or (pos is not None and _prefix_rows(pos.shape[1]) == 0):
      return "flsl"
    if any(k.startswith(IBOT_PATCH_HEAD) for k in net):
      return "ibot"
    return "dino"
  flat, _, _ = _flat_parts(ckpt)
  if _is_vit(flat) and "pos_embed" in flat:
    return {0: "flsl", 2: "udi"}.get(_prefix_rows(flat["pos_embed"].shape[1]), "dino")
  keys = sorted(ckpt)[:8]
  raise ConversionError(f"{path}: unrecognised checkpoint layout (top-level keys {keys}); "
                        "expected a ViT state dict, {'state_dict': ...} or {'student', 'teacher'}")


def split_networks(ckpt: dict[str, Any], fmt: str, which: str, path: pathlib.Path
                   ) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
  """The chosen network's tensors grouped by part; returns (groups, unknown keys,
  notes on what was left out)."""
  if "teacher" in ckpt or "student" in ckpt:
    if which not in ckpt:
      raise ConversionError(f"{path}: has no {which!r} network (keys {sorted(ckpt)})")
    sd = _strip(dict(ckpt[which]), "module.")
    groups, unknown, notes = _split_training_state(sd, path)
    others = sorted(str(k) for k in ckpt if k != which)
    notes.insert(0, f"left out: the checkpoint's {', '.join(others)}")
    return groups, unknown, notes
  sd = ckpt["state_dict"] if fmt == "ibot" and "state_dict" in ckpt else ckpt
  vit, ca, rest = _flat_parts(sd)
  return {"backbone": vit, **({"cross_attention": ca} if ca else {})}, rest, []


def _split_training_state(sd: dict[str, Any], path: pathlib.Path):
  udi = any(k.startswith("backbone.backbone.") for k in sd)
  groups: dict[str, dict[str, Any]] = {"backbone": {}, "head": {}, "cross_attention": {}}
  unknown, wrapper_norm, patch_head, notes = [], {}, [], []
  for k, v in sd.items():
    if udi and k.startswith("backbone.backbone."):
      groups["backbone"][k[len("backbone.backbone."):]] = v
    elif udi and k.startswith(("backbone.attn.", "backbone.norm1.")):
      groups["cross_attention"][k[len("backbone."):]] = v
    elif not udi and k.startswith("backbone."):
      groups["backbone"][k[len("backbone."):]] = v
    elif k.startswith(IBOT_PATCH_HEAD):
      patch_head.append(k)
    elif k.startswith("head."):
      groups["head"][k[len("head."):]] = v
    elif k.startswith("norm."):  # FLSL with layernorm_on_mode keeps the final norm outside
      wrapper_norm[k] = v
    else:
      unknown.append(k)
  for k, v in wrapper_norm.items():
    if k in groups["backbone"]:
      unknown.append(k)
    else:
      groups["backbone"][k] = v
  if wrapper_norm and not unknown:
    notes.append("FLSL (layernorm_on_mode): the wrapper's norm, which FLSL applies to the "
                 "mean-shift modes before its head, becomes the backbone's final norm")
  if patch_head:
    notes.append(f"left out: iBOT's patch head ({len(patch_head)} tensors, "
                 f"{', '.join(sorted({k.split('.')[1] for k in patch_head}))}); "
                 "GLARE has one head for every level, the [CLS] head converted here")
  groups["head"] = _dedupe_heads(groups["head"], path)
  return {g: d for g, d in groups.items() if d}, unknown, notes


def _dedupe_heads(head: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
  """UDI stores its one shared head as head.0/1/2: check the copies agree, keep one."""
  copies: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for k, v in head.items():
    idx, _, rest = k.partition(".")
    if not idx.isdigit():
      return head
    copies[idx][rest] = v
  first, *others = sorted(copies, key=int) or [None]
  for o in others:
    diff = sorted(k for k in set(copies[first]) | set(copies[o])
                  if k not in copies[first] or k not in copies[o]
                  or not np.array_equal(_to_numpy(copies[first][k]), _to_numpy(copies[o][k])))
    if diff:
      raise ConversionError(f"{path}: head.{first} and head.{o} differ ({diff[:5]}); "
                            "expected one shared head stored several times")
  return copies[first] if first is not None else {}


# ---------------------------------------------------------------------------
# Shapes -> sizes.

def _prefix_rows(n: int) -> int:
  g = math.isqrt(n)
  return n - g * g


def _need(sd, key, what, path):
  if key not in sd:
    raise ConversionError(f"{path}: {what} is missing {key!r}; cannot infer the model size")
  return sd[key]


def infer_spec(groups: dict[str, dict[str, Any]], fmt: str, which: str,
               path: pathlib.Path) -> tuple[ModelSpec, list[str]]:
  """Model sizes from tensor shapes; returns (spec, notes)."""
  bb, notes = groups["backbone"], []
  patch_w = _need(bb, "patch_embed.proj.weight", "the backbone", path)
  if len(patch_w.shape) != 4:
    raise ConversionError(f"{path}: patch_embed.proj.weight has shape {tuple(patch_w.shape)}; "
                          "expected a convolution (width, 3, patch, patch)")
  d, _, p, _ = patch_w.shape
  blocks = [int(m.group(1)) for k in bb if (m := re.match(r"blocks\.(\d+)\.", k))]
  if not blocks:
    raise ConversionError(f"{path}: the backbone has no 'blocks.<i>.*' keys")
  depth = 1 + max(blocks)
  mlp = _need(bb, "blocks.0.mlp.fc1.weight", "the backbone", path).shape[0]
  n = _need(bb, "pos_embed", "the backbone", path).shape[1]
  num_prefix, grid = _prefix_rows(n), math.isqrt(n)
  if "cls_token" in bb and bb["cls_token"].shape[1] != num_prefix:
    if fmt != "flsl":
      raise ConversionError(f"{path}: cls_token has {bb['cls_token'].shape[1]} rows but "
                            f"pos_embed has {num_prefix} prefix rows ({n} = "
                            f"{num_prefix} + {grid}x{grid})")
    del bb["cls_token"]
    notes.append("FLSL: dropped the unused cls_token (no prefix rows in pos_embed)")
  variant = next((name for name, (w, dp, _, m) in SIZES.items() if (w, dp, m) == (d, depth, mlp)),
                 "custom")
  if variant == "custom" and d % HEAD_DIM:
    raise ConversionError(f"{path}: width {d} matches no known ViT size and is not a "
                          f"multiple of the head dimension {HEAD_DIM}")
  heads = SIZES[variant][2] if variant != "custom" else d // HEAD_DIM
  head_info = None
  if "head" in groups:
    h = groups["head"]
    if any(k.endswith("running_mean") for k in h):
      raise ConversionError(f"{path}: the head has BatchNorm layers (DINO's use_bn_in_head), "
                            "which the projection head here does not have")
    linears = sorted(int(m.group(1)) for k in h if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
    if "mlp.weight" in h:
      linears = [-1]
    if not linears:
      raise ConversionError(f"{path}: the head has no Linear weights ('mlp.<i>.weight' or "
                            f"'mlp.weight'); its keys: {sorted(h)[:8]}")
    v = _need(h, "last_layer.weight_v", "the head", path)
    first = h["mlp.weight" if linears == [-1] else f"mlp.{linears[0]}.weight"]
    head_info = dict(out_dim=v.shape[0], bottleneck_dim=v.shape[1],
                     hidden_dim=first.shape[0] if len(linears) > 1 else 0,
                     num_layers=len(linears))
  spec = ModelSpec(
      variant=variant, patch_size=p, num_prefix=num_prefix, pos_grid=grid,
      head_dim_out=head_info["out_dim"] if head_info else None, width=d, depth=depth,
      num_heads=heads, mlp_dim=mlp, mask_token="masked_embed" in bb, head=head_info,
      cross_attention=dict(num_heads=heads) if "cross_attention" in groups else None,
      source_format=fmt, which=which)
  return spec, notes


# ---------------------------------------------------------------------------
# Renaming: torch key -> (our path, expected torch shape, transform).

Entry = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]
_same = lambda x: x  # noqa: E731
_t = lambda x: x.T  # noqa: E731  Linear (out, in) -> Flax kernel (in, out)


def _linear(table, src, dst, n_in, n_out, bias=True):
  table[f"{src}.weight"] = (dst + ("kernel",), (n_out, n_in), _t)
  if bias:
    table[f"{src}.bias"] = (dst + ("bias",), (n_out,), _same)


def _norm(table, src, dst, d):
  table[f"{src}.weight"] = (dst + ("scale",), (d,), _same)
  table[f"{src}.bias"] = (dst + ("bias",), (d,), _same)


def vit_table(s: ModelSpec) -> dict[str, Entry]:
  d, p, t = s.width, s.patch_size, {}
  t["patch_embed.proj.weight"] = (("patch_embed", "kernel"), (d, 3, p, p),
                                  lambda x: x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  t["patch_embed.proj.bias"] = (("patch_embed", "bias"), (d,), _same)
  t["pos_embed"] = (("pos_embed",), (1, s.num_prefix + s.pos_grid ** 2, d), _same)
  if s.num_prefix:
    t["cls_token"] = (("cls_token",), (1, s.num_prefix, d), _same)
  if s.mask_token:
    t["masked_embed"] = (("mask_token",), (1, d), lambda x: x.reshape(-1))
  for i in range(s.depth):
    b = (f"block_{i}",)
    _norm(t, f"blocks.{i}.norm1", b + ("norm1",), d)
    _linear(t, f"blocks.{i}.attn.qkv", b + ("attn", "qkv"), d, 3 * d)
    _linear(t, f"blocks.{i}.attn.proj", b + ("attn", "proj"), d, d)
    _norm(t, f"blocks.{i}.norm2", b + ("norm2",), d)
    _linear(t, f"blocks.{i}.mlp.fc1", b + ("mlp", "fc1"), d, s.mlp_dim)
    _linear(t, f"blocks.{i}.mlp.fc2", b + ("mlp", "fc2"), s.mlp_dim, d)
  _norm(t, "norm", ("norm",), d)
  return t


def head_table(s: ModelSpec) -> dict[str, Entry]:
  h, t = s.head, {}
  dims = [s.width] + [h["hidden_dim"]] * (h["num_layers"] - 1) + [h["bottleneck_dim"]]
  for j in range(h["num_layers"]):
    src = "mlp" if h["num_layers"] == 1 else f"mlp.{2 * j}"  # Linear, GELU, Linear, ...
    _linear(t, src, (f"layers_{j}",), dims[j], dims[j + 1])
  k, nb = h["out_dim"], h["bottleneck_dim"]
  t["last_layer.weight_g"] = (("weight_g",), (k, 1), lambda x: x.reshape(-1))
  t["last_layer.weight_v"] = (("weight_v",), (k, nb), _t)
  return t


def cross_attention_table(s: ModelSpec) -> dict[str, Entry]:
  d, t = s.width, {}
  _norm(t, "norm1", ("norm1",), d)
  _linear(t, "attn.qkv", ("qkv",), d, 3 * d)
  _linear(t, "attn.proj", ("proj",), d, d)
  _norm(t, "attn.norm", ("norm",), d)
  return t


def _weight_norm_names(sd: dict[str, Any]) -> dict[str, Any]:
  """torch.nn.utils.parametrizations.weight_norm keys -> the classic weight_g / weight_v."""
  ren = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
         "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
  return {ren.get(k, k): v for k, v in sd.items()}


def rename(sd: dict[str, Any], table: dict[str, Entry], part: str):
  """Applies `table`; returns (tree, problems) with problems as readable lines."""
  tree: dict[str, Any] = {}
  problems = [f"unknown key {part}:{k}" for k in sorted(set(sd) - set(table))]
  problems += [f"missing key {part}:{k} (expected shape {table[k][1]})"
               for k in sorted(set(table) - set(sd))]
  for k in sorted(set(sd) & set(table)):
    dst, shape, fn = table[k]
    v = _to_numpy(sd[k])
    if not isinstance(v, np.ndarray) or tuple(v.shape) != shape:
      got = tuple(v.shape) if isinstance(v, np.ndarray) else type(v).__name__
      problems.append(f"shape mismatch {part}:{k}: got {got}, expected {shape}")
      continue
    node = tree
    for name in dst[:-1]:
      node = node.setdefault(name, {})
    node[dst[-1]] = np.ascontiguousarray(fn(v), dtype=np.float32)
  return tree, problems


TABLES = {"backbone": vit_table, "head": head_table, "cross_attention": cross_attention_table}


def convert_checkpoint(path: pathlib.Path, fmt: str = "auto", which: str = "teacher",
                       allow_missing: bool = False, trust_pickle: bool = False):
  """Reads `path`; returns (params, spec, notes). Raises ConversionError on any problem
  unless `allow_missing`, in which case the problems are returned as notes."""
  ckpt = read_torch_file(path, trust_pickle)
  _check_structure(ckpt, path)
  try:
    return _convert(ckpt, path, fmt, which, allow_missing)
  except (KeyError, TypeError, AttributeError, IndexError) as e:   # a dict of odd values
    raise ConversionError(f"{path}: not a checkpoint layout this converter reads "
                          f"({type(e).__name__}: {_first_line(e)})") from e


def _check_structure(ckpt: Any, path: pathlib.Path) -> None:
  """The containers the layouts need: string-keyed dicts where a network is expected."""
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
  nets = {"the file": ckpt, **{repr(k): ckpt[k] for k in ("state_dict", "teacher", "student")
                                if k in ckpt}}
  for name, net in nets.items():
    if not isinstance(net, dict):
      raise ConversionError(f"{path}: {name} is a {type(net).__name__}, expected a dict of "
                            "tensors")
    if bad := [k for k in net if not isinstance(k, str)][:3]:
      raise ConversionError(f"{path}: {name} has keys that are not names: {bad}")


def _convert(ckpt: dict[str, Any], path: pathlib.Path, fmt: str, which: str,
             allow_missing: bool):
  detected = detect_format(ckpt, path)
  fmt = detected if fmt == "auto" else fmt
  groups, unknown, left_out = split_networks(ckpt, fmt, which, path)
  is_training = "teacher" in ckpt or "student" in ckpt
  if "head" in groups:
    groups["head"] = _weight_norm_names(groups["head"])
  spec, notes = infer_spec(groups, fmt, which if is_training else "", path)
  notes[:0] = [f"format {fmt}" + ("" if fmt == detected else f" (detected {detected})")
               + (f", {which}" if is_training else ""), *left_out]
  problems = [f"unknown key {k}" for k in unknown]
  params = {}
  for part, sd in groups.items():
    params[part], part_problems = rename(sd, TABLES[part](spec), part)
    problems += part_problems
  if problems and not allow_missing:
    raise ConversionError(f"{path}: {len(problems)} problem(s) converting the {fmt} "
                          "checkpoint (use --allow-missing to convert anyway):\n  "
                          + "\n  ".join(problems))
  notes += [f"ignored: {p}" for p in problems]
  for part, tree in params.items():
    notes.append(f"{part}: {param_count(tree) / 1e6:.2f}M parameters")
  return params, spec, notes


def main(argv: list[str] | None = None) -> int:
  fv = cli.flag_values()
  flags.DEFINE_string("src", None, "the PyTorch .pth file", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory", flag_values=fv)
  flags.DEFINE_enum("format", "auto", ("auto",) + FORMATS, "checkpoint format", flag_values=fv)
  flags.DEFINE_enum("which", "teacher", ("teacher", "student"),
                    "network of a training checkpoint", flag_values=fv)
  flags.DEFINE_bool("allow-missing", False,
                    "report unknown/missing/mismatched keys instead of stopping", flag_values=fv)
  flags.DEFINE_bool("trust-pickle", False,
                    "allow arbitrary pickled objects (only for files you trust)", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace an existing output", flag_values=fv)
  flags.mark_flags_as_required(["src", "out"], flag_values=fv)
  cli.parse(fv, argv, prog="python -m glare_jax.convert", doc=__doc__)
  args = argparse.Namespace(src=pathlib.Path(fv.src), out=pathlib.Path(fv.out),
                            format=fv.format, which=fv.which,
                            allow_missing=fv["allow-missing"].value,
                            trust_pickle=fv["trust-pickle"].value, overwrite=fv.overwrite)
  try:
    params, spec, notes = convert_checkpoint(args.src, args.format, args.which,
                                             args.allow_missing, args.trust_pickle)
    notes += load.save_converted(args.out, params, spec, overwrite=args.overwrite)
  except (ConversionError, FileExistsError) as e:
    return cli.report(e, verbose=fv.verbosity >= 1)
  for line in notes:
    print(line)
  print(f"wrote {args.out} ({spec.variant}, patch {spec.patch_size}, "
        f"{spec.num_prefix} prefix tokens, pos grid {spec.pos_grid}, K {spec.head_dim_out})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
