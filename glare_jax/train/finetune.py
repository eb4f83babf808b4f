r"""Segmentation fine-tuning (the UDI/FLSL mmseg protocol, docs/DESIGN.md
"Segmentation fine-tuning").

    python -m glare_jax.main --config=configs/loveda_seg.py --workdir=DIR \
        --config.init_checkpoint=SRC

SRC is a converted checkpoint or a GLARE pre-training workdir
(`train/init_checkpoint.py`); its backbone (adapters included) starts a
Segmenter (ViT + FPN, `models/segmenter.py`) whose every parameter is then
fine-tuned with AdamW and mmcv's poly schedule (`glare_jax/configs/seg_common.py`). The
sections follow big_vision's train.py: mesh -> input -> model -> shard & init by
shape -> update step -> resume -> evals -> loop (docs/DESIGN.md "The training loop").

BatchNorm statistics are computed inside the jitted step over the global batch,
which is sharded across every device and process: that is SyncBN. The global
batch (`config.batch_size`) does not depend on the device count.

The workdir gets `config.json`, `checkpoints/<step>/` (state + data position;
a killed run resumes there), `metrics.jsonl` and `tensorboard/`, `eval.json`
(the latest evaluation: at the end, and every `eval.every_steps`), one line per
evaluation in `evals.jsonl`, and with `eval.save_predictions` the final label
maps as PNGs under `predictions/`, in the dataset's own ids.
"""

from __future__ import annotations

import json
import os
import pathlib
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from glare_jax.data import datasets, pipeline, prepare, seg_transforms
from glare_jax.evaluation import inference
from glare_jax.evaluation import metrics as metrics_lib
from glare_jax.models.segmenter import segmenter_from_config
from glare_jax.objectives.segmentation import seg_cross_entropy
from glare_jax.train import checkpoint, init_checkpoint, optim, seg_schedule, sharding
from glare_jax.train import logging as train_logging

# ----------------------------------------------------------------------------
# Model, optimizer and the jitted functions.
# ----------------------------------------------------------------------------


def build_optimizer(config: mlc.ConfigDict, params: Any
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with mmseg's decay-by-name rule and the poly schedule; parameter rules
  (`optim.param_preset` / `param_rules`) may freeze parts (no optimizer state)."""
  o = config.optim
  if o.name != "adamw":
    raise ValueError(f"config.optim.name={o.name!r}: fine-tuning implements 'adamw'")
  schedule = seg_schedule.schedule_from_config(config)
  labels = optim.param_labels(params, optim.param_rules(o))
  adamw = optax.adamw(schedule, o.b1, o.b2, eps=optim.ADAM_EPS, weight_decay=o.weight_decay,
                      mask=optim.decay_mask(o.no_decay, o.decay_1d))
  if o.clip_grad:     # mmcv's grad_clip: global norm over the trained parameters
    adamw = optax.chain(optax.clip_by_global_norm(o.clip_grad), adamw)
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()},
                               labels), schedule


def describe(params: Any, config: mlc.ConfigDict) -> str:
  """One line: parameter count, trained and weight-decayed shares."""
  labels = optim.param_labels(params, optim.param_rules(config.optim))
  total = trained = decayed = 0
  for (kp, x), label in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(labels)):
    n = int(np.prod(x.shape))
    total += n
    if label == "train":
      trained += n
      decayed += n * optim.decays(optim.path_str(kp), x.ndim, config.optim.no_decay,
                                  config.optim.decay_1d)
  return (f"{total / 1e6:.2f}M parameters, {trained / 1e6:.2f}M trained "
          f"({decayed / 1e6:.2f}M weight-decayed)")


def param_shapes(model: Any, crop: int) -> Any:
  """The Segmenter's params as ShapeDtypeStructs (nothing is computed)."""
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, crop, crop, 3), jnp.float32))["params"]


def build(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> types.SimpleNamespace:
  """Model, optimizer, state shapes / shardings and the jitted init and update.

  `init(rng, backbone)` makes the step-0 state {'params', 'batch_stats',
  'opt_state', 'step', 'rng'}; `backbone` (a NumPy tree, see
  `init_checkpoint.init_backbone`) replaces the random ViT, or None keeps it.
  """
  info = datasets.get_info(config.dataset, config.data_dir)
  model = segmenter_from_config(config, info.num_classes)
  crop = config.crop_size
  params_shape = param_shapes(model, crop)
  tx, schedule = build_optimizer(config, params_shape)

  def init(rng, backbone):
    k_model, k_train = jax.random.split(rng)
    variables = model.init(k_model, jnp.zeros((1, crop, crop, 3), jnp.float32))
    params = dict(variables["params"])
    if backbone is not None:
      params["backbone"] = jax.tree.map(jnp.asarray, backbone)
    return {"params": params, "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(params), "step": jnp.int32(0), "rng": k_train}

  shapes = jax.eval_shape(init, jax.random.key(config.seed), None)
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.fsdp_rules)

  def update(state, batch):
    """batch: image [B, S, S, 3] float32 normalised, label [B, S, S] uint8 train ids."""
    rng, step_rng = jax.random.split(state["rng"])

    def loss_fn(params):
      logits, new = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                batch["image"], train=True, mutable=["batch_stats"],
                                rngs={"dropout": step_rng})            # [B, h, w, C]
      loss = seg_cross_entropy(logits, batch["label"], ignore_index=info.ignore_index,
                               avg_non_ignore=config.loss.avg_non_ignore)
      return loss, new["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"])}
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
            "step": state["step"] + 1, "rng": rng}, metrics

  def apply(variables, images):
    """Inference: images [B, H, W, 3] normalised -> logits [B, h, w, C]."""
    return model.apply(variables, images, train=False)

  return types.SimpleNamespace(
      info=info, model=model, tx=tx, schedule=schedule, shapes=shapes, shardings=shardings,
      params_shape=params_shape, apply=apply,
      init=jax.jit(init, out_shardings=shardings),
      update=jax.jit(update, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=0))


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def gather_confusion(cm: metrics_lib.ConfusionMatrix) -> metrics_lib.ConfusionMatrix:
  """The sum of every process's confusion matrix, exact in int64.

  Device collectives carry int32 only (without jax_enable_x64), so each int64
  count travels as two int32 halves (high and low 31 bits) and is put back
  together on the host before the processes' matrices are merged.
  """
  hi, lo = np.divmod(cm.total, np.int64(2 ** 31))
  if hi.max(initial=0) >= 2 ** 31:
    raise OverflowError("confusion matrix counts beyond 2**62")
  parts = multihost_utils.process_allgather(np.stack([hi, lo]).astype(np.int32))  # [P, 2, C, C]
  total = metrics_lib.ConfusionMatrix(cm.num_classes)
  for part in np.asarray(parts):
    other = metrics_lib.ConfusionMatrix(cm.num_classes)
    other.total = part[0].astype(np.int64) * 2 ** 31 + part[1].astype(np.int64)
    total.merge(other)
  return total


def _eval_records(config: mlc.ConfigDict):
  """This process's validation records ('name' = file name without suffix); with
  eval.max_images = N only the split's first N records, over all processes."""
  records = pipeline.evaluation_dataset(config, split=config.val_split,
                                        max_images=config.eval.max_images)
  for rec in records:
    yield {**rec, "name": os.path.splitext(rec["file_name"])[0]}


def evaluate(config: mlc.ConfigDict, t: types.SimpleNamespace, state: Any,
             workdir: str | os.PathLike, step: int, *, final: bool) -> dict[str, Any]:
  """Scores the validation split with `evaluation/inference.py`; process 0 prints
  the per-class table and writes eval.json / evals.jsonl. Every process scores
  its own shard of the images on its first local device."""
  workdir = pathlib.Path(workdir)
  variables = multihost_utils.process_allgather(
      {"params": state["params"], "batch_stats": state["batch_stats"]}, tiled=True)
  save_dir = workdir / "predictions" if final and config.eval.save_predictions else None
  device = jax.local_devices()[0]
  # A one-device mesh: the inference jits run on `device` alone, not on the
  # training mesh (whose devices span every process).
  with sharding.use_mesh(sharding.make_mesh(mlc.ConfigDict(dict(data=1, fsdp=1)), [device])):
    variables = jax.device_put(variables, device)       # once, not per image
    predictor = inference.predictor_from_config(config, t.apply, variables, t.info)
    cm = inference.evaluate(predictor, _eval_records(config), t.info, save_dir=save_dir)
  m = gather_confusion(cm).metrics()
  if jax.process_index() == 0:
    print(f"evaluation at step {step} ({config.val_split}, {config.eval.mode}):\n"
          + metrics_lib.format_table(m, t.info.class_names), flush=True)
    metrics_lib.write_eval_json(workdir / "eval.json", m, t.info.class_names,
                                dataset=t.info.name, split=config.val_split,
                                mode=config.eval.mode, step=step, seed=config.seed,
                                init_checkpoint=config.init_checkpoint)
    _append_history(workdir / "evals.jsonl", {"step": step, **{
        k: m[k] for k in ("aAcc", "mIoU", "mAcc")}})
  return m


def _append_history(path: pathlib.Path, record: dict[str, Any]) -> None:
  """One line per evaluated step (a repeated step replaces its old line)."""
  kept = [r for r in train_logging.read_metrics(path) if r.get("step") != record["step"]]
  path.write_text("".join(json.dumps(r) + "\n" for r in [*kept, record]))


# ----------------------------------------------------------------------------
# The program.
# ----------------------------------------------------------------------------


def check(config: mlc.ConfigDict, workdir: str | os.PathLike) -> None:
  """Before the workdir is touched: a fresh run's init checkpoint must fit the
  model (raises CheckpointMismatch naming the path and the keys at fault). A folder
  dataset must be prepared, with masks and a validation split."""
  info = datasets.get_info(config.dataset, config.data_dir)
  if config.init_checkpoint and not checkpoint.has_checkpoints(workdir):
    model = segmenter_from_config(config, info.num_classes)
    init_checkpoint.init_backbone(config, param_shapes(model, config.crop_size)["backbone"])


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) to `config.total_steps`, then evaluates; returns the
  final metrics (every process)."""
  # --- mesh
  mesh = sharding.make_mesh(config.mesh)

  # --- input: each process loads batch_size / process_count crops of its shard
  prepare.prepare_generated(config.dataset, config.data_dir)
  info = datasets.get_info(config.dataset, config.data_dir)
  local_batch = sharding.local_batch_size(config.batch_size, mesh)
  train = pipeline.segmentation_input(
      config, seg_transforms.train_transform_from_config(config, info),
      split=config.train_split)
  assert train.batch_size == local_batch, (train.batch_size, local_batch)
  data_iter = iter(train.dataset)
  total_steps = config.total_steps
  logging.info("fine-tuning on %d %s records (%s split), %d steps of batch %d "
               "(%.1f epochs)", train.num_records, config.dataset, config.train_split,
               total_steps, config.batch_size,
               total_steps * config.batch_size / train.num_records)

  # --- model, optimizer; shard & init by shape
  t = build(config, mesh)
  logging.info("model: %s", describe(t.params_shape, config))

  with sharding.use_mesh(mesh), checkpoint.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints) as ckpt:
    ckpt.check_space(t.shapes)              # a disk too small for one checkpoint: stop now
    # --- resume, or start from the init checkpoint's backbone
    if ckpt.latest_step() is not None:
      state = ckpt.restore(checkpoint.abstract_state(t.shapes, t.shardings), data_iter)
    else:
      backbone = init_checkpoint.init_backbone(config, t.params_shape["backbone"])
      if backbone is None:
        logging.warning("config.init_checkpoint is empty: the backbone starts from a random "
                        "initialisation")
      state = t.init(jax.random.key(config.seed), backbone)
    start = int(state["step"])
    final_eval = pathlib.Path(workdir) / "eval.json"
    if (start >= total_steps and final_eval.exists()      # the final evaluation is written
        and json.loads(final_eval.read_text()).get("step") == total_steps):
      print(f"already complete at step {start} ({workdir})", flush=True)
      return {}

    # --- loop (evaluating every eval.every_steps and at the end)
    every = config.eval.every_steps
    with train_logging.MetricLogger(workdir, total_steps=total_steps, start_step=start,
                                    images_per_step=config.batch_size,
                                    log_every_steps=config.log_every_steps,
                                    tensorboard=config.tensorboard,
                                    resume_note=ckpt.intact_note) as log:
      for step in range(start + 1, total_steps + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = t.update(state, batch)
        log.record(step, metrics)           # syncs with the device only on log steps
        ckpt.check()                        # a failed background save stops the run here
        if ckpt.due(step) or step == total_steps:
          log.flush()                       # NonFiniteError here: the bad state is never saved
          ckpt.save(step, state, data_iter)
        if every and step % every == 0 and step != total_steps:
          log.flush()
          evaluate(config, t, state, workdir, step, final=False)
    return evaluate(config, t, state, workdir, total_steps, final=True)
