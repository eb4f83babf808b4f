"""Merging converted weights into freshly initialised parameters (models/load.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_vit as tv  # noqa: E402

from glare_jax.configs.common import pretrain_config  # noqa: E402
from glare_jax.models import build_models, init_params, load, vit_from_config  # noqa: E402
from glare_jax.models.vit import Adapter, size_kwargs  # noqa: E402

TINY_HEAD = dict(k=256, hidden=128, bottleneck=32)  # = the ':tiny' config's head


def tiny_config(**model):
  c = pretrain_config("loveda", "tiny")
  c.model.update(model)
  return c


def fresh_params(config):
  """Parameters shaped as init_params makes them: random NumPy values, with freshly
  initialised adapters (a real `Adapter.init`, zero up-projection). Initialising the
  whole model would compile every random initialiser, slow on CPU."""
  models = build_models(config)
  shapes = jax.eval_shape(lambda: init_params(models, jax.random.key(1), config))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  mc = config.model
  if mc.adapter_mode != "none":
    adapter = Adapter(mc.adapter_dim, mc.adapter_scale, with_norm=mc.adapter_mode == "parallel")
    width = size_kwargs(mc.variant)["width"]
    fresh = adapter.init(jax.random.key(2), jnp.zeros((1, 1, width)))["params"]
    for name, block in params["backbone"].items():
      if name.startswith("block_"):
        block["adapter"] = fresh
  return params


@pytest.fixture(scope="module")
def udi_tiny(tmp_path_factory):
  """A tiny UDI training checkpoint (backbone, head, cross-attention), converted."""
  ckpt, mods = tv.make_layout("udi_full", tv.TINY, grid=4, head=TINY_HEAD)
  params, spec = tv.convert_file(tmp_path_factory.mktemp("udi"), ckpt)
  return params, spec, mods


@functools.cache
def _jitted(model):
  return jax.jit(model.apply)


def forward(model, params, images):
  return _jitted(model)({"params": params}, images)


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_merge_fills_everything_and_keeps_fresh_adapters(udi_tiny):
  converted, spec, mods = udi_tiny
  config = tiny_config()
  fresh = fresh_params(config)
  merged, notes = load.merge_converted(fresh, converted, spec)
  assert jax.tree.structure(merged) == jax.tree.structure(fresh)
  for part in ("head", "cross_attention"):
    assert leaves_equal(merged[part], converted[part])
  for path, x in jax.tree_util.tree_leaves_with_path(merged["backbone"]):
    keys = [k.key for k in path]
    if "adapter" in keys:
      ref = fresh["backbone"]
    else:
      ref = converted["backbone"]
    for k in keys:
      ref = ref[k]
    np.testing.assert_array_equal(x, ref, err_msg="/".join(keys))
  assert any("kept fresh: 8 adapter arrays" in n for n in notes), notes
  # Fresh adapters change nothing: the student equals the torch teacher.
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  tokens, aux = forward(vit_from_config(config.model), merged["backbone"], images)
  ref_tokens, ref_attn = tv.torch_forward(mods["vit"], images)
  np.testing.assert_allclose(tokens, ref_tokens, atol=1e-5)
  np.testing.assert_allclose(aux["attn"], ref_attn, atol=1e-5)


def test_head_size_mismatch_lists_keys(udi_tiny):
  converted, spec, _ = udi_tiny
  config = tiny_config()
  config.head.out_dim = 128
  fresh = fresh_params(config)
  with pytest.raises(load.CheckpointMismatch) as e:
    load.merge_converted(fresh, converted, spec)
  msg = str(e.value)
  assert "head/weight_v: checkpoint (32, 256), model (32, 128)" in msg
  assert "head/weight_g: checkpoint (256,), model (128,)" in msg
  assert "K = 256" in msg and "backbone/" not in msg
  merged, notes = load.merge_converted(fresh, converted, spec, parts=("backbone",))
  assert leaves_equal(merged["head"], fresh["head"])
  assert "head: in the checkpoint, not loaded (not in parts)" in notes
  # A model without a head (segmentation: backbone + FPN) takes the backbone only.
  merged, notes = load.merge_converted({"backbone": fresh["backbone"]}, converted, spec)
  assert set(merged) == {"backbone"}
  assert "head: in the checkpoint, the model has none; not loaded" in notes


def test_prefix_mismatch_and_drop_prefix(udi_tiny):
  converted, spec, _ = udi_tiny
  with pytest.raises(load.CheckpointMismatch, match="2 prefix token.*the model 1"):
    load.merge_converted(fresh_params(tiny_config(num_prefix=1)), converted, spec)
  fresh = fresh_params(tiny_config(num_prefix=0))
  merged, notes = load.merge_converted(fresh, converted, spec, drop_prefix=True)
  assert "cls_token" not in merged["backbone"]
  np.testing.assert_array_equal(merged["backbone"]["pos_embed"],
                                converted["backbone"]["pos_embed"][:, 2:])
  assert any("dropped 2 prefix row(s)" in n for n in notes)
  with pytest.raises(load.CheckpointMismatch, match="drop_prefix needs a model without"):
    load.merge_converted(fresh_params(tiny_config()), converted, spec, drop_prefix=True)


@pytest.mark.parametrize("mode", ["dino", "size"])
def test_pos_grid_resampling(udi_tiny, mode):
  """A model with a 6x6 stored grid at 96 px equals the 4x4 checkpoint run at 96 px."""
  converted, spec, mods = udi_tiny
  config = tiny_config(pos_grid=6, pos_resize=mode, adapter_mode="none")
  merged, notes = load.merge_converted(fresh_params(config), converted, spec, pos_resize=mode)
  assert merged["backbone"]["pos_embed"].shape == (1, 2 + 36, 64)
  assert any("4x4 -> 6x6" in n for n in notes)
  images = np.random.default_rng(1).normal(size=(1, 96, 96, 3)).astype(np.float32)
  ours, _ = forward(vit_from_config(config.model), merged["backbone"], images)
  source, _ = forward(load.vit_from_spec(spec, pos_resize=mode), converted["backbone"], images)
  np.testing.assert_allclose(ours, source, atol=1e-5)
  ref, _ = tv.torch_forward(mods["vit"], images, mode)
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_width_mismatch(udi_tiny):
  converted, spec, _ = udi_tiny
  config = tiny_config()
  fresh = fresh_params(config)
  fresh["backbone"]["norm"]["scale"] = np.ones(65, np.float32)
  with pytest.raises(load.CheckpointMismatch, match=r"backbone/norm/scale: checkpoint \(64,\)"):
    load.merge_converted(fresh, converted, spec)


def test_mask_token(tmp_path):
  ckpt, mods = tv.make_layout("ibot", tv.TINY, grid=4)
  converted, spec = tv.convert_file(tmp_path, ckpt)
  merged, _ = load.merge_converted(fresh_params(tiny_config(num_prefix=1, use_mask_token=True)),
                                   converted, spec)
  np.testing.assert_array_equal(merged["backbone"]["mask_token"], mods["masked_embed"][0])
  merged, notes = load.merge_converted(fresh_params(tiny_config(num_prefix=1)), converted, spec)
  assert "mask_token" not in merged["backbone"]
  assert any("mask_token: the model has none" in n for n in notes)


def test_not_a_converted_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    load.load_converted(tmp_path)


def test_more_prefix_tokens_than_the_checkpoint_start_fresh(udi_tiny):
  """GLARE (needs [CLS]) on a prefix-free FLSL-style backbone: extra prefix rows
  stay fresh, the patch rows and blocks come from the checkpoint."""
  converted, spec, _ = udi_tiny
  fresh = fresh_params(tiny_config(num_prefix=0))
  no_prefix, _ = load.merge_converted(fresh, converted, spec, drop_prefix=True)
  flsl_spec = spec.__class__(**{**spec.__dict__, "num_prefix": 0})
  target = fresh_params(tiny_config(num_prefix=1))
  merged, notes = load.merge_converted(target, {"backbone": no_prefix["backbone"]}, flsl_spec,
                                       parts=("backbone",))
  pos = merged["backbone"]["pos_embed"]
  np.testing.assert_array_equal(pos[:, 1:], no_prefix["backbone"]["pos_embed"])
  np.testing.assert_array_equal(pos[:, :1], target["backbone"]["pos_embed"][:, :1])
  np.testing.assert_array_equal(merged["backbone"]["cls_token"], target["backbone"]["cls_token"])
  assert any("extra 1 start fresh" in n for n in notes)
