"""A few optimisation steps of every objective on a tiny model.

The crops are rendered from one smooth random image with the boxes and flips the
batch reports, so correspondences and regions see consistent views. A plain optax
AdamW trains what the 'adapters' preset trains (adapters, head, cross-attention);
the loss must go down (same teacher and centres before and after) and frozen
parameters must not move.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glare_jax.configs import common as cfgs
from glare_jax.models import build_models, init_params
from glare_jax.objectives import build_objective, ema_momentum, ema_update
from glare_jax.train import optim

# Tests compile big graphs once and run them a few times: skip LLVM's optimiser.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

METRICS = {
    "glare": {"loss/glob", "loss/reg", "loss/loc1", "loss/loc2", "teacher_temp", "reg/kept",
              "loc1/distorted", "loc2/matched"},
    "udi": {"loss/cls", "loss/cls_plus", "loss/patch", "teacher_temp", "patch/matched"},
    "flsl": {"loss/meanshift", "loss/kmeans", "loss/vmr", "teacher_temp"},
    "dino": {"loss/glob", "teacher_temp"},
}


def render_nearest(image, box, flip, size):
  x0, y0, x1, y1 = box
  u = np.arange(size) + 0.5
  ys = np.clip(np.floor(y0 + u * (y1 - y0) / size), 0, image.shape[0] - 1).astype(int)
  xs = np.clip(np.floor(x0 + u * (x1 - x0) / size), 0, image.shape[1] - 1).astype(int)
  out = image[ys][:, xs]
  return out[:, ::-1] if flip else out


def make_batch(config, batch_size=2, seed=0):
  rng = np.random.default_rng(seed)
  g, nl = config.crops.num_global, config.crops.num_local
  sg, sl = config.crops.global_size, config.crops.local_size
  coarse = rng.normal(size=(8, 8, 3))
  image = np.kron(coarse, np.ones((16, 16, 1))) + 0.3 * rng.normal(size=(128, 128, 3))
  crops_g, crops_l, boxes, flips = [], [], [], []
  for _ in range(batch_size):
    bx = [np.array([0, 0, 96, 96]) + rng.integers(0, 8, 4), np.array([32, 16, 128, 112]) - rng.integers(0, 8, 4)]
    for _ in range(nl):
      x0, y0 = rng.integers(0, 96, 2)
      s = rng.integers(24, 40)
      bx.append(np.array([x0, y0, x0 + s, y0 + s]))
    fl = rng.random(g + nl) < 0.5
    crops_g.append([render_nearest(image, bx[i], fl[i], sg) for i in range(g)])
    crops_l.append([render_nearest(image, bx[g + i], fl[g + i], sl) for i in range(nl)])
    boxes.append(np.stack(bx))
    flips.append(fl)
  return {"global_crops": jnp.asarray(np.array(crops_g), jnp.float32),
          "local_crops": jnp.asarray(np.array(crops_l), jnp.float32),
          "boxes": jnp.asarray(np.array(boxes), jnp.float32),
          "flips": jnp.asarray(np.array(flips))}


def labels(params, config):
  """'train' / 'freeze' per leaf, as pre-training decides (config.optim, config.head)."""
  return optim.param_labels(params, optim.param_rules(
      config.optim, norm_last_layer=config.head.norm_last_layer))


@pytest.fixture(scope="module")
def tiny_params():
  """Parameters of the tiny model, shared by every objective (same architecture)."""
  config = cfgs.pretrain_config("loveda", "tiny")
  models = build_models(config)
  return jax.jit(lambda k: init_params(models, k, config), compiler_options=FAST_COMPILE)(
      jax.random.key(0))


@pytest.mark.parametrize("name", [pytest.param("glare", marks=pytest.mark.slow), "udi", "flsl",
                                  "dino"])
def test_objective_trains(name, tiny_params):
  config = cfgs.pretrain_config("loveda", f"tiny,objective={name}")
  models = build_models(config)
  params = tiny_params
  objective = build_objective(config, models, steps_per_epoch=4)
  batch = make_batch(config)
  lab = labels(params, config)
  assert lab["head"]["weight_g"] == "freeze"     # head.norm_last_layer (DINO's default)
  tx = optax.multi_transform({"train": optax.adamw(3e-3, weight_decay=0.0),
                              "freeze": optax.set_to_zero()}, lab)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step_fn(sp, tp, opt_state, centres, rng, step):
    (loss, (metrics, new_c)), grads = jax.value_and_grad(objective, has_aux=True)(
        sp, tp, centres, batch, rng, step)
    updates, opt_state = tx.update(grads, opt_state, sp)
    sp = optax.apply_updates(sp, updates)
    tp = ema_update(tp, sp, ema_momentum(step, 100, 0.996, 1.0))
    return sp, tp, opt_state, new_c, loss, metrics

  centres0 = objective.init_centres()
  sp, tp, opt_state, centres = params, params, tx.init(params), centres0
  rng = jax.random.key(1)
  losses = []
  for step in range(6):
    sp, tp, opt_state, centres, loss, metrics = step_fn(sp, tp, opt_state, centres, rng, step)
    losses.append(float(loss))
    assert set(metrics) == METRICS[name]
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert np.isfinite(losses).all()
  # Same teacher, centres and randomness: the trained student has the lower loss.
  *_, loss_after, _ = step_fn(sp, params, opt_state, centres0, rng, 0)
  assert float(loss_after) < losses[0] - 1e-3, (losses, float(loss_after))

  differs = lambda x, y: jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), x, y)
  moved, t_moved = differs(params, sp), differs(params, tp)
  for (path, m), tm, rule in zip(jax.tree_util.tree_leaves_with_path(moved),
                                 jax.tree.leaves(t_moved), jax.tree.leaves(lab)):
    if rule == "freeze":
      assert not m and not tm, jax.tree_util.keystr(path)
  assert moved["backbone"]["block_1"]["adapter"]["up"]["kernel"]
  assert moved["head"]["weight_v"]
  if name in ("glare", "udi"):
    assert moved["cross_attention"]["qkv"]["kernel"]
  # The teacher follows by EMA; centres moved off zero.
  assert not np.allclose(tp["head"]["weight_v"], params["head"]["weight_v"])
  for c in centres.values():
    assert np.abs(np.asarray(c)).max() > 0


def test_glare_mask_token_and_random_regions(tiny_params):
  """Table 6 'mask' and Table 8 'random' rows: the learned [MASK] token gets a gradient."""
  config = cfgs.pretrain_config("loveda", "tiny,patch_aug=mask_random,regions=random3")
  models = build_models(config)
  params = dict(tiny_params)
  params["backbone"] = dict(params["backbone"], mask_token=jnp.zeros(64))  # use_mask_token=True
  objective = build_objective(config, models, steps_per_epoch=4)
  grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
  (loss, (metrics, _)), grads = grad_fn(params, params, objective.init_centres(), make_batch(config),
                                        jax.random.key(3), 0)
  assert np.isfinite(float(loss))
  assert float(metrics["loc1/distorted"]) > 0
  assert np.abs(np.asarray(grads["backbone"]["mask_token"])).max() > 0
  assert float(metrics["reg/kept"]) > 0


def test_config_mismatch_is_reported():
  config = cfgs.pretrain_config("loveda", "tiny,patch_aug=mask_block")
  config.model.use_mask_token = False
  with pytest.raises(ValueError, match="use_mask_token"):
    build_objective(config, build_models(config), steps_per_epoch=1)
  config = cfgs.pretrain_config("loveda", "tiny,objective=udi")
  config.udi.num_heads = 6
  with pytest.raises(ValueError, match="udi.num_heads"):
    build_objective(config, build_models(config), steps_per_epoch=1)
  config.objective = "byol"
  with pytest.raises(ValueError, match="config.objective"):
    build_objective(config, build_models(config), steps_per_epoch=1)
