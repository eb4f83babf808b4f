"""Parameter rules and the pre-training optimizer (train/optim.py) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glare_jax.configs.common import optim_config
from glare_jax.train import optim

WD, B1, B2 = 0.1, 0.9, 0.999


def make_params(seed=0):
  """A small tree with the real naming: backbone (+ adapter), head, cross-attention."""
  rng = np.random.default_rng(seed)
  a = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  dense = lambda i, o: {"kernel": a(i, o), "bias": a(o)}  # noqa: E731
  return {
      "backbone": {
          "cls_token": a(1, 2, 8), "pos_embed": a(1, 6, 8),
          "patch_embed": {"kernel": a(2, 2, 3, 8), "bias": a(8)},
          "block_0": {"norm1": {"scale": a(8), "bias": a(8)}, "attn": {"qkv": dense(8, 24)},
                      "gamma": a(8),  # 1-D, matched by no no_decay pattern
                      "adapter": {"down": dense(8, 4), "up": dense(4, 8)}},
          "norm": {"scale": a(8), "bias": a(8)},
      },
      "head": {"layers_0": dense(8, 16), "weight_v": a(16, 32), "weight_g": a(32)},
      "cross_attention": {"qkv": dense(8, 24), "norm": {"scale": a(8), "bias": a(8)}},
  }


def flat(tree):
  return {optim.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(tree)}


def cfg(**kw):
  c = optim_config()
  c.update(kw)
  return c


def rules(c, norm_last_layer=True):
  """The pre-training rules with config.head.norm_last_layer's default."""
  return optim.param_rules(c, norm_last_layer=norm_last_layer)


def test_labels_adapters_preset_and_rule_order():
  labels = flat(optim.param_labels(make_params(), rules(cfg())))
  train = sorted(k for k, v in labels.items() if v == "train")
  assert train == sorted(
      ["backbone/block_0/adapter/down/kernel", "backbone/block_0/adapter/down/bias",
       "backbone/block_0/adapter/up/kernel", "backbone/block_0/adapter/up/bias",
       "head/layers_0/kernel", "head/layers_0/bias", "head/weight_v",
       "cross_attention/qkv/kernel", "cross_attention/qkv/bias",
       "cross_attention/norm/scale", "cross_attention/norm/bias"])
  # param_rules come first: they override the preset.
  c = cfg(param_rules=((r"backbone/norm/.*", "train"), (r"head/layers_0/.*", "freeze")))
  labels = flat(optim.param_labels(make_params(), rules(c)))
  assert labels["backbone/norm/scale"] == "train" and labels["head/layers_0/kernel"] == "freeze"
  full = flat(optim.param_labels(make_params(), rules(cfg(param_preset="full"))))
  assert [k for k, v in full.items() if v == "freeze"] == ["head/weight_g"]
  # head.norm_last_layer=False: DINO trains g as well (a param_rule still overrides).
  for preset in ("adapters", "full", "head"):
    free = flat(optim.param_labels(make_params(), rules(cfg(param_preset=preset), False)))
    assert free["head/weight_g"] == "train", preset
  c = cfg(param_rules=(("head/weight_g", "train"),))
  assert flat(optim.param_labels(make_params(), rules(c)))["head/weight_g"] == "train"


def test_rule_errors():
  with pytest.raises(ValueError, match="matches no rule"):
    optim.param_labels(make_params(), ((r"head/.*", "train"),))
  with pytest.raises(ValueError, match="must be one of"):
    optim.param_labels(make_params(), ((r".*", "trainable"),))
  with pytest.raises(ValueError, match="unknown optim.param_preset"):
    optim.param_rules(cfg(param_preset="adapter"))


def test_decay_rules():
  """docs/DESIGN.md "Parameters" / DINO's param groups: no decay on biases and 1-D tensors, where
  weight_g and mask_token count as 2-D (their PyTorch shapes [K, 1] and [1, D])."""
  c = cfg()
  params = flat(make_params())
  params["backbone/mask_token"] = np.zeros(8, np.float32)
  got = {k: optim.decays(k, v.ndim, c.no_decay, c.decay_1d) for k, v in params.items()}
  assert sorted(k for k, v in got.items() if v) == sorted(
      ["backbone/patch_embed/kernel", "backbone/block_0/attn/qkv/kernel",
       "backbone/block_0/adapter/down/kernel", "backbone/block_0/adapter/up/kernel",
       "head/layers_0/kernel", "head/weight_v", "cross_attention/qkv/kernel",
       "backbone/cls_token", "backbone/pos_embed", "head/weight_g", "backbone/mask_token"])
  # mmseg's rule (fine-tuning): only the names decide, 1-D weights decay too.
  assert optim.decays("backbone/block_0/gamma", 1, (r".*/bias",), (r".*",))
  assert not optim.decays("backbone/block_0/gamma", 1, (r".*/bias",))


def np_dino_schedule(base, final, epochs, niter, warmup_epochs):
  """DINO's utils.cosine_scheduler, written out in NumPy."""
  warm = np.linspace(0, base, warmup_epochs * niter)
  iters = np.arange(epochs * niter - warmup_epochs * niter)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


def test_schedule_matches_dino():
  c = cfg(warmup_epochs=2)
  _, schedule = optim.build_optimizer(c, make_params(), batch_size=128, steps_per_epoch=7,
                                      num_epochs=6)
  ref = np_dino_schedule(1.5e-4 * 128 / 512, 1e-6, 6, 7, 2)
  got = np.array([schedule(i) for i in range(len(ref))])
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
  assert got.max() == pytest.approx(1.5e-4 / 4, rel=1e-6)


def run_steps(c, params, grads, n, steps_per_epoch=3, norm_last_layer=False):
  """`n` jitted updates; `grads` is one gradient tree or a list, one per step."""
  tx, schedule = optim.build_optimizer(c, params, batch_size=512,
                                       steps_per_epoch=steps_per_epoch, num_epochs=10,
                                       norm_last_layer=norm_last_layer)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  history = [params]
  for i in range(n):
    params, state = step(params, state, grads[i] if isinstance(grads, list) else grads)
    history.append(params)
  return history, state, schedule


def test_one_step_frozen_and_trainable():
  params = make_params()
  grads = make_params(seed=1)
  history, state, _ = run_steps(cfg(freeze_last_layer_epochs=0), params, grads, 2)
  labels = flat(optim.param_labels(params, optim.param_rules(cfg())))
  assert labels["head/weight_g"] == "train"   # build_optimizer's default: no norm_last_layer
  before, after = flat(history[0]), flat(history[2])
  for k, lab in labels.items():
    if lab == "freeze":
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    else:
      assert np.all(after[k] != before[k]), k
  # No optimizer state for frozen parameters: Adam's two moments for trainable ones only.
  trainable = sum(v.size for k, v in before.items() if labels[k] == "train")
  state_floats = sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
  assert state_floats == 2 * trainable


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_held_during_first_epoch(norm_last_layer):
  params = make_params()
  # Different gradients each step, below the clip threshold.
  grads = [jax.tree.map(lambda g: g * 1e-3, make_params(seed=s)) for s in range(1, 5)]
  history, _, schedule = run_steps(cfg(warmup_epochs=0), params, grads, 4, steps_per_epoch=3,
                                   norm_last_layer=norm_last_layer)
  for t in range(1, 4):
    np.testing.assert_array_equal(history[t]["head"]["weight_v"], params["head"]["weight_v"])
    assert np.all(history[t]["head"]["layers_0"]["kernel"]
                  != history[t - 1]["head"]["layers_0"]["kernel"])
  # Step 4 is the last layer's first Adam step (bias correction from 1, as in PyTorch
  # where a parameter without gradient is skipped): m_hat = g, v_hat = g^2.
  v, g = params["head"]["weight_v"].astype(np.float64), np.asarray(grads[3]["head"]["weight_v"])
  lr = float(schedule(3))
  want = v - lr * (g / (np.abs(g) + 1e-8) + WD * v)
  np.testing.assert_allclose(history[4]["head"]["weight_v"], want, rtol=1e-5, atol=1e-9)
  g0 = params["head"]["weight_g"]
  for t in range(1, 4):        # g is part of DINO's last layer: held as well
    np.testing.assert_array_equal(history[t]["head"]["weight_g"], g0)
  if norm_last_layer:          # ... and stays 1 (here: its initial value) for good
    np.testing.assert_array_equal(history[4]["head"]["weight_g"], g0)
  else:                        # ... or trains from step 4, decayed as a 2-D weight
    gg = np.asarray(grads[3]["head"]["weight_g"])
    np.testing.assert_allclose(history[4]["head"]["weight_g"],
                               g0 - lr * (gg / (np.abs(gg) + 1e-8) + WD * g0), rtol=1e-5, atol=1e-9)


def test_adamw_matches_numpy_over_steps():
  """Three AdamW steps of one trainable kernel against a NumPy AdamW (decoupled decay)."""
  params, grads = make_params(), jax.tree.map(lambda g: g * 1e-2, make_params(seed=1))
  history, _, schedule = run_steps(cfg(warmup_epochs=0), params, grads, 3)
  p = params["cross_attention"]["qkv"]["kernel"].astype(np.float64)
  g = np.asarray(grads["cross_attention"]["qkv"]["kernel"], np.float64)
  m = v = 0
  for t in range(1, 4):
    m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
    m_hat, v_hat = m / (1 - B1 ** t), v / (1 - B2 ** t)
    p = p - float(schedule(t - 1)) * (m_hat / (np.sqrt(v_hat) + 1e-8) + WD * p)
    np.testing.assert_allclose(history[t]["cross_attention"]["qkv"]["kernel"], p, rtol=1e-5)
  # Biases are not decayed: first step moves by exactly lr * sign(g).
  b0 = params["cross_attention"]["qkv"]["bias"]
  gb = np.asarray(grads["cross_attention"]["qkv"]["bias"])
  np.testing.assert_allclose(history[1]["cross_attention"]["qkv"]["bias"],
                             b0 - float(schedule(0)) * gb / (np.abs(gb) + 1e-8), rtol=1e-6)


def test_clipping_per_param_and_global():
  grads = {"a": np.full((4,), 3.0, np.float32), "b": np.full((2, 2), 0.5, np.float32)}
  out, _ = optim.clip_per_param(3.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(out["a"], grads["a"] * 3.0 / (6.0 + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(out["b"], grads["b"])  # norm 1 < 3: untouched
  # Global clipping sees trainable gradients only: a huge frozen gradient changes nothing.
  params = make_params()
  small = jax.tree.map(lambda g: g * 1e-3, make_params(seed=1))
  huge = jax.tree.map(lambda g: g, small)
  huge["backbone"]["patch_embed"]["kernel"] = small["backbone"]["patch_embed"]["kernel"] * 1e6
  c = cfg(clip_mode="global", clip_grad=1e-3, warmup_epochs=0)
  a, _, _ = run_steps(c, params, small, 1)
  b, _, _ = run_steps(c, params, huge, 1)
  for k, x in flat(a[1]).items():
    np.testing.assert_array_equal(x, flat(b[1])[k], err_msg=k)
  assert np.any(flat(a[1])["head/layers_0/kernel"] != params["head"]["layers_0"]["kernel"])
  with pytest.raises(ValueError, match="clip_mode"):
    optim.build_optimizer(cfg(clip_mode="norm"), params, 512, 3, 10)


def test_lr_multipliers():
  params = make_params()
  grads = jax.tree.map(lambda g: g * 1e-3, make_params(seed=1))
  c = cfg(lr_mults=((r"cross_attention/.*", 0.5),), warmup_epochs=0)
  history, _, schedule = run_steps(c, params, grads, 1)
  lr = float(schedule(0))
  for part, mult in (("cross_attention", 0.5), ("head", 1.0)):
    sub = "qkv" if part == "cross_attention" else "layers_0"
    b0, g = params[part][sub]["bias"], np.asarray(grads[part][sub]["bias"])
    np.testing.assert_allclose(history[1][part][sub]["bias"],
                               b0 - mult * lr * g / (np.abs(g) + 1e-8), rtol=1e-6)


def test_describe_params():
  params = make_params()
  lines = optim.describe_params(params, cfg(lr_mults=((r"head/.*", 2.0),)), norm_last_layer=True)
  sizes = {k: v.size for k, v in flat(params).items()}
  labels = flat(optim.param_labels(params, rules(cfg())))
  trainable = sum(n for k, n in sizes.items() if labels[k] == "train")
  total = sum(sizes.values())
  assert (trainable, total) == (964, 1420)
  assert lines[0] == "trainable: 964 of 1.4K parameters (67.9%)"
  adapters = sum(n for k, n in sizes.items() if "/adapter/" in k)
  assert adapters == 8 * 4 + 4 + 4 * 8 + 8
  assert "  train  backbone/block_\\d+/adapter/.*: 4 arrays, 76" in lines
  assert any(line.startswith("  lr x2: 3 arrays") for line in lines), lines
  assert lines[-1] == "  held for the first 1 epoch(s): head/weight_v"
