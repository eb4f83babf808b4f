"""grain input pipelines over the prepared records (no TensorFlow).

    train = pretrain_input(config)             # or segmentation_input(config, transform)
    it = iter(train.dataset)                   # a grain DatasetIterator
    batch = next(it)                           # this process's share of the batch
    state = it.get_state()                     # save with the checkpoint ...
    it.set_state(state)                        # ... and continue exactly there

Every training pipeline is the same chain: the record ids of the split (a
deterministic `train_fraction` subset, appendix C.3) -> one global stream, the
ids in a seeded order re-drawn each epoch, endless -> global batches of
`batch_size` consecutive stream positions, of which process p of P reads the
p-th slice of `batch_size // P` (`GlobalOrder`) -> the per-record work. The
processes' slices of a global batch are disjoint and, concatenated in process
order, are the batch one process would read: the data do not depend on the
process count. The per-record work draws from
`numpy.random.default_rng([seed, epoch, record_id])`, so a record's augmentation
depends only on the seed, the epoch and the record: not on the process layout,
the worker count or the position in the stream. With `num_workers > 0` the work
runs in that many grain worker processes (the per-record callables and
`transform`s must be picklable); with 0, in this process. Either way the batches
are identical. (With data_cache='device' each process orders the shard it holds
in device memory, `ids[process_index::process_count]`, the same way; there the
batches depend on the process count.)

Pre-training elements (batched to [B, ...]; docs/DESIGN.md):
  crops.augment_on == 'host':
    global_crops [G, Sg, Sg, 3] f32, local_crops [L, Sl, Sl, 3] f32,
    boxes [G + L, 4] f32 (x0, y0, x1, y1) in source pixels, flips [G + L] bool
  crops.augment_on == 'device':
    image [D, D, 3] uint8: the image, shrunk (bicubic, aspect kept) to fit in
      D x D when larger (D = crops.device_image_size), zero-padded at the
      bottom/right,
    image_hw [2] int32: the (h, w) of the image inside the padding,
    boxes [V, 4] f32 (in the pixels of that (h, w) image), flips [V] bool;
    the step draws the photometric parameters and renders the crops.
  ... and data_cache == 'device': the images are decoded once, before the first
    batch (`TrainInput.cache_images`, for glare_jax/data/device_cache.py), and
    `image` is replaced by index [] int32, the record's row in that cache; the
    same records in the same order with the same views.
Segmentation training elements: {image [H, W, 3] uint8, label [H, W] uint8}
after `transform(image, label, rng)`; batching needs it to return fixed sizes.
Evaluation elements (one whole image at a time, not batched):
  {image [H, W, 3] uint8, label [H, W] uint8, file_name str}.
Labels are the dataset's own ids (reduce_zero_label is the transform's job).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

from absl import flags
import grain
import jax
import ml_collections as mlc
import numpy as np
from PIL import Image

from glare_jax.data import device_cache
from glare_jax.data import multicrop
from glare_jax.data.codec import decode_image, decode_label

# (image, label, rng) -> (image, label); e.g. glare_jax.data.seg_transforms.
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                     tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """An endless stream of this process's batches, and how it was made."""
  dataset: grain.IterDataset  # iter() -> a DatasetIterator with get/set_state
  num_records: int            # records in the (fraction of the) split, all processes
  batch_size: int             # per process
  steps_per_epoch: int        # num_records // global batch size
  # data_cache='device': this process's sources [cache_rows, D, D, 3] uint8 in shard
  # order, black past its N_p records (for device_cache.put), and that row count,
  # the same in every process.
  cache_images: np.ndarray | None = None
  cache_rows: int = 0


# ----------------------------------------------------------------------------
# Records, subsets and shards.
# ----------------------------------------------------------------------------


def open_split(dataset: str, data_dir: os.PathLike | str, split: str
               ) -> Sequence[dict[str, Any]]:
  """Random access to a prepared split: records {image, label: bytes, file_name}."""
  # Imported here: only reading prepared records needs tfds (a pipeline fed with
  # in-memory records does not).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from glare_jax.data import builders  # pylint: disable=g-import-not-at-top
  builder = builders.get_builder(dataset, data_dir)
  if not builder.is_prepared():
    args = f"--dataset={dataset}" if dataset.startswith("demo") else (
        f"--dataset={dataset} --manual_dir=PATH")
    if dataset.startswith("folder/"):
      args = f"--dataset=folder --name={dataset[7:]} --images=DIR [--masks=DIR]"
    raise FileNotFoundError(
        f"dataset {dataset!r} is not prepared in {builder.data_dir}; run:\n"
        f"  python -m glare_jax.data.prepare {args} --data_dir={data_dir}")
  splits = sorted(builder.info.splits)
  if split.isidentifier() and split not in splits:
    raise ValueError(f"dataset {dataset!r} in {builder.data_dir} has no split "
                     f"{split!r}; prepared splits: {splits}")
  raw = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
  return builder.as_data_source(split, decoders=raw)


def subset_indices(num_records: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted ids of a deterministic `fraction` of `num_records` (appendix C.3).

  The subsets are prefixes of one seeded permutation, so the 10 % subset lies
  inside the 20 % one, and so on; the training seed does not change them.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
  count = max(1, round(fraction * num_records))
  return np.sort(np.random.default_rng(seed).permutation(num_records)[:count])


def shard_indices(indices: np.ndarray, process_index: int, process_count: int
                  ) -> np.ndarray:
  """This process's share of `indices`: every `process_count`-th from its index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, process_count={process_count})")
  return indices[process_index::process_count]


ENDLESS = 2**62   # the length of a stream that never ends (grain needs a __len__)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, num_records: int, epoch: int) -> np.ndarray:
  """[num_records] the visiting order of `epoch` (cached: consecutive elements
  share their epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_records)


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """This process's elements of the global stream, a random-access sequence.

  Stream position g is record `ids[epoch_permutation(seed, N, g // N)[g % N]]`
  (N = len(ids)); global batch j is positions [j * B, (j + 1) * B); process p
  of P reads positions j * B + p * b ... j * B + (p + 1) * b - 1 of it
  (b = B / P). Element k of this process -> [epoch, record id] int64.
  """
  ids: np.ndarray          # [N] record ids
  seed: int
  global_batch: int        # B
  process_index: int = 0   # p
  process_count: int = 1   # P

  def __len__(self) -> int:
    return ENDLESS

  def __getitem__(self, k: int) -> np.ndarray:
    b = self.global_batch // self.process_count
    g = (k // b) * self.global_batch + self.process_index * b + k % b
    epoch, i = divmod(g, len(self.ids))
    order = epoch_permutation(self.seed, len(self.ids), epoch)
    return np.asarray([epoch, self.ids[order[i]]], np.int64)


def fit_image(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """[H, W, 3] -> ([size, size, 3]: shrunk to fit if larger, zero-padded; (h, w))."""
  height, width = image.shape[:2]
  scale = min(1.0, size / max(height, width))
  h, w = max(1, round(height * scale)), max(1, round(width * scale))
  if (h, w) != (height, width):
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
  out = np.zeros((size, size, 3), np.uint8)
  out[:h, :w] = image
  return out, (h, w)


# ----------------------------------------------------------------------------
# Per-record work (picklable: it travels to the worker processes).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PretrainExample:
  source: Sequence[dict[str, Any]] = dataclasses.field(repr=False)  # grain logs reprs
  crops: mlc.ConfigDict
  seed: int

  def __call__(self, element: np.ndarray) -> dict[str, Any]:
    epoch, record = (int(v) for v in element)          # a GlobalOrder element
    rng = np.random.default_rng([self.seed, epoch, record])
    image = decode_image(self.source[record]["image"])   # [H, W, 3]
    if self.crops.augment_on == "device":
      image, hw = fit_image(image, self.crops.device_image_size)
      out = multicrop.augment_record(image, rng, self.crops, image_hw=hw)
      return {**out, "image_hw": np.asarray(hw, np.int32)}
    return multicrop.augment_record(image, rng, self.crops)


@dataclasses.dataclass(frozen=True)
class _FittedImage:
  """One record decoded and fitted for the device cache (as `_PretrainExample` ships it)."""
  source: Sequence[dict[str, Any]] = dataclasses.field(repr=False)  # grain logs reprs
  size: int

  def __call__(self, record: int) -> dict[str, np.ndarray]:
    image, hw = fit_image(decode_image(self.source[int(record)]["image"]), self.size)
    return {"image": image, "image_hw": np.asarray(hw, np.int32)}


@dataclasses.dataclass(frozen=True)
class _ViewsExample:
  """Per-record work when the sources live on the device (data_cache='device'):
  the views of `_PretrainExample`'s device mode, from the same generator, and the
  record's position in the cache instead of its pixels."""
  shard: np.ndarray       # [N_p] record ids, in cache order
  image_hw: np.ndarray    # [N_p, 2] (h, w) of each cached image
  crops: mlc.ConfigDict
  seed: int

  def __call__(self, element: np.ndarray) -> dict[str, Any]:
    epoch, index = (int(v) for v in element)           # GlobalOrder over cache rows
    record = int(self.shard[index])
    rng = np.random.default_rng([self.seed, epoch, record])
    hw = (int(self.image_hw[index, 0]), int(self.image_hw[index, 1]))
    views = multicrop.sample_views(rng, hw, self.crops)
    return {"index": np.int32(index), "image_hw": np.asarray(hw, np.int32),
            "boxes": views["boxes"], "flips": views["flips"]}


@dataclasses.dataclass(frozen=True)
class _SegmentationExample:
  source: Sequence[dict[str, Any]] = dataclasses.field(repr=False)  # grain logs reprs
  transform: Transform | None
  seed: int

  def __call__(self, element: np.ndarray) -> dict[str, np.ndarray]:
    epoch, record = (int(v) for v in element)          # a GlobalOrder element
    rng = np.random.default_rng([self.seed, epoch, record])
    raw = self.source[record]
    image = decode_image(raw["image"])    # [H, W, 3] uint8
    label = decode_label(raw["label"])    # [H, W] uint8
    if self.transform is not None:
      image, label = self.transform(image, label, rng)
    return {"image": image, "label": label}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  source: Sequence[dict[str, Any]] = dataclasses.field(repr=False)  # grain logs reprs

  def __call__(self, record: int) -> dict[str, Any]:
    raw = self.source[int(record)]
    return {"image": decode_image(raw["image"]),
            "label": decode_label(raw["label"]),
            "file_name": raw["file_name"].decode()}


# ----------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None
               ) -> tuple[int, int]:
  if process_index is None or process_count is None:
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def _finish(ds: grain.MapDataset, num_workers: int, prefetch: int
            ) -> grain.IterDataset:
  """Reads ahead `prefetch` elements, in `num_workers` processes if > 0."""
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                             prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():   # grain reads its absl flags in the parent
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return out


def _records(config: mlc.ConfigDict, split: str, fraction: float, source,
             process_index: int | None, process_count: int | None):
  """(source, ids of the fraction, this process's index and count, its batch)."""
  index, count = _processes(process_index, process_count)
  if config.batch_size % count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{count} processes")
  if source is None:
    source = open_split(config.dataset, config.data_dir, split)
  subset_seed = config.train_fraction_seed if fraction < 1.0 else 0
  ids = subset_indices(len(source), fraction, subset_seed)
  if len(ids) < config.batch_size:
    raise ValueError(f"{config.dataset} {split}: {len(ids)} records, fewer than one "
                     f"batch of {config.batch_size}; lower config.batch_size")
  return source, ids, index, count, config.batch_size // count


def _batches(config: mlc.ConfigDict, order: GlobalOrder, work, batch: int,
             num_records: int, **extra) -> TrainInput:
  """`work(element)` over the elements of `order`, in batches of `batch`."""
  ds = grain.MapDataset.source(order).map(work).batch(batch, drop_remainder=True)
  return TrainInput(dataset=_finish(ds, config.num_workers, config.prefetch),
                    num_records=num_records, batch_size=batch,
                    steps_per_epoch=num_records // config.batch_size, **extra)


def _train_input(config: mlc.ConfigDict, split: str, fraction: float,
                 make_example, process_index: int | None,
                 process_count: int | None, source=None) -> TrainInput:
  source, ids, index, count, batch = _records(config, split, fraction, source,
                                              process_index, process_count)
  order = GlobalOrder(ids, config.seed, config.batch_size, index, count)
  return _batches(config, order, make_example(source), batch, len(ids))


def decode_fitted(source: Sequence[dict[str, Any]], records: np.ndarray, size: int,
                  num_workers: int = 0, prefetch: int = 2, rows: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Records decoded once and fitted into size x size (`fit_image`), in order.

  Returns images [max(N, rows), size, size, 3] uint8 (rows past N black: the
  device cache's padding, allocated here rather than copied on) and image_hw
  [N, 2] int32; the decoding runs in `num_workers` processes if > 0.
  """
  images = np.zeros((max(len(records), rows), size, size, 3), np.uint8)
  image_hw = np.zeros((len(records), 2), np.int32)
  ds = grain.MapDataset.source(np.asarray(records)).map(_FittedImage(source, size))
  for i, example in enumerate(_finish(ds, num_workers, prefetch)):
    images[i], image_hw[i] = example["image"], example["image_hw"]
  return images, image_hw


def views_input(config: mlc.ConfigDict, shard: np.ndarray, image_hw: np.ndarray,
                num_records: int, batch: int, **cache) -> TrainInput:
  """Batches of {index [B], image_hw [B, 2], boxes [B, V, 4], flips [B, V]} over
  sources already on the device (data_cache='device'): the records, their order
  and their views are those `pretrain_input` gives without the cache."""
  work = _ViewsExample(np.asarray(shard), np.asarray(image_hw, np.int32), config.crops,
                       config.seed)
  order = GlobalOrder(np.arange(len(shard)), config.seed, batch)   # this process's rows
  return _batches(config, order, work, batch, num_records, **cache)


def pretrain_input(config: mlc.ConfigDict, *, source: Sequence[dict[str, Any]] | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> TrainInput:
  """Multi-crop batches of `config.train_split` (fields: see pretrain_config).

  `source`: records {image: encoded bytes} to read instead of the prepared split
  (default: `open_split(config.dataset, ...)`). `process_index` / `process_count`
  default to jax.process_index() / count(). With `config.data_cache = 'device'` the
  process's shard is decoded here once (`cache_images`) and the batches carry
  record indices into it (`views_input`).
  """
  device_cache.check_config(config)
  split, fraction = config.train_split, config.train_fraction
  if config.data_cache == "device":
    source, ids, index, count, batch = _records(config, split, fraction, source,
                                                process_index, process_count)
    shard = shard_indices(ids, index, count)
    rows = device_cache.rows_per_process(len(ids), count)
    images, image_hw = decode_fitted(source, shard, config.crops.device_image_size,
                                     config.num_workers, config.prefetch, rows)
    return views_input(config, shard, image_hw, len(ids), batch, cache_images=images,
                       cache_rows=rows)
  make = lambda source: _PretrainExample(source, config.crops, config.seed)
  return _train_input(config, split, fraction, make, process_index, process_count, source)


def segmentation_input(config: mlc.ConfigDict, transform: Transform | None, *,
                       split: str = "train", process_index: int | None = None,
                       process_count: int | None = None) -> TrainInput:
  """Batches of transformed (image, label) pairs from the whole `split`.

  Reads config.dataset, data_dir, batch_size, num_workers, prefetch, seed.
  """
  make = lambda source: _SegmentationExample(source, transform, config.seed)
  return _train_input(config, split, 1.0, make, process_index, process_count)


def evaluation_dataset(config: mlc.ConfigDict, *, split: str = "validation",
                       max_images: int = 0, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """This process's share of `split` (of its first `max_images` records when
  that is not 0, over all processes), whole images one by one, in record order."""
  index, count = _processes(process_index, process_count)
  source = open_split(config.dataset, config.data_dir, split)
  total = min(len(source), max_images) if max_images else len(source)
  shard = shard_indices(np.arange(total), index, count)
  ds = grain.MapDataset.source(shard).map(_EvalExample(source))
  return _finish(ds, config.num_workers, config.prefetch)
