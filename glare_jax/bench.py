r"""Speed of the pre-training step: images/s, step time, compile time, peak memory.

    python -m glare_jax.bench --config=configs/loveda.py:fast --batch=512 --steps=20
    python -m glare_jax.bench --config=configs/loveda.py:fast --mode=epoch --steps=8
    python -m glare_jax.bench --config=configs/loveda.py:tiny --steps=2 --records=16  # CPU

Prints ONE JSON line (BENCHMARKS.md records them):

    {"img_per_s", "step_ms", "compile_s", "peak_mem_gb", "device", ...}

What runs is exactly `train/pretrain.py`'s jitted update (`pretrain.build`) on the
config's switches, fed by its input pipeline (`pipeline.pretrain_input`) over
synthetic records of the dataset's size: `--records` PNG-encoded images of
`--source_size`^2 pixels (a pool of 8 distinct smooth, noisy images reused), or
with `--data=prepared` the prepared split itself. Augmentation is part of what is
timed wherever the config puts it on the device (`crops.augment_on='device'`).

Modes:
  step   the update alone: compile (lower + compile, timed apart from running) and
         `--steps` steps after `--warmup`, each waited for; step_ms is the median.
         Its inputs are 2 batches from the pipeline, already on the device, reused.
         With data_cache='device' the cache is filled from the pool (no decoding).
  epoch  the training loop as `pretrain.run` runs it (next batch, transfer, update,
         no wait between steps) for `--steps` steps after one warm-up epoch, plus
         the one-time work before it: decoding into the device cache (data_cache=
         'device') and compiling. Reports seconds per epoch of `--records` records
         and the wall time of `config.num_epochs` epochs, data included.
  input  the input path alone (next batch + transfer, waited for), no step.
  compile  step mode's compile and XLA's cost and memory analyses only, no step
         (what BENCHMARKS.md's CPU estimates for the full-size model come from).

`--profile=DIR` writes a jax.profiler trace of 3 steps (step mode) to DIR.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from glare_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with its argument, e.g. configs/loveda.py:fast")
_MODE = flags.DEFINE_enum("mode", "step", ["step", "epoch", "input", "compile"],
                         "What to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling (step mode).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch size (0: config.batch_size).")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "prepared"],
                          "Synthetic records of the dataset's size, or the prepared split.")
_RECORDS = flags.DEFINE_integer("records", 0, "Synthetic records (0: the dataset's train "
                                "split size, LoveDA 2522).")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 0, "Side of the synthetic square "
                                    "images (0: the dataset's, LoveDA 1024).")
_PROFILE = flags.DEFINE_string("profile", "", "Write a jax.profiler trace here.")
_CHECK_FLAGS = flags.DEFINE_bool("check_flags", False, "Only check the flags and the config "
                                 "(prints {\"checked\": true}); time nothing.")
flags.mark_flags_as_required(["config"])

# Training-split size and image side of the datasets with square tiles; others
# need --records and --source_size.
DATASET_SIZES = {"loveda": (2522, 1024), "demo": (200, 256)}
POOL = 8  # distinct synthetic images


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
  """[size, size, 3] uint8 images: smooth colour fields plus pixel noise, so that
  PNG decoding costs what a real tile costs (not a flat image's)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    smooth = np.asarray(base.resize((size, size), Image.Resampling.BICUBIC), np.int16)
    noise = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    out.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
  return out


def png_source(images: list[np.ndarray], records: int) -> list[dict[str, bytes]]:
  """`records` records {image: PNG bytes} cycling through `images`."""
  from glare_jax.data.codec import encode_png  # pylint: disable=g-import-not-at-top
  encoded = [{"image": encode_png(image)} for image in images]
  return [encoded[i % len(encoded)] for i in range(records)]


def _sizes(config) -> tuple[int, int]:
  records, side = DATASET_SIZES.get(config.dataset, (0, 0))
  records = _RECORDS.value or records
  side = _SOURCE_SIZE.value or side
  if not records or not side:
    raise app.UsageError(f"no known size for dataset {config.dataset!r}: give --records "
                         "and --source_size")
  return records, side


def _input(config, mesh, records: int, side: int, fill_cache: bool):
  """(TrainInput, device cache or None, seconds spent decoding + placing the cache)."""
  from glare_jax.data import device_cache, pipeline  # pylint: disable=g-import-not-at-top
  pool = synthetic_images(POOL, side) if _DATA.value == "synthetic" else None
  encoded = pool is not None and (config.data_cache != "device" or fill_cache)
  source = png_source(pool, records) if encoded else None
  t0 = time.perf_counter()           # cache_s: decoding + placing, not making the pool
  if _DATA.value == "prepared":
    train = pipeline.pretrain_input(config)
  else:
    if config.data_cache == "device" and not fill_cache:
      # Step mode: the cache is filled from the pool directly, as decoding would.
      fitted = [pipeline.fit_image(im, config.crops.device_image_size) for im in pool]
      images = np.stack([fitted[i % POOL][0] for i in range(records)])
      image_hw = np.asarray([fitted[i % POOL][1] for i in range(records)], np.int32)
      train = pipeline.views_input(config, np.arange(records), image_hw, records,
                                   config.batch_size, cache_images=images,
                                   cache_rows=records)
    else:
      train = pipeline.pretrain_input(config, source=source)
  t1 = time.perf_counter()
  cache = None
  if train.cache_images is not None:
    cache = device_cache.put(train.cache_images, mesh, train.cache_rows)
    cache.block_until_ready()
  return train, cache, (time.perf_counter() - t1) + ((t1 - t0) if fill_cache else 0.0)


def _describe(config, jax) -> dict[str, Any]:
  m, c = config.model, config.crops
  return {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "platform": jax.default_backend(), "jax": jax.__version__,
          "batch": config.batch_size,
          "config": {"objective": config.objective, "variant": m.variant, "dtype": m.dtype,
                     "attention": m.attention, "scan_blocks": m.scan_blocks,
                     "remat": m.remat, "remat_policy": m.remat_policy,
                     "augment_on": c.augment_on, "device_resample": c.device_resample,
                     "device_image_size": c.device_image_size,
                     "data_cache": config.data_cache}}


def _peak_memory_gb(jax) -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 3)


def _analyses(compiled, batch: int) -> dict[str, Any]:
  """XLA's own estimates: FLOPs and bytes per image, the executable's memory."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_gflop_per_img"] = round(cost.get("flops", 0.0) / batch / 1e9, 2)
    out["xla_gb_per_img"] = round(cost.get("bytes accessed", 0.0) / batch / 1e9, 3)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("cost analysis unavailable: %s", e)
  try:
    mem = compiled.memory_analysis()
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    out["xla_mem_gb"] = round(total / 2**30, 3)
    out["xla_temp_gb"] = round(mem.temp_size_in_bytes / 2**30, 3)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("memory analysis unavailable: %s", e)
  return out


def run(config) -> dict[str, Any]:
  """Builds the step from `config`, times what --mode says, returns the JSON record."""
  import jax  # pylint: disable=g-import-not-at-top
  from glare_jax.train import pretrain, sharding  # pylint: disable=g-import-not-at-top

  if _BATCH.value:
    config.batch_size = _BATCH.value
  records, side = _sizes(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.local_batch_size(config.batch_size, mesh)
  mode = _MODE.value
  train, cache, cache_s = _input(config, mesh, records, side,
                                 fill_cache=mode in ("epoch", "input"))
  data_iter = iter(train.dataset)
  next_batch = lambda: sharding.global_batch(next(data_iter), mesh)
  out = {"mode": mode, **_describe(config, jax), "records": train.num_records}

  if mode == "input":
    times = []
    for _ in range(_STEPS.value + 1):
      t0 = time.perf_counter()
      jax.block_until_ready(next_batch())
      times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:])
    return {**out, "img_per_s": round(config.batch_size / step, 1),
            "step_ms": round(step * 1e3, 2), "compile_s": None,
            "peak_mem_gb": _peak_memory_gb(jax), "cache_s": round(cache_s, 2)}

  t = pretrain.build(config, mesh, max(train.steps_per_epoch, 1))
  state = t.init(None, jax.random.key(config.seed))
  batches = [next_batch() for _ in range(2)]
  t0 = time.perf_counter()
  lowered = t.update.lower(state, batches[0], cache)
  t1 = time.perf_counter()
  update = lowered.compile()
  t2 = time.perf_counter()
  out.update(compile_s=round(t2 - t0, 2), lower_s=round(t1 - t0, 2),
             **_analyses(update, config.batch_size))

  if mode == "compile":
    return {**out, "img_per_s": None, "step_ms": None, "peak_mem_gb": _peak_memory_gb(jax)}
  if mode == "step":
    for i in range(_WARMUP.value):
      state, metrics = update(state, batches[i % 2], cache)
    jax.block_until_ready(state)
    times = []
    for i in range(_STEPS.value):
      t0 = time.perf_counter()
      state, metrics = update(state, batches[i % 2], cache)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    if _PROFILE.value:   # after the timed steps; a profiler failure costs only the trace
      try:
        with jax.profiler.trace(_PROFILE.value):
          for i in range(3):
            state, metrics = update(state, batches[i % 2], cache)
          jax.block_until_ready(state)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("--profile: no trace (%s: %s)", type(e).__name__, e)
    step = statistics.median(times)
    out.update(step_ms=round(step * 1e3, 2), step_ms_mean=round(
        statistics.mean(times) * 1e3, 2), img_per_s=round(config.batch_size / step, 1))
  else:  # epoch: the loop of pretrain.run, without checkpoints and logging
    per_epoch = max(train.steps_per_epoch, 1)
    for _ in range(per_epoch):
      state, metrics = update(state, next_batch(), cache)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = update(state, next_batch(), cache)
    jax.block_until_ready((state, metrics))
    step = (time.perf_counter() - t0) / _STEPS.value
    epoch_s = step * per_epoch
    out.update(step_ms=round(step * 1e3, 2), img_per_s=round(config.batch_size / step, 1),
               epoch_s=round(epoch_s, 3), steps_per_epoch=per_epoch,
               cache_s=round(cache_s, 2), num_epochs=config.num_epochs,
               run_s=round(config.num_epochs * epoch_s + cache_s + out["compile_s"], 1))
  out["loss"] = float(metrics["loss"])
  out["peak_mem_gb"] = _peak_memory_gb(jax)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from glare_jax.train import preflight  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value.copy_and_resolve_references()
  if _BATCH.value:
    config.batch_size = _BATCH.value
  try:
    preflight.check_values(config)
  except (ValueError, FileNotFoundError) as e:
    raise cli.BadInput(f"{type(e).__name__}: {e}") from e
  record = {"checked": True} if _CHECK_FLAGS.value else run(_CONFIG.value)
  sys.stdout.write(json.dumps(record) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
