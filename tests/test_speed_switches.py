"""The speed switches compute the same function. The ViT's scanned blocks, fused
attention (jax.nn.dot_product_attention) and rematerialisation against the plain
unrolled model with the same parameters, in the forward pass and the gradients,
stochastic depth on; bfloat16 compute close to float32, in the ViT and through the
whole GLARE objective."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.configs import common as cfgs
from glare_jax.models import build_models, init_params
from glare_jax.models.vit import ViT, size_kwargs
from glare_jax.objectives import build_objective

# Tests compile several graphs and run each once: skip LLVM's optimiser.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
KW = dict(size_kwargs("tiny_test"), depth=3, pos_grid=4, num_prefix=2, adapter_dim=16,
          drop_path=0.2)


@functools.cache
def params_and_images():
  model = ViT(**KW)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 48, 64, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  # every weight non-zero, adapters included (a fresh W_up is zero)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32),
                        shapes)
  return params, images


@functools.cache
def forward_and_grad(**switches):
  model = ViT(**KW, **switches)

  def loss(params, images, train):
    tokens, aux = model.apply({"params": params}, images, train=train,
                              rngs={"dropout": jax.random.key(7)})
    return jnp.sum(tokens.astype(jnp.float32) ** 2) / tokens.size, (tokens, aux)

  def run(params, images, train):
    (_, (tokens, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params, images, train)
    return tokens, aux["blocks"], aux["attn"], grads

  return jax.jit(run, static_argnums=2, compiler_options=FAST_COMPILE)


def assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("switches, train", [
    (dict(scan_blocks=True, attention="xla", remat=True,
          remat_policy="dots_with_no_batch_dims_saveable"), True),
    (dict(scan_blocks=True, attention="xla", remat=True), False),
    (dict(attention="xla", remat=True), True),   # unrolled: nn.remat blocks
])
def test_switch_computes_the_same_function(switches, train):
  params, images = params_and_images()
  ref = forward_and_grad()(params, images, train)
  out = forward_and_grad(**switches)(params, images, train)
  assert out[2].shape == (3, 2, 2 + 12, 2 + 12)  # the last block's probabilities, always
  assert_trees_close(out, ref, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_is_on_in_training():
  params, images = params_and_images()
  evaluated = forward_and_grad()(params, images, False)[0]
  trained = forward_and_grad()(params, images, True)[0]
  assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 1e-2


def test_scanned_model_keeps_the_per_block_parameter_layout():
  images = jnp.zeros((1, 32, 32, 3))
  tree = lambda m: jax.tree.map(lambda s: (s.shape, s.dtype),
                                jax.eval_shape(m.init, jax.random.key(0), images))
  unrolled = tree(ViT(**KW))
  assert tree(ViT(**KW, scan_blocks=True, remat=True)) == unrolled
  assert {f"block_{i}" for i in range(3)} <= set(unrolled["params"])


def test_bfloat16_compute_is_close_to_float32():
  params, images = params_and_images()
  ref = forward_and_grad()(params, images, False)
  out = forward_and_grad(dtype=jnp.bfloat16)(params, images, False)  # [0] tokens, [1] blocks
  assert out[0].dtype == jnp.bfloat16 and out[1][-1].dtype == jnp.float32  # residual in fp32
  assert out[2].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)


@pytest.mark.slow
def test_auto_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
  # As if on a GPU: 'auto' asks cuDNN, which refuses here (no cuDNN on a CPU);
  # the model then computes XLA's attention instead of failing.
  from glare_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  params, images = params_and_images()
  want = ViT(**KW, attention="xla", dtype=jnp.bfloat16).apply({"params": params}, images)[0]
  asked = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(vit_lib.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(vit_lib.jax.nn, "dot_product_attention", spy)
  got = ViT(**KW, attention="auto", dtype=jnp.bfloat16).apply({"params": params}, images)[0]
  assert asked[:2] == ["cudnn", "xla"]          # the first block: refused, then XLA
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_bad_switches_are_named():
  params, images = params_and_images()
  with pytest.raises(ValueError, match="attention implementation 'flash'"):
    jax.eval_shape(ViT(**KW, attention="flash").apply, {"params": params}, images)
  with pytest.raises(ValueError, match="remat_policy 'all'"):
    jax.eval_shape(ViT(**KW, remat=True, remat_policy="all").apply, {"params": params}, images)


@functools.cache
def glare_value_and_grad(dtype="float32", head_chunk_size=0):
  """GLARE's loss, metrics, new centres and gradients on test_objectives' batch of 4,
  random weights (the same for every variant). Random regions: attention-aware
  starts are an argmax that bf16 rounding may move (another, equally valid draw)."""
  from test_objectives import make_batch  # pylint: disable=g-import-not-at-top
  config = cfgs.pretrain_config("loveda", "tiny,regions=random3")
  config.model.dtype = dtype
  config.glare.head_chunk_size = head_chunk_size
  models = build_models(config)
  objective = build_objective(config, models, steps_per_epoch=4)
  shapes = jax.eval_shape(lambda k: init_params(models, k, config), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32),
                        shapes)
  fn = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
  (loss, (metrics, centres)), grads = fn(params, params, objective.init_centres(),
                                         make_batch(config, batch_size=4), jax.random.key(1), 3)
  return loss, metrics, centres, grads


@pytest.mark.slow
def test_glare_head_in_chunks_gives_the_same_step():
  """head_chunk_size=2 (two chunks, each differentiated as it is computed): the same
  loss, terms, diagnostics, centres and gradients as the whole batch at once."""
  ref = glare_value_and_grad()
  out = glare_value_and_grad(head_chunk_size=2)
  assert set(out[1]) == set(ref[1])
  assert_trees_close(out, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_glare_objective_is_close_to_float32():
  """model.dtype='bfloat16' through the whole GLARE objective: loss, terms and
  gradients agree with float32 to bf16 precision; loss, terms and centres stay
  float32."""
  l32, m32, c32, g32 = glare_value_and_grad()
  l16, m16, c16, g16 = glare_value_and_grad("bfloat16")
  assert l16.dtype == jnp.float32 and all(c.dtype == jnp.float32 for c in c16.values())
  for k in ("loss/glob", "loss/reg", "loss/loc1", "loss/loc2"):
    assert m16[k].dtype == jnp.float32
    np.testing.assert_allclose(m16[k], m32[k], rtol=1e-3, err_msg=k)  # seen: <= 1e-4
  np.testing.assert_allclose(l16, l32, rtol=1e-3)
  for k in c32:  # seen: <= 2.3e-3
    np.testing.assert_allclose(c16[k], c32[k], atol=1e-2 * np.abs(c32[k]).max(), err_msg=k)
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  a, b = flat(g16), flat(g32)
  assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)  # seen: 5e-3
