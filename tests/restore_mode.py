"""A mode for the entry-point fault tests: resumes a small state as the trainers do."""

import jax
import jax.numpy as jnp

from glare_jax.train import checkpoint


def run(config, workdir):
  del config
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: {"w": jnp.zeros((64, 32)), "step": jnp.int32(0)})
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=3) as ckpt:
    state = ckpt.restore(checkpoint.abstract_state(shapes, jax.tree.map(lambda _: device,
                                                                        shapes)))
  print(f"resumed step {int(state['step'])}")
