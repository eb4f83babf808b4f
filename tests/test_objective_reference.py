"""GLARE's whole objective against the independent float64 reference of
tests/ref_glare.py: every term, the total, the new centres and the gradient of
every student parameter, in float32, over seeds and the ablation switches.

The objective draws its cells and regions from its key; the test re-draws the same
numbers from the same key (the draws are inputs to both, not under test: the
samplers have their own tests) and hands them to the reference, which places the
regions, blurs the cells and does everything else itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ref_baselines as refb  # noqa: E402
import ref_glare as ref  # noqa: E402

from glare_jax.configs import common as cfgs  # noqa: E402
from glare_jax.data import patch_aug as paug  # noqa: E402
from glare_jax.models import build_models, init_params  # noqa: E402
from glare_jax.objectives import build_objective  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0}
SPE = 4                     # steps per epoch: step 0 is in the warm-up, step 5 after it
B = 2
TERM_RTOL, GRAD_RTOL = 1e-5, 1e-4


def random_params(tree, seed):
  """Every leaf random, at scales that make attention peaky and adapters non-zero."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    shape = x.shape
    if name.endswith(("['scale']", "['weight_g']")):
      return 1.0 + 0.1 * rng.normal(size=shape)
    if name.endswith(("['cls_token']", "['pos_embed']", "['mask_token']")):
      return 0.5 * rng.normal(size=shape)
    if len(shape) == 1:
      return 0.1 * rng.normal(size=shape)
    bound = np.sqrt(3.0 / np.prod(shape[:-1])) * (1.5 if "qkv" in name else 1.0)
    return rng.uniform(-bound, bound, size=shape)

  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(leaf(p, x), np.float32), tree)


def make_batch(config, seed):
  """Random views of a 128 px image: globals overlapping in part, locals anywhere
  (some outside both globals), flips of both kinds."""
  rng = np.random.default_rng(seed)
  nl, sg, sl = config.crops.num_local, config.crops.global_size, config.crops.local_size
  boxes = np.zeros((B, 2 + nl, 4), np.float32)
  for i in range(B):
    s = rng.uniform(60, 90)
    x0, y0 = rng.uniform(0, 128 - s, 2)
    boxes[i, 0] = [x0, y0, x0 + s, y0 + s]
    s2 = rng.uniform(60, 90)
    x1, y1 = np.clip([x0 + rng.uniform(0.3, 0.6) * s, y0 + rng.uniform(-0.3, 0.3) * s], 0, 128 - s2)
    boxes[i, 1] = [x1, y1, x1 + s2, y1 + s2 * rng.uniform(0.8, 1.2)]
    for v in range(nl):
      s = rng.uniform(20, 45)
      x, y = rng.uniform(0, 128 - s, 2)
      boxes[i, 2 + v] = [x, y, x + s, y + s]
  flips = rng.random((B, 2 + nl)) < 0.5
  flips[0, :2] = [True, False]
  return {"global_crops": rng.normal(size=(B, 2, sg, sg, 3)).astype(np.float32),
          "local_crops": rng.normal(size=(B, nl, sl, sl, 3)).astype(np.float32),
          "boxes": boxes, "flips": flips}


@functools.lru_cache(maxsize=None)
def _params0(use_mask_token, ca_form="udi"):
  arg = "tiny,patch_aug=mask_block" if use_mask_token else "tiny"
  config = cfgs.pretrain_config("loveda", arg)
  config.cross_attention.form = ca_form
  return jax.jit(lambda k: init_params(build_models(config), k, config),
                 compiler_options=FAST_COMPILE)(jax.random.key(0))


def assert_gradients_match(grads, ref_total, ref_leaves) -> None:
  """glare_jax's gradient tree against torch's gradient of `ref_total` with respect to
  each reference leaf ({'part/.../name': tensor}), leaf by leaf."""
  ref_grads = torch.autograd.grad(ref_total, list(ref_leaves.values()), allow_unused=True)
  jax_grads = {jax.tree_util.keystr(p): np.asarray(g)
               for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert len(jax_grads) == len(ref_leaves)
  for (name, leaf), want in zip(ref_leaves.items(), ref_grads):
    want = np.zeros(leaf.shape) if want is None else want.numpy()
    have = jax_grads["".join(f"['{p}']" for p in name.split("/"))]
    scale = max(np.abs(want).max(), 1e-8)
    np.testing.assert_allclose(have, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale,
                               err_msg=f"gradient of {name}")


def compare(arg, seed, step, mutate=None):
  """Runs the objective and the reference on one case; returns the reference's counts."""
  config = cfgs.pretrain_config("loveda", "tiny" + (f",{arg}" if arg else ""))
  if mutate:
    mutate(config)
  models = build_models(config)
  objective = build_objective(config, models, steps_per_epoch=SPE)
  params0 = _params0(config.model.use_mask_token, config.cross_attention.form)
  student, teacher = random_params(params0, seed), random_params(params0, seed + 100)
  rng = np.random.default_rng(seed + 200)
  k = config.head.out_dim
  centres = {c: (0.2 * rng.normal(size=k)).astype(np.float32) for c in objective.init_centres()}
  batch = make_batch(config, seed)
  key = jax.random.key(seed)

  fn = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
  (loss, (metrics, new_centres)), grads = fn(student, teacher, centres,
                                             jax.tree.map(jnp.asarray, batch), key, step)

  # The objective's draws, from its key: cells (k_aug) and regions (k_reg).
  k_aug, k_reg, _, _ = jax.random.split(key, 4)
  hw = (config.crops.global_size // 16,) * 2
  cells = np.asarray(paug.select_cells(k_aug, (B, 2), hw, config.glare.patch_aug))
  k_start, k_shape = jax.random.split(k_reg)
  m = config.glare.regions.num_regions
  size_u = np.asarray(jax.random.uniform(k_shape, (B, 2, m, 4)))
  start_u = np.asarray(jax.random.uniform(k_start, (B, 2, m)))

  st, tt = ref.to_torch(student, grad=True), ref.to_torch(teacher)
  terms, ref_centres, t_temp, info = ref.glare(
      st, tt, centres, batch, config, step=step, steps_per_epoch=SPE, cells=cells,
      size_u=size_u, start_u=start_u, vit_heads=2, ca_form=config.cross_attention.form)

  assert float(metrics["teacher_temp"]) == pytest.approx(t_temp, rel=1e-6)
  got = {k[5:]: float(v) for k, v in metrics.items() if k.startswith("loss/")}
  assert set(got) == set(terms) - {"total"}
  for name, value in terms.items():
    want = float(value.detach())
    have = float(loss) if name == "total" else got[name]
    assert have == pytest.approx(want, rel=TERM_RTOL), (name, have, want)
  for name, c in ref_centres.items():
    np.testing.assert_allclose(new_centres[name], c.detach().numpy(), rtol=1e-5, atol=1e-7,
                               err_msg=f"centre {name}")
  if "reg/kept" in metrics:
    total = B * 2 * m
    assert float(metrics["reg/kept"]) == pytest.approx(info["kept"] / total, abs=1e-6)

  assert_gradients_match(grads, terms["total"], ref.leaves(st))
  return info


def test_glare_matches_reference_fast():
  """The default configuration (all levels, blurred random cells, attention regions)
  with 2 x 2 regions, whose place on the tiny 4 x 4 grid follows their start patch,
  kept with 3 of 4 patches inside the other view (dropped ones then still have
  patches inside); seed 4 distorts 2, 2 and 5 cells of three views, none of the fourth."""
  def mutate(c):
    c.glare.regions.max_patches = 2
    c.glare.regions.min_valid_fraction = 0.75
  info = compare("", seed=4, step=0, mutate=mutate)
  assert info["kept"] > 0 and info["matched"] > 0 and info["empty_views"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("seed,step", [(0, 5), (1, 5), (2, 0), (3, 6)])
def test_glare_matches_reference_seeds(seed, step):
  compare("", seed=seed, step=step)


@pytest.mark.slow
@pytest.mark.parametrize("arg", [
    "levels=glob", "levels=glob_loc", "levels=glob_reg", "levels=reg_loc",
    "patch_aug=mask_block", "patch_aug=mask_random", "patch_aug=blur_block", "patch_aug=none",
    "regions=random3", "regions=random6"])
def test_glare_matches_reference_ablations(arg):
  compare(arg, seed=5, step=5)


@pytest.mark.slow
def test_glare_matches_reference_image_blur_and_chunks():
  """blur_scope='image' and the head in chunks of one image (same sums)."""
  def mutate(c):
    c.glare.patch_aug.blur_scope = "image"
    c.glare.head_chunk_size = 1
  compare("", seed=5, step=0, mutate=mutate)


@pytest.mark.slow
def test_reference_cases_are_met():
  """Over the default seeds the cases of the issue occur: views without a distorted
  cell, kept regions partly outside the other view, dropped regions, unmatched
  patches (flips and partial overlaps are in every batch)."""
  seen = {}
  for seed, step in [(1, 5), (2, 0), (3, 6), (4, 0)]:
    for k, v in compare("", seed=seed, step=step).items():
      seen[k] = seen.get(k, 0) + v
  assert all(seen[k] > 0 for k in ("empty_views", "partly_outside", "dropped", "unmatched")), seen


# ---------------------------------------------------------------- baselines

def run_objective(name, seed, step, mutate=None):
  """(config, objective outputs, params, batch, key) of baseline `name` on one case."""
  config = cfgs.pretrain_config("loveda", f"tiny,objective={name}")
  if mutate:
    mutate(config)
  objective = build_objective(config, build_models(config), steps_per_epoch=SPE)
  params0 = _params0(False)
  student, teacher = random_params(params0, seed), random_params(params0, seed + 100)
  rng = np.random.default_rng(seed + 200)
  centres = {c: (0.2 * rng.normal(size=config.head.out_dim)).astype(np.float32)
             for c in objective.init_centres()}
  batch = make_batch(config, seed)
  key = jax.random.key(seed)
  fn = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=FAST_COMPILE)
  out = fn(student, teacher, centres, jax.tree.map(jnp.asarray, batch), key, step)
  return config, out, (student, teacher, centres), batch, key


def check_against(out, terms, t_temp, ref_centres, student_t):
  """Terms, total, temperature, centres and every student gradient."""
  (loss, (metrics, new_centres)), grads = out
  assert float(metrics["teacher_temp"]) == pytest.approx(t_temp, rel=1e-6)
  got = {k[5:]: float(v) for k, v in metrics.items() if k.startswith("loss/")}
  assert set(got) == set(terms) - {"total"}
  for name, value in terms.items():
    have = float(loss) if name == "total" else got[name]
    assert have == pytest.approx(float(value.detach()), rel=TERM_RTOL), name
  assert set(new_centres) == set(ref_centres)
  for name, c in ref_centres.items():
    np.testing.assert_allclose(new_centres[name], c.detach().numpy(), rtol=1e-5, atol=1e-7,
                               err_msg=f"centre {name}")
  assert_gradients_match(grads, terms["total"], ref.leaves(student_t))


def window_uniforms(key, lead, grid, window):
  n = grid // window
  return np.asarray(jax.random.uniform(key, (*lead, n * n + 2)))


@pytest.mark.parametrize("seed,step", [(0, 5), (1, 1 * SPE + 1)])
def test_dino_matches_reference(seed, step):
  """Multi-crop pairs, centring, and the teacher temperature in and after a 3-epoch warm-up."""
  def mutate(c):
    c.loss.warmup_teacher_temp_epochs = 3
  config, out, (student, teacher, centres), batch, _ = run_objective("dino", seed, step, mutate)
  st = ref.to_torch(student, grad=True)
  terms, new, t_temp = refb.dino(st, ref.to_torch(teacher), centres, batch, config, step=step,
                                 steps_per_epoch=SPE)
  check_against(out, terms, t_temp, new, st)


@pytest.mark.parametrize("seed,align", [(0, True), pytest.param(1, False, marks=pytest.mark.slow)])
def test_udi_matches_reference(seed, align):
  def mutate(c):
    c.udi.align_corners = align
    c.udi.global_window, c.udi.local_window = 2, 1   # 4 samples per view on the tiny grids
  config, out, (student, teacher, centres), batch, key = run_objective("udi", seed, 0, mutate)
  _, _, k_sg, k_sl = jax.random.split(key, 4)
  u = config.udi
  ug = window_uniforms(k_sg, (B, 1), config.crops.global_size // 16, u.global_window)[:, 0]
  ul = window_uniforms(k_sl, (B, 1), config.crops.local_size // 16, u.local_window)[:, 0]
  st = ref.to_torch(student, grad=True)
  terms, new, t_temp = refb.udi(st, ref.to_torch(teacher), centres, batch, config, step=0,
                                steps_per_epoch=SPE, u_global=ug, u_local=ul)
  check_against(out, terms, t_temp, new, st)
  assert 0 < float(out[0][1][0]["patch/matched"]) < 1   # some samples fall outside


def test_flsl_matches_reference():
  def mutate(c):
    c.flsl.global_window, c.flsl.local_window = 2, 1   # 4 samples per view on the tiny grids
    c.flsl.random_sampling = True
  config, out, (student, teacher, _), batch, key = run_objective("flsl", 0, 0, mutate)
  _, _, k_sg, k_sl = jax.random.split(key, 4)
  f = config.flsl
  ug = window_uniforms(k_sg, (B, 1), config.crops.global_size // 16, f.global_window)
  ul = window_uniforms(k_sl, (B, config.crops.num_local), config.crops.local_size // 16,
                       f.local_window)
  st = ref.to_torch(student, grad=True)
  terms, t_temp = refb.flsl(st, ref.to_torch(teacher), batch, config, step=0,
                            steps_per_epoch=SPE, u_global=ug, u_local=ul)
  check_against(out, terms, t_temp, {}, st)
