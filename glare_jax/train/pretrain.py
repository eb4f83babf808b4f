"""Continual self-supervised pre-training: GLARE and the UDI / FLSL / DINO baselines.

    python -m glare_jax.main --config=configs/loveda.py --workdir=DIR \
        --config.init_checkpoint=CONVERTED_UDI_DIR

Sections in big_vision's order: mesh -> input -> model, objective, optimizer ->
shard & init by shape -> update step -> resume -> loop. `build` is shared with
`glare_jax.bench`, so the benchmark times exactly this step.

The state is a dict (docs/DESIGN.md, "The training loop"):
  params    {'backbone', 'head', 'cross_attention'}: the student
  teacher   the same tree, an EMA of params (momentum 0.996 -> 1, cosine per step)
  opt_state optax state (frozen parameters hold none)
  centres   {level: [K]} of the objective
  step      int32
  rng       jax.random key
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from glare_jax.data import device_cache, multicrop
from glare_jax.evaluation import probe as probe_lib
from glare_jax.models import Models, build_models, init_params
from glare_jax.models import load as load_lib
from glare_jax.objectives import build_objective
from glare_jax.objectives.common import ema_momentum, ema_update
from glare_jax.train import checkpoint, init_checkpoint, logging as metric_logging, optim, sharding


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything the loop (and the benchmark) needs, built from a config."""
  mesh: jax.sharding.Mesh
  models: Models
  objective: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shapes: Any              # the state as ShapeDtypeStructs
  shardings: Any           # the state's NamedShardings
  init: Callable           # (params or None, rng) -> sharded state
  update: Callable         # (state, global batch, cache) -> (state, metrics), jitted, state
                           # donated; cache: the device_cache array (data_cache='device') or None
  total_steps: int


def build(config: mlc.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int) -> Trainer:
  """Model, objective, optimizer, state shardings and the jitted update step."""
  # --- model, objective, optimizer
  models = build_models(config)
  objective = build_objective(config, models, steps_per_epoch)
  total_steps = int(config.num_epochs * steps_per_epoch)
  param_shapes = jax.eval_shape(lambda k: init_params(models, k, config), jax.random.key(0))
  fixed_g = dict(norm_last_layer=config.head.norm_last_layer)
  tx, schedule = optim.build_optimizer(config.optim, param_shapes, config.batch_size,
                                       steps_per_epoch, config.num_epochs, **fixed_g)
  for line in optim.describe_params(param_shapes, config.optim, **fixed_g):
    logging.info("%s", line)
  trained = optim.param_labels(param_shapes, optim.param_rules(config.optim, **fixed_g))

  def init_state(params, rng):
    return dict(params=params, teacher=params, opt_state=tx.init(params),
                centres=objective.init_centres(), step=jnp.zeros((), jnp.int32), rng=rng)

  # --- shard & init by shape
  shapes = jax.eval_shape(
      lambda k: init_state(init_params(models, k, config), k), jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.fsdp_rules)
  fresh = jax.jit(lambda k: init_state(init_params(models, k, config), k),
                  out_shardings=shardings)
  from_params = jax.jit(init_state, in_shardings=(shardings["params"], None),
                        out_shardings=shardings)

  def init(params, rng):
    return fresh(rng) if params is None else from_params(params, rng)

  # --- update step
  augment_on_device = config.crops.augment_on == "device"
  device_cache.check_config(config)
  cached = config.data_cache == "device"

  def update(state, batch, cache):
    rng, step_rng, aug_rng = jax.random.split(state["rng"], 3)
    if cached:              # the sources of this batch's records, from the device cache
      batch = {**{k: v for k, v in batch.items() if k != "index"},
               "image": device_cache.gather(cache, batch["index"], mesh)}
    if augment_on_device:   # uint8 sources + boxes -> rendered crops, on the accelerator
      batch = multicrop.augment_batch_jax(aug_rng, batch, config.crops)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (metrics, centres)), grads = grad_fn(
        state["params"], state["teacher"], state["centres"], batch, step_rng, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    momentum = ema_momentum(state["step"], total_steps, config.optim.ema_momentum,
                            config.optim.ema_final)
    teacher = ema_update(state["teacher"], params, momentum)
    # The norm of the trained parameters' gradients only: the frozen backbone's
    # weight gradients then feed nothing, and XLA drops their computation (a third
    # of the backbone's backward pass).
    trained_grads = jax.tree.map(lambda g, l: g if l == "train" else None, grads, trained)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(trained_grads),
               "lr": schedule(state["step"]), "ema_momentum": momentum}
    new = dict(params=params, teacher=teacher, opt_state=opt_state, centres=centres,
               step=state["step"] + 1, rng=rng)
    return new, metrics

  cache_sharding = device_cache.cache_sharding(mesh) if cached else None
  update = jax.jit(update,
                   in_shardings=(shardings, sharding.batch_sharding(mesh), cache_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Trainer(mesh=mesh, models=models, objective=objective, tx=tx, schedule=schedule,
                 shapes=shapes, shardings=shardings, init=init, update=update,
                 total_steps=total_steps)


def initial_params(config: mlc.ConfigDict, models: Models) -> dict[str, Any] | None:
  """The converted `config.init_checkpoint` merged into fresh parameters (host
  arrays), or None for a fresh start. Raises before anything is written."""
  if not config.init_checkpoint:
    return None
  fresh = jax.jit(lambda k: init_params(models, k, config))(jax.random.key(config.seed))
  params, notes = _merge_init_checkpoint(config, jax.device_get(fresh))
  for note in notes:
    logging.info("init_checkpoint: %s", note)
  return params


def _merge_init_checkpoint(config: mlc.ConfigDict, fresh: Any) -> tuple[Any, list[str]]:
  """`load.load_into` of config.init_checkpoint; errors name the path."""
  path = pathlib.Path(config.init_checkpoint).expanduser()
  if not (path / "model.json").exists():
    raise FileNotFoundError(
        f"config.init_checkpoint={str(path)!r} is not a converted checkpoint (no model.json); "
        "convert a PyTorch file first: python -m glare_jax.convert --src FILE.pth --out DIR")
  try:
    return load_lib.load_into(fresh, path, parts=tuple(config.init_parts), drop_prefix=False,
                              pos_resize=config.model.pos_resize)
  except load_lib.CheckpointMismatch as e:
    raise load_lib.CheckpointMismatch(f"{path}: {e}") from None


def probe_on(config: mlc.ConfigDict, *, say: bool = False) -> bool:
  """Whether pre-training runs the dense linear probe: `probe.every_epochs` > 0 and,
  for a folder of your own images, the prepared dataset has masks and a validation
  split (`say`: log it when it has not)."""
  from glare_jax.data.builders import folder  # pylint: disable=g-import-not-at-top
  if not config.probe.every_epochs:
    return False
  if config.dataset.startswith(folder.PREFIX) and not folder.has_labels(
      config.dataset, config.data_dir):
    if say:
      logging.info("probe off: %s has no masks or no validation split to score",
                   config.dataset)
    return False
  return True


def check(config: mlc.ConfigDict, workdir: str | os.PathLike) -> None:
  """Before the workdir is touched: the training split can be read, and a fresh
  run's init checkpoint fits the model (errors name the path and the problem)."""
  from glare_jax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top
  prepare.prepare_generated(config.dataset, config.data_dir)
  pipeline.open_split(config.dataset, config.data_dir, config.train_split)
  if probe_on(config):                # the probe's labelled splits
    for split in (config.probe.train_split, config.probe.val_split):
      pipeline.open_split(config.dataset, config.data_dir, split)
  if config.init_checkpoint and not checkpoint.has_checkpoints(workdir):
    # Without initialising: zeros of the parameters' shapes (the fit does not
    # depend on fresh values; run() draws them).
    models = build_models(config)
    shapes = jax.eval_shape(lambda k: init_params(models, k, config), jax.random.key(0))
    _merge_init_checkpoint(config, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) to `config.num_epochs`; returns the last logged metrics."""
  from glare_jax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top

  # --- mesh
  mesh = sharding.make_mesh(config.mesh)

  # --- input: each process reads its batch / process_count slice of each global batch
  prepare.prepare_generated(config.dataset, config.data_dir)
  sharding.local_batch_size(config.batch_size, mesh)   # divisibility, with a clear error
  train = pipeline.pretrain_input(config)
  steps_per_epoch = train.steps_per_epoch   # >= 1: the pipeline refuses fewer records
  data_iter = iter(train.dataset)
  cache = None                    # data_cache='device': this process's sources, decoded once
  if train.cache_images is not None:
    cache = device_cache.put(train.cache_images, mesh, train.cache_rows)
    logging.info("device cache: %s uint8 (%.2f GB per device)", cache.shape,
                 cache.nbytes / cache.shape[0] / 1e9)

  # --- model, objective, optimizer, shardings
  t = build(config, mesh, steps_per_epoch)
  params = (None if checkpoint.has_checkpoints(workdir)   # resuming: not needed
            else initial_params(config, t.models))       # before the workdir gets any state
  logging.info("%d records, %d steps per epoch, %d steps", train.num_records,
               steps_per_epoch, t.total_steps)

  # --- resume or init
  last: dict[str, Any] = {}
  with sharding.use_mesh(mesh), checkpoint.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints) as ckpt:
    ckpt.check_space(t.shapes)             # a disk too small for one checkpoint: stop now
    if ckpt.latest_step() is not None:
      state = ckpt.restore(checkpoint.abstract_state(t.shapes, t.shardings), data_iter)
      logging.info("resumed from step %d", int(state["step"]))
    else:
      state = t.init(params, jax.random.key(config.seed))
    start = int(state["step"])
    if start >= t.total_steps:      # a finished run: nothing to do, nothing written
      print(f"already complete at step {start} ({workdir})", flush=True)
      return {}

    # --- evals: the dense linear probe at step 0, every probe.every_epochs and at the end
    probe = probe_lib.Probe.from_config(config, mesh) if probe_on(config, say=True) else None
    probe_every = max(1, round(config.probe.every_epochs * steps_per_epoch))
    probed = lambda s: probe_lib.summary(probe.run(
        s[init_checkpoint.WHICH[config.probe.which]]["backbone"]))

    # --- loop
    with metric_logging.MetricLogger(
        workdir, total_steps=t.total_steps, start_step=start,
        images_per_step=config.batch_size, log_every_steps=config.log_every_steps,
        tensorboard=config.tensorboard, resume_note=ckpt.intact_note) as log:
      if probe and start == 0:
        log.write_scalars(0, probed(state), "probe")
      for step in range(start + 1, t.total_steps + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = t.update(state, batch, cache)
        log.record(step, metrics)
        ckpt.check()                       # a failed background save stops the run here
        if ckpt.due(step) or step == t.total_steps:
          log.flush()                      # NaN/Inf guard: a bad state is never saved
          ckpt.save(step, state, data_iter)
        if probe and (step % probe_every == 0 or step == t.total_steps):
          log.flush()
          log.write_scalars(step, probed(state), "probe")
        if step == t.total_steps:
          last = {k: float(np.asarray(v)) for k, v in metrics.items()}
  return last
