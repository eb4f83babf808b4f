"""Decoded training images kept in accelerator memory (`config.data_cache = 'device'`).

With `crops.augment_on = 'device'` the step renders the crops from uint8 sources;
this module keeps those sources on the accelerators for the whole run, so an image
is decoded once and each step's host input shrinks to a few hundred bytes per
record: {index, image_hw, boxes, flips}. The step gathers its sources from the
cache (`gather`) and renders exactly what the uncached device path renders.

Layout. Process p decodes its shard of the records (`pipeline.shard_indices`),
each fitted into D x D as the device path ships it (`pipeline.fit_image`,
D = crops.device_image_size), in shard order, zero-padded to `rows` records so
every process has the same count. The cache is one global uint8 array

    images  [n, rows, D, D, 3]     n = data x fsdp devices, split over both on axis 0

whose row d, held by device d, is the whole shard of the process that owns
device d. A batch row on device d therefore finds its source on device d: the
gather runs per device (`jax.shard_map`) and moves no pixels between devices.
`index` in the batch is the position in the process's shard. Every device holds
its process's shard: rows x D^2 x 3 bytes (LoveDA's 2522 training tiles: 2.0 GB
at D = 512, 7.9 GB at the full 1024). Each process visits only its own shard
(`pipeline.GlobalOrder` over its rows), so with several processes the batches
depend on the process count; without the cache they do not.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from glare_jax.train import sharding

CACHES = ("none", "device")


def check_config(config) -> None:
  """`config.data_cache` must name a cache; 'device' needs device augmentation."""
  if config.data_cache not in CACHES:
    raise ValueError(f"config.data_cache={config.data_cache!r}: use one of {CACHES}")
  if config.data_cache == "device" and config.crops.augment_on != "device":
    raise ValueError("config.data_cache='device' keeps the sources for the step's own "
                     "augmentation: set config.crops.augment_on='device' too")


def rows_per_process(num_records: int, process_count: int) -> int:
  """Records of the largest process shard (`ids[p::P]`): the cache's row count."""
  return math.ceil(num_records / process_count)


def cache_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 of the cache split like the batch: one row per data-parallel device."""
  return sharding.batch_sharding(mesh)


def put(images: np.ndarray, mesh: Mesh, rows: int | None = None) -> jax.Array:
  """This process's decoded shard [N_p, D, D, 3] uint8 -> the global cache array.

  `rows` (>= N_p) pads the shard with black images so every process contributes
  the same shape (default N_p: one process). Each local device gets a copy.
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"device cache: images must be [N, D, D, 3] uint8, got "
                     f"{images.shape} {images.dtype}")
  rows = images.shape[0] if rows is None else rows
  if rows < images.shape[0]:
    raise ValueError(f"device cache: rows={rows} < the {images.shape[0]} images of this process")
  if rows > images.shape[0]:
    pad = np.zeros((rows - images.shape[0],) + images.shape[1:], np.uint8)
    images = np.concatenate([images, pad])
  n = sharding.data_parallel_size(mesh)
  return jax.make_array_from_callback((n,) + images.shape, cache_sharding(mesh),
                                      lambda index: images[None])


def gather(cache: jax.Array, index: jax.Array, mesh: Mesh) -> jax.Array:
  """Inside the step: cache [n, rows, D, D, 3], index [B] int32 -> sources [B, D, D, 3].

  Each device takes its own batch rows from its own copy of its process's shard.
  """
  spec = P(sharding.DATA_AXES)
  take = lambda c, i: c[0][i]  # c [1, rows, D, D, 3], i [B / n]
  return jax.shard_map(take, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(cache, index)
