"""Model construction from a config: the student/teacher ViTs, head and cross-attention.

    models = build_models(config)
    params = init_params(models, jax.random.key(0), config)
    # params = {'backbone': ..., 'head': ..., 'cross_attention': ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from glare_jax.models.heads import CrossAttention, ProjectionHead
from glare_jax.models.vit import ViT, size_kwargs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Models:
  """Flax modules of a pre-training run; all share one parameter dict."""
  student: ViT           # stochastic depth on
  teacher: ViT           # same architecture, deterministic
  head: ProjectionHead
  cross_attention: CrossAttention


def vit_from_config(mc: mlc.ConfigDict, **overrides: Any) -> ViT:
  """A ViT from `config.model` (see glare_jax/configs/common.py:model_config)."""
  kw = dict(
      patch_size=mc.patch_size, num_prefix=mc.num_prefix, pos_grid=mc.pos_grid,
      pos_resize=mc.pos_resize, drop_path=mc.drop_path, adapter_mode=mc.adapter_mode,
      adapter_dim=mc.adapter_dim, adapter_scale=mc.adapter_scale,
      use_mask_token=mc.use_mask_token, remat=mc.remat, dtype=DTYPES[mc.dtype],
      remat_policy=mc.remat_policy, scan_blocks=mc.scan_blocks, attention=mc.attention,
      **size_kwargs(mc.variant))
  kw.update(overrides)
  return ViT(**kw)


def build_models(config: mlc.ConfigDict) -> Models:
  dtype = DTYPES[config.model.dtype]
  hc = config.head
  return Models(
      student=vit_from_config(config.model),
      teacher=vit_from_config(config.model, drop_path=0.0),
      head=ProjectionHead(out_dim=hc.out_dim, hidden_dim=hc.hidden_dim,
                          bottleneck_dim=hc.bottleneck_dim, num_layers=hc.num_layers,
                          dtype=dtype),
      cross_attention=CrossAttention(num_heads=config.cross_attention.num_heads,
                                     dtype=dtype, form=config.cross_attention.get("form", "udi")),
  )


def init_params(models: Models, rng: jax.Array, config: mlc.ConfigDict) -> dict[str, Any]:
  """Freshly initialised parameters {'backbone', 'head', 'cross_attention'}."""
  k_vit, k_head, k_ca = jax.random.split(rng, 3)
  size = config.crops.global_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  backbone = models.teacher.init(k_vit, images)["params"]
  width = size_kwargs(config.model.variant)["width"]
  tokens = jnp.zeros((1, 4, width), jnp.float32)
  head = models.head.init(k_head, tokens)["params"]
  ca = models.cross_attention.init(k_ca, tokens[:, :2], tokens)["params"]
  return {"backbone": backbone, "head": head, "cross_attention": ca}
