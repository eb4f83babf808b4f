"""A complete small trainer on glare_jax.train's infrastructure, for the tests.

The sections follow the pre-training loop (docs/DESIGN.md "The training loop"):
mesh -> input -> model -> shard & init by shape -> update step -> resume -> loop.
The model is an MLP regressing a fixed random linear map on in-memory data; the
state has what a GLARE state has: params, AdamW state (with a frozen parameter
group, as optax.multi_transform builds for the backbone), an EMA teacher, a
centre, the step and an rng key.

In-process: `train(workdir, Options(...))`. As a program (subprocess tests):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
        python tests/tiny_trainer.py --workdir=DIR --steps=12 [--kill_at_step=6] \
        [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0]

(`launch` starts it so.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import types
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from glare_jax.train import checkpoint, distributed, logging, sharding

D_IN, HIDDEN, D_OUT, NUM_EXAMPLES = 16, 64, 8, 96
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Options:
  steps: int = 12
  batch_size: int = 16            # global
  data: int = -1                  # mesh
  fsdp: int = 1
  fsdp_rules: tuple = ()
  checkpoint_every: int = 4       # 0: no checkpoints at all
  keep: int = 2
  log_every: int = 2
  seed: int = 0
  kill_at_step: int = 0           # SIGKILL itself after this step (0: never)
  nan_at_step: int = 0            # feed a NaN batch at this step (0: never)
  tensorboard: bool = False       # off by default: tensorboardX imports torch when present


def make_data() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_EXAMPLES, D_IN)).astype(np.float32)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  return {"x": x, "y": np.tanh(x @ w)}


def make_pipeline(data: dict[str, np.ndarray], local_batch: int, seed: int):
  """A grain pipeline of this process's slice of each global batch (infinite)."""
  start = jax.process_index() * local_batch
  global_batch = local_batch * jax.process_count()
  ds = (grain.MapDataset.range(len(data["x"])).shuffle(seed=seed).repeat()
        .map(lambda i: {k: v[i] for k, v in data.items()})
        .batch(global_batch, drop_remainder=True)
        .map(lambda b: {k: v[start:start + local_batch] for k, v in b.items()}))
  return iter(ds.to_iter_dataset())


def build(opts: Options, devices=None) -> types.SimpleNamespace:
  """Mesh, model, optimizer, state shapes and shardings, and the jitted steps."""

  # --- mesh
  mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=opts.data, fsdp=opts.fsdp)), devices)

  # --- model and optimizer
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, D_IN] -> [B, D_OUT]
      hidden = nn.gelu(nn.Dense(HIDDEN, name="hidden")(x))  # [B, HIDDEN]
      return nn.Dense(D_OUT, name="out")(hidden)

  model = Mlp()
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, opts.steps, 1e-4)
  labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: "freeze" if sharding.path_str(path) == "out/bias" else "train", p)
  tx = optax.multi_transform(
      {"train": optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, 0.9, 0.999, weight_decay=0.1)),
       "freeze": optax.set_to_zero()}, labels)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, D_IN)))["params"]
    return {"params": params, "opt_state": tx.init(params), "teacher": params,
            "centre": jnp.zeros((D_OUT,)), "step": jnp.int32(0), "rng": jax.random.key(1)}

  # --- shard & init by shape
  shapes = jax.eval_shape(init, jax.random.key(opts.seed))
  shardings = sharding.state_shardings(shapes, mesh, opts.fsdp_rules)
  batch_sharding = sharding.batch_sharding(mesh)

  # --- update step
  def update(state, batch):
    rng, noise_rng = jax.random.split(state["rng"])

    def loss_fn(params):
      x = batch["x"] + 0.01 * jax.random.normal(noise_rng, batch["x"].shape)
      pred = model.apply({"params": params}, x)                        # [B, D_OUT]
      target = model.apply({"params": state["teacher"]}, batch["x"])
      mse = jnp.mean((pred - batch["y"]) ** 2)
      distill = jnp.mean((pred - state["centre"] - jax.lax.stop_gradient(target)) ** 2)
      return mse + 0.1 * distill, ({"loss/mse": mse, "loss/distill": distill}, pred)

    (loss, (metrics, pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    teacher = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, state["teacher"], params)
    centre = 0.9 * state["centre"] + 0.1 * jnp.mean(pred, axis=0)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"])}
    new = {"params": params, "opt_state": opt_state, "teacher": teacher, "centre": centre,
           "step": state["step"] + 1, "rng": rng}
    return new, metrics

  return types.SimpleNamespace(
      mesh=mesh, shapes=shapes, shardings=shardings,
      init=jax.jit(init, out_shardings=shardings),
      update=jax.jit(update, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0))


def train(workdir: str, opts: Options, devices=None) -> types.SimpleNamespace:
  """Runs (or resumes) to `opts.steps`.

  Returns `.state`, the final state gathered on the host (rng as key data), and
  `.shardings`, the shardings the final device state had.
  """
  t = build(opts, devices)
  # --- input
  local_batch = sharding.local_batch_size(opts.batch_size, t.mesh)
  data_iter = make_pipeline(make_data(), local_batch, opts.seed)

  # --- resume or init
  with sharding.use_mesh(t.mesh), checkpoint.Checkpointer(
      workdir, every_steps=opts.checkpoint_every, keep=opts.keep) as ckpt:
    ckpt.check_space(t.shapes)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(checkpoint.abstract_state(t.shapes, t.shardings), data_iter)
    else:
      state = t.init(jax.random.key(opts.seed))
    start = int(state["step"])

    # --- loop
    with logging.MetricLogger(workdir, total_steps=opts.steps, start_step=start,
                              images_per_step=opts.batch_size,
                              log_every_steps=opts.log_every,
                              tensorboard=opts.tensorboard,
                              resume_note=ckpt.intact_note) as log:
      for step in range(start + 1, opts.steps + 1):
        batch = next(data_iter)
        if step == opts.nan_at_step:
          batch = {**batch, "x": batch["x"] * np.nan}
        state, metrics = t.update(state, sharding.global_batch(batch, t.mesh))
        log.record(step, metrics)
        ckpt.check()
        if opts.checkpoint_every and (ckpt.due(step) or step == opts.steps):
          log.flush()                       # NaN/Inf guard before saving
          ckpt.save(step, state, data_iter)
        if step == opts.kill_at_step:       # crash while the save may still be writing
          os.kill(os.getpid(), signal.SIGKILL)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  state = {**state, "rng": jax.random.key_data(state["rng"])}
  host = jax.tree.map(np.asarray, multihost_utils.process_allgather(state, tiled=True))
  return types.SimpleNamespace(state=host, shardings=shardings)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default="", help="npz file for the final state (process 0)")
  p.add_argument("--coordinator", default="")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  for f in dataclasses.fields(Options):
    if f.type in ("int", int):
      p.add_argument(f"--{f.name}", type=int, default=f.default)
  p.add_argument("--fsdp_rules", default="", help="regex=axis,regex=axis")
  args = p.parse_args(argv)

  jax.config.update("jax_default_matmul_precision", "highest")
  distributed.initialize(mlc.ConfigDict(dict(
      coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id)))
  opts = Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)
                    if f.type in ("int", int)})
  opts.fsdp_rules = tuple(tuple(r.split("=")) for r in args.fsdp_rules.split(",") if r)
  try:
    state = train(args.workdir, opts).state
  except checkpoint.CheckpointError as e:   # as glare_jax.main: one line, exit 2
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  if args.out and jax.process_index() == 0:
    np.savez(args.out, **flatten(state))


def flatten(tree: Any) -> dict[str, np.ndarray]:
  return {sharding.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def launch(args: list[str], devices: int = 8, cache_dir: str | os.PathLike | None = None,
           **popen_kw) -> subprocess.Popen:
  """Starts this file as a program with `devices` CPU devices (repository on PYTHONPATH).

  `cache_dir` shares compiled programs between the runs of a test (JAX's
  persistent compilation cache): restarts then skip most of the compile time.
  """
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **popen_kw)


def finish(*procs: subprocess.Popen, timeout: float = 300) -> list[str]:
  """Waits for the programs and returns their outputs; kills any left on failure."""
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


if __name__ == "__main__":
  sys.exit(main())
