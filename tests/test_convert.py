"""Converter: every file layout at ViT-S size against an independent PyTorch model,
and the errors for bad files (truncated, missing / unknown keys, wrong shapes,
pickles that need non-allowed globals)."""

import argparse
import functools
import json
import os
import pickle
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_vit as tv  # noqa: E402

from glare_jax import convert  # noqa: E402
from glare_jax.models import load  # noqa: E402
from glare_jax.models.heads import CrossAttention, ProjectionHead  # noqa: E402
from glare_jax.models.vit import ViT  # noqa: E402

S, TINY, HEAD, LAYOUTS = tv.S, tv.TINY, tv.HEAD, tv.LAYOUTS
make_layout, convert_file = tv.make_layout, tv.convert_file
TOKENS_TOL, ATTN_TOL = 1e-4, 1e-5


@functools.cache
def jitted_vit(vit_kwargs, mode):
  """One compiled forward per (architecture, resize mode), shared by the layouts."""
  model = ViT(**dict(vit_kwargs), pos_resize=mode, adapter_mode="none")
  return jax.jit(lambda p, x: model.apply({"params": p}, x))


def max_diffs(params, spec, vit, images, mode):
  backbone = {k: v for k, v in params["backbone"].items() if k != "mask_token"}
  tokens, aux = jitted_vit(tuple(sorted(spec.vit_kwargs().items())), mode)(backbone, images)
  t_tokens, t_attn = tv.torch_forward(vit, images, mode)
  assert tokens.shape == t_tokens.shape and aux["attn"].shape == t_attn.shape
  return (float(np.abs(np.asarray(tokens) - t_tokens).max()),
          float(np.abs(np.asarray(aux["attn"]) - t_attn).max()))


# Layouts with the same prefix count share compiled forwards, so they run in one test.
@pytest.mark.parametrize("layouts", [("udi_full", "udi_backbone"), ("dino", "ibot"), ("flsl",)])
def test_vit_s_parity(layouts, tmp_path):
  for layout in layouts:
    check_layout(layout, tmp_path)


def check_layout(layout, tmp_path):
  ckpt, mods = make_layout(layout, seed=10 * list(LAYOUTS).index(layout), same_student=True)
  params, spec = convert_file(tmp_path, ckpt, name=layout)
  p, fmt, training = LAYOUTS[layout]
  assert (spec.variant, spec.num_prefix, spec.pos_grid, spec.patch_size) == ("S", p, 14, 16)
  assert (spec.source_format, spec.which) == (fmt, "teacher" if training else "")
  rng = np.random.default_rng(0)
  cases = [("224", rng.normal(size=(1, 224, 224, 3)).astype(np.float32), "dino")]
  small = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
  cases += [("96 dino", small, "dino"), ("96 size", small, "size")]
  for name, images, mode in cases:
    d_tokens, d_attn = max_diffs(params, spec, mods["vit"], images, mode)
    print(f"parity {layout} {name}: tokens {d_tokens:.2e} attn {d_attn:.2e}")
    assert d_tokens <= TOKENS_TOL, (layout, name, d_tokens)
    assert d_attn <= ATTN_TOL, (layout, name, d_attn)
  if "masked_embed" in mods:
    np.testing.assert_array_equal(params["backbone"]["mask_token"],
                                  mods["masked_embed"].numpy()[0])
    assert spec.mask_token
  if "head" in mods:
    h = spec.head
    assert h == dict(out_dim=HEAD["k"], hidden_dim=HEAD["hidden"],
                     bottleneck_dim=HEAD["bottleneck"], num_layers=3)
    x = rng.normal(size=(3, S["d"])).astype(np.float32)
    ours = ProjectionHead(h["out_dim"], h["hidden_dim"], h["bottleneck_dim"],
                          h["num_layers"]).apply({"params": params["head"]}, x)
    with torch.no_grad():
      ref = mods["head"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
  if "ca" in mods:
    x = rng.normal(size=(2, 20, S["d"])).astype(np.float32)
    rows = [3, 7, 7, 19]
    ours = CrossAttention(spec.cross_attention["num_heads"]).apply(
        {"params": params["cross_attention"]}, x[:, rows], x)
    with torch.no_grad():
      ref = mods["ca"](torch.from_numpy(x), rows).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # Bilinear query maps (the teacher's queries between patches), applied as UDI does.
    soft = rng.dirichlet(np.ones(4), size=5).astype(np.float32)         # [5, 4] weights
    q_map = np.zeros((5, 20), np.float32)
    for i in range(5):
      q_map[i, rng.choice(20, size=4, replace=False)] = soft[i]
    ours = CrossAttention(spec.cross_attention["num_heads"]).apply(
        {"params": params["cross_attention"]}, None, x, q_map=np.broadcast_to(q_map, (2, 5, 20)))
    with torch.no_grad():
      ref = mods["ca"](torch.from_numpy(x), torch.from_numpy(q_map)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
  else:
    assert "cross_attention" not in params


def test_model_json_and_which(tmp_path):
  ckpt, mods = make_layout("udi_full", TINY, grid=4)
  teacher, spec = convert_file(tmp_path, ckpt, name="t")
  student, _ = convert_file(tmp_path, ckpt, "--which", "student", name="s")
  meta = json.loads((tmp_path / "t" / "model.json").read_text())
  assert meta["variant"] == "tiny_test" and meta["num_heads"] == 2 and meta["width"] == 64
  assert meta["num_prefix"] == 2 and meta["pos_grid"] == 4 and meta["head_dim_out"] == 1024
  assert meta["source_format"] == "udi" and meta["which"] == "teacher"
  np.testing.assert_array_equal(teacher["backbone"]["pos_embed"],
                                mods["vit"].pos_embed.detach().numpy())
  want = ckpt["student"]["module.backbone.backbone.pos_embed"].numpy()
  np.testing.assert_array_equal(student["backbone"]["pos_embed"], want)
  for part, ours, key in (("head", ("weight_v",), "module.head.0.last_layer.weight_v"),
                          ("cross_attention", ("qkv", "kernel"), "module.backbone.attn.qkv.weight")):
    got = functools.reduce(lambda t, k: t[k], ours, student[part])   # the student's, not the teacher's
    np.testing.assert_array_equal(got, ckpt["student"][key].numpy().T)
    assert not np.array_equal(got, functools.reduce(lambda t, k: t[k], ours, teacher[part]))
  qkv = ckpt["teacher"]["backbone.backbone.blocks.1.attn.qkv.weight"].numpy()
  np.testing.assert_array_equal(teacher["backbone"]["block_1"]["attn"]["qkv"]["kernel"], qkv.T)
  conv = ckpt["teacher"]["backbone.backbone.patch_embed.proj.weight"].numpy()
  np.testing.assert_array_equal(teacher["backbone"]["patch_embed"]["kernel"],
                                conv.transpose(2, 3, 1, 0))
  g = ckpt["teacher"]["head.0.last_layer.weight_g"].numpy()
  v = ckpt["teacher"]["head.0.last_layer.weight_v"].numpy()
  np.testing.assert_array_equal(teacher["head"]["weight_g"], g[:, 0])
  np.testing.assert_array_equal(teacher["head"]["weight_v"], v.T)


def test_parametrized_weight_norm_head(tmp_path):
  """torch's newer weight_norm parametrisation stores original0 / original1."""
  vit = tv.randomize(tv.ViT(**{k: TINY[k] for k in ("d", "depth", "heads", "mlp")},
                            num_prefix=1, grid=4), 0)
  head = tv.Head(TINY["d"], k=32, hidden=16, bottleneck=8)
  head.last_layer = torch.nn.utils.parametrizations.weight_norm(
      torch.nn.Linear(8, 32, bias=False))
  sd = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
  sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
  params, spec = convert_file(tmp_path, {"teacher": sd, "student": sd})
  assert spec.source_format == "dino" and spec.head_dim_out == 32
  x = np.random.default_rng(0).normal(size=(2, TINY["d"])).astype(np.float32)
  ours = ProjectionHead(32, 16, 8, 3).apply({"params": params["head"]}, x)
  with torch.no_grad():
    np.testing.assert_allclose(ours, head(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_udi_extracted_backbone_keeps_its_cross_attention(tmp_path, capsys):
  """UDI's extract_backbone_weights output: 'backbone.<ViT key>' beside 'attn.*' and
  'norm1.*' (its teacher with the first 'backbone.' cut off)."""
  ckpt, _ = make_layout("udi_full", TINY, grid=4)
  extracted = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items()
               if k.startswith("backbone.")}
  full, _ = convert_file(tmp_path, ckpt, name="full")
  params, spec = convert_file(tmp_path, extracted, name="extracted")
  assert spec.source_format == "udi" and spec.num_prefix == 2 and "head" not in params
  jax.tree.map(np.testing.assert_array_equal, params["backbone"], full["backbone"])
  jax.tree.map(np.testing.assert_array_equal, params["cross_attention"], full["cross_attention"])
  extracted["extra.weight"] = torch.zeros(3)
  code, err = run_cli(tmp_path, extracted, capsys=capsys)
  assert code == 2 and "unknown key extra.weight" in err


def test_ibot_training_checkpoint_leaves_out_the_patch_head(tmp_path, capsys):
  """iBOT's training checkpoint stores its patch head as head.last_layer2 (the
  same module as last_layer when the head is shared); GLARE has one head."""
  vit = tv.randomize(tv.ViT(**{k: TINY[k] for k in ("d", "depth", "heads", "mlp")},
                            num_prefix=1, grid=4), 0)
  head = tv.randomize(tv.Head(TINY["d"], k=32, hidden=16, bottleneck=8), 1)
  sd = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
  sd.update({f"head.{k}": v for k, v in head.state_dict().items()})
  sd.update({f"head.last_layer2.{k}": v for k, v in head.last_layer.state_dict().items()})
  sd["backbone.masked_embed"] = torch.zeros(1, TINY["d"])
  src = tmp_path / "ibot.pth"
  torch.save({"teacher": sd, "student": sd, "epoch": 3, "optimizer": {}}, src)
  assert convert.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 0
  notes = capsys.readouterr().out
  assert "format ibot, teacher" in notes and "iBOT's patch head (2 tensors, last_layer2)" in notes
  assert "left out: the checkpoint's epoch, optimizer, student" in notes
  params, spec = load.load_converted(tmp_path / "out")
  assert spec.source_format == "ibot" and spec.mask_token and spec.head_dim_out == 32
  x = np.random.default_rng(0).normal(size=(2, TINY["d"])).astype(np.float32)
  with torch.no_grad():
    want = head(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ProjectionHead(32, 16, 8, 3).apply({"params": params["head"]}, x),
                             want, atol=1e-5)


# ---------------------------------------------------------------------------
# Errors.

def tiny_flat():
  vit = tv.randomize(tv.ViT(**{k: TINY[k] for k in ("d", "depth", "heads", "mlp")},
                            num_prefix=1, grid=4), 0)
  return tv.flat(vit)


def run_cli(tmp_path, ckpt, *extra, capsys):
  src = tmp_path / "bad.pth"
  if ckpt is not None:
    torch.save(ckpt, src)
  code = convert.main(["--src", str(src), "--out", str(tmp_path / "out"), *extra])
  return code, capsys.readouterr().err


def test_truncated_file(tmp_path, capsys):
  src = tmp_path / "bad.pth"
  torch.save(tiny_flat(), src)
  data = src.read_bytes()
  src.write_bytes(data[: len(data) // 2])
  code, err = run_cli(tmp_path, None, capsys=capsys)
  assert code == 2 and str(src) in err and "truncated or corrupt" in err
  src.write_bytes(b"not a checkpoint" * 10)
  code, err = run_cli(tmp_path, None, capsys=capsys)
  assert code == 2 and str(src) in err and "a text file, not a PyTorch checkpoint" in err
  assert not (tmp_path / "out").exists()


def one_error_line(err):
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.mark.parametrize("content", ["garbage", "empty", "text", "zip", "half"])
def test_files_that_are_no_checkpoint_are_one_error_line(content, tmp_path, capsys):
  src = tmp_path / "bad.pth"
  torch.save(tiny_flat(), src)
  data = {"garbage": np.random.default_rng(0).bytes(3000), "empty": b"",
          "text": "model: vit_small\nlr: 0.1\n".encode(), "zip": b"PK\x03\x04" + bytes(60),
          "half": src.read_bytes()[:4000]}[content]
  src.write_bytes(data)
  code, err = run_cli(tmp_path, None, capsys=capsys)
  line = one_error_line(err)
  assert code == 2 and str(src) in line and "Traceback" not in err
  assert "weights_only" not in line and "trust" not in line   # no nudge towards unpickling


@pytest.mark.parametrize("ckpt, says", [
    ({"teacher": "not a network"}, "'teacher' is a str, expected a dict of tensors"),
    ({"state_dict": [1, 2]}, "'state_dict' is a list"),
    ({0: 1, 1: 2}, "keys that are not names: [0, 1]"),
    ({"patch_embed.proj.weight": "abc", "pos_embed": "xyz"}, "not a checkpoint layout"),
    ({"student": {"backbone.pos_embed": 3}}, "not a checkpoint layout"),
    ([1, 2, 3], "expected a dict of tensors, got list"),
])
def test_wrong_shaped_dicts_are_one_error_line(ckpt, says, tmp_path, capsys):
  code, err = run_cli(tmp_path, ckpt, "--trust-pickle", capsys=capsys)
  line = one_error_line(err)
  assert code == 2 and "bad.pth" in line and says in line


class RunsCode:
  """A pickle whose __reduce__ would run a shell command when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickle_that_would_run_code_is_refused_not_run(zipped, tmp_path, capsys):
  marker = tmp_path / "code_ran"
  src = tmp_path / "bad.pth"
  ckpt = {f"backbone.{k}": v for k, v in tiny_flat().items()}
  ckpt = {"teacher": ckpt, "args": RunsCode(marker)}
  if zipped:
    torch.save(ckpt, src)
  else:
    with open(src, "wb") as f:             # a plain pickle (no tensors: they need torch's)
      pickle.dump({"teacher": {}, "args": RunsCode(marker)}, f, protocol=2)
  code, err = run_cli(tmp_path, None, capsys=capsys)
  line = one_error_line(err)
  assert code == 2 and not marker.exists()
  assert re.search(r"bad\.pth: refused: the file needs GLOBAL (posix|os|nt)\.system to load, "
                   r"which could run code; only use --trust-pickle for files you trust$", line)
  assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path, capsys):
  code, err = run_cli(tmp_path, None, capsys=capsys)
  assert code == 2 and "no such file" in err


def test_missing_unknown_and_mismatched_keys(tmp_path, capsys):
  sd = tiny_flat()
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.0.ls1.gamma"] = torch.ones(64)
  sd["blocks.0.attn.proj.weight"] = torch.ones(64, 65)
  code, err = run_cli(tmp_path, sd, capsys=capsys)
  assert code == 2 and "3 problem(s)" in err
  assert "missing key backbone:blocks.1.mlp.fc2.bias (expected shape (64,))" in err
  assert "unknown key backbone:blocks.0.ls1.gamma" in err
  assert ("shape mismatch backbone:blocks.0.attn.proj.weight: got (64, 65), expected (64, 64)"
          in err)
  assert not (tmp_path / "out").exists()
  code, _ = run_cli(tmp_path, sd, "--allow-missing", capsys=capsys)
  assert code == 0
  params, _ = load.load_converted(tmp_path / "out")
  assert "bias" not in params["backbone"]["block_1"]["mlp"]["fc2"]
  assert "kernel" not in params["backbone"]["block_0"]["attn"]["proj"]


def test_refuses_non_allowed_globals(tmp_path, capsys):
  sd = {f"backbone.{k}": v for k, v in tiny_flat().items()}
  ckpt = {"teacher": sd, "student": sd, "args": Config(lr=1.0)}
  code, err = run_cli(tmp_path, ckpt, capsys=capsys)
  assert code == 2 and "refused: the file needs GLOBAL test_convert.Config" in err
  code, _ = run_cli(tmp_path, ckpt, "--trust-pickle", capsys=capsys)
  assert code == 0


def test_allows_argparse_namespace(tmp_path, capsys):
  sd = {f"backbone.{k}": v for k, v in tiny_flat().items()}
  code, err = run_cli(tmp_path, {"teacher": sd, "args": argparse.Namespace(a=1)},
                      capsys=capsys)
  assert code == 0, err


def test_udi_head_copies_must_agree(tmp_path, capsys):
  ckpt, _ = make_layout("udi_full", TINY, grid=4)
  ckpt["teacher"]["head.2.mlp.0.bias"] = ckpt["teacher"]["head.2.mlp.0.bias"] + 1
  code, err = run_cli(tmp_path, ckpt, capsys=capsys)
  assert code == 2 and "head.0 and head.2 differ" in err and "mlp.0.bias" in err


def test_prefix_rows_must_agree(tmp_path, capsys):
  sd = tiny_flat()
  sd["cls_token"] = torch.zeros(1, 2, 64)  # pos_embed has one prefix row
  code, err = run_cli(tmp_path, sd, capsys=capsys)
  assert code == 2 and "cls_token has 2 rows" in err


def test_refuses_to_overwrite(tmp_path, capsys):
  assert run_cli(tmp_path, tiny_flat(), capsys=capsys)[0] == 0
  code, err = run_cli(tmp_path, tiny_flat(), capsys=capsys)
  assert code == 2 and "--overwrite" in err
  assert run_cli(tmp_path, tiny_flat(), "--overwrite", capsys=capsys)[0] == 0


def test_heads_that_do_not_fit_are_named(tmp_path, capsys):
  sd = {f"backbone.{k}": v for k, v in tiny_flat().items()}
  head = tv.Head(TINY["d"], k=32, hidden=16, bottleneck=8).state_dict()
  no_mlp = dict(sd, **{f"head.{k}": v for k, v in head.items() if k.startswith("last_layer")})
  code, err = run_cli(tmp_path, {"teacher": no_mlp}, capsys=capsys)
  assert code == 2 and "bad.pth" in err and "the head has no Linear weights" in err
  bn = dict(sd, **{f"head.{k}": v for k, v in head.items()})
  bn["head.mlp.1.running_mean"] = torch.zeros(16)
  code, err = run_cli(tmp_path, {"teacher": bn}, capsys=capsys)
  assert code == 2 and "bad.pth" in err and "BatchNorm" in err
  flat = tiny_flat()
  flat["patch_embed.proj.weight"] = flat["patch_embed.proj.weight"].reshape(64, -1)
  code, err = run_cli(tmp_path, flat, capsys=capsys)
  assert code == 2 and "expected a convolution" in err


def test_unrecognised_layout(tmp_path, capsys):
  code, err = run_cli(tmp_path, {"weights": torch.zeros(3)}, capsys=capsys)
  assert code == 2 and "unrecognised checkpoint layout" in err


class Config:
  """A custom class in a pickle: not on the allow-list."""

  def __init__(self, lr):
    self.lr = lr
