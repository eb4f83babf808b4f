"""The ViT: position-grid resampling against torch, a block against NumPy for every
adapter mode, fresh adapters leave the network bit-identical, non-square inputs
against the torch reference, and the mask token."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from glare_jax.models.vit import LN_EPS, Adapter, Block, ViT, resize_pos_grid, size_kwargs

TINY = dict(size_kwargs("tiny_test"), pos_grid=4, num_prefix=2)


@functools.cache
def _init():
  """Random backbone weights with freshly initialised adapters (a real `Adapter.init`;
  initialising the whole ViT would compile every random initialiser, slow on CPU)."""
  model = ViT(**TINY, adapter_mode="sequential", adapter_dim=16, use_mask_token=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  adapter = Adapter(16, 0.1).init(jax.random.key(1), jnp.zeros((1, 1, 64)))["params"]
  for name in params:
    if name.startswith("block_"):
      params[name]["adapter"] = adapter
  return params


def tiny_params(adapter_mode="sequential", use_mask_token=False):
  """`_init` adapted per mode: the parallel adapter adds its LayerNorm (ones / zeros)."""
  params = {k: v for k, v in _init().items() if use_mask_token or k != "mask_token"}
  for name, block in params.items():
    if not name.startswith("block_"):
      continue
    block = params[name] = dict(block)
    if adapter_mode == "none":
      del block["adapter"]
    elif adapter_mode == "parallel":
      block["adapter"] = dict(block["adapter"], norm=dict(scale=jnp.ones(64), bias=jnp.zeros(64)))
  return params


@functools.cache
def _jitted_apply(**kw):
  return jax.jit(ViT(**TINY, adapter_dim=16, **kw).apply)


def run(params, images, patch_mask=None, **kw):
  return _jitted_apply(**kw)({"params": params}, images, patch_mask=patch_mask)


@pytest.mark.parametrize("mode", ["dino", "size"])
@pytest.mark.parametrize("out_hw", [(6, 6), (6, 9), (14, 9)])
def test_resize_pos_grid_matches_torch(mode, out_hw):
  torch = pytest.importorskip("torch")
  grid = np.random.default_rng(0).normal(size=(14, 14, 16)).astype(np.float32)
  ours = np.asarray(resize_pos_grid(jnp.asarray(grid), out_hw, mode))
  t = torch.from_numpy(grid).permute(2, 0, 1)[None]
  h, w = out_hw
  if mode == "dino":
    ref = torch.nn.functional.interpolate(t, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14),
                                          mode="bicubic", align_corners=False)
  else:
    ref = torch.nn.functional.interpolate(t, size=out_hw, mode="bicubic", align_corners=False)
  ref = ref[0].permute(1, 2, 0).numpy()
  assert ours.shape == ref.shape == (h, w, 16)
  np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_resize_pos_grid_identity_and_bad_mode():
  grid = jnp.asarray(np.random.default_rng(0).normal(size=(14, 14, 8)), jnp.float32)
  np.testing.assert_array_equal(resize_pos_grid(grid, (14, 14), "dino"), grid)
  with pytest.raises(ValueError, match="unknown pos-embed resize mode"):
    resize_pos_grid(grid, (6, 6), "bilinear")


# ---------------------------------------------------------------------------
# One block against NumPy.

def np_ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_block(x, p, heads, mode, scale):
  b, t, d = x.shape
  hd = d // heads
  qkv = np_dense(np_ln(x, p["norm1"]), p["attn"]["qkv"]).reshape(b, t, 3, heads, hd)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, T, hd]
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  y = np_dense((attn @ v).transpose(0, 2, 1, 3).reshape(b, t, d), p["attn"]["proj"])

  def adapter(z):
    if mode == "parallel":
      z = np_ln(z, p["adapter"]["norm"])
    return scale * np_dense(np.maximum(np_dense(z, p["adapter"]["down"]), 0), p["adapter"]["up"])

  if mode == "sequential":
    y = y + adapter(y)
  x = x + y
  h = np_dense(np_ln(x, p["norm2"]), p["mlp"]["fc1"])
  z = np_dense(0.5 * h * (1 + erf(h / math.sqrt(2))), p["mlp"]["fc2"])
  if mode == "parallel":
    z = z + adapter(x)
  return x + z, attn


@pytest.mark.parametrize("mode", ["none", "sequential", "parallel"])
def test_block_matches_numpy(mode):
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  block = Block(num_heads=2, mlp_dim=32, adapter_mode=mode, adapter_dim=8, adapter_scale=0.1)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(1)  # non-zero everything, including the adapter's W_up
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.3, shapes)
  out, attn = block.apply({"params": params}, x)
  ref_out, ref_attn = np_block(x.astype(np.float64), params, 2, mode, 0.1)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(attn, ref_attn, atol=1e-6)


# ---------------------------------------------------------------------------
# Adapters, mask token, non-square inputs.

@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_fresh_adapter_is_bit_identical(mode):
  params = tiny_params(mode)
  up = params["block_0"]["adapter"]["up"]
  assert not np.any(up["kernel"]) and not np.any(up["bias"])  # W_up, b_up start at zero
  plain = {k: ({n: v for n, v in p.items() if n != "adapter"} if k.startswith("block_") else p)
           for k, p in params.items()}
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  tokens, aux = run(params, images, adapter_mode=mode)
  ref_tokens, ref_aux = run(plain, images, adapter_mode="none")
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_array_equal(aux["attn"], ref_aux["attn"])
  # ... and a trained (non-zero) W_up does change the output.
  params = jax.tree.map(lambda a: a, params)
  up = params["block_0"]["adapter"]["up"]
  up["kernel"] = jnp.asarray(np.random.default_rng(1).normal(size=up["kernel"].shape) * 10,
                             jnp.float32)
  moved, _ = run(params, images, adapter_mode=mode)
  assert np.abs(np.asarray(moved) - np.asarray(ref_tokens)).max() > 1e-3


def test_mask_token_replaces_patches():
  params = tiny_params("none", use_mask_token=True)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
  mask = np.zeros((1, 16), bool)
  mask[0, 5] = True  # patch row 1, column 1: pixels [16:32, 16:32]
  changed = images.copy()
  changed[0, 16:32, 16:32] = rng.normal(size=(16, 16, 3))
  a, _ = run(params, images, adapter_mode="none", use_mask_token=True, patch_mask=mask)
  b, _ = run(params, changed, adapter_mode="none", use_mask_token=True, patch_mask=mask)
  c, _ = run(params, changed, adapter_mode="none", use_mask_token=True)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(b) - np.asarray(c)).max() > 1e-3
  with pytest.raises(ValueError, match="no mask token"):
    run(tiny_params("none"), images, adapter_mode="none", patch_mask=mask)


@pytest.mark.parametrize("mode", ["dino", "size"])
def test_non_square_input_matches_torch(mode, tmp_path):
  pytest.importorskip("torch")
  import torch_vit as tv
  ckpt, mods = tv.make_layout("udi_backbone", tv.TINY, grid=4)
  params, spec = tv.convert_file(tmp_path, ckpt)
  images = np.random.default_rng(0).normal(size=(2, 48, 96, 3)).astype(np.float32)
  tokens, aux = run(params["backbone"], images, adapter_mode="none", pos_resize=mode)
  ref_tokens, ref_attn = tv.torch_forward(mods["vit"], images, mode)
  assert tokens.shape == (2, 2 + 3 * 6, 64)
  np.testing.assert_allclose(tokens, ref_tokens, atol=1e-4)
  np.testing.assert_allclose(aux["attn"], ref_attn, atol=1e-5)
  assert aux["grid"] == (3, 6) and aux["num_prefix"] == 2
