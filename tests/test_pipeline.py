"""grain pipelines on a small prepared demo dataset (24 train, 6 validation, 32 px).

The pre-training tests run the real multi-crop augmentation at tiny crop sizes;
they check the pipeline (tests/test_multicrop.py checks the augmentation).
"""

import hashlib
import json

import numpy as np
from PIL import Image
import pytest

from glare_jax.configs import common as config_lib
from glare_jax.data import pipeline
from glare_jax.data import prepare
from glare_jax.data.builders import common

NUM_TRAIN, NUM_VAL, SIZE = 24, 6, 32


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare.prepare("demo", data_dir, num_train=NUM_TRAIN, num_validation=NUM_VAL,
                  image_size=SIZE)
  return data_dir


def make_config(data_dir, **overrides):
  c = config_lib.pretrain_config("demo", "tiny")
  c.data_dir = str(data_dir)
  c.batch_size = 4
  c.num_workers = 0
  c.crops.global_size = 16
  c.crops.local_size = 8
  c.crops.num_local = 2
  for key, value in overrides.items():
    c[key] = value
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def digest(array):
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------
# Subsets and shards.
# ----------------------------------------------------------------------------


def test_fraction_subsets_are_deterministic_and_nested():
  subsets = {f: pipeline.subset_indices(2522, f, seed=0) for f in (0.1, 0.2, 0.5, 1.0)}
  assert [len(s) for s in subsets.values()] == [252, 504, 1261, 2522]
  for small, large in ((0.1, 0.2), (0.2, 0.5), (0.5, 1.0)):
    assert set(subsets[small]) <= set(subsets[large])
  for s in subsets.values():
    assert np.all(np.diff(s) > 0)     # sorted, no repeats
  np.testing.assert_array_equal(subsets[0.2], pipeline.subset_indices(2522, 0.2, 0))
  assert not np.array_equal(subsets[0.2], pipeline.subset_indices(2522, 0.2, 1))
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="train_fraction"):
      pipeline.subset_indices(10, bad, 0)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_process_shards_are_disjoint_and_covering(count):
  ids = np.arange(23) * 3
  shards = [pipeline.shard_indices(ids, i, count) for i in range(count)]
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), ids)
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  with pytest.raises(ValueError, match="process_index"):
    pipeline.shard_indices(ids, count, count)


def test_fit_image_shrinks_keeps_aspect_and_pads():
  image = np.full((100, 50, 3), 200, np.uint8)
  out, hw = pipeline.fit_image(image, 40)
  assert out.shape == (40, 40, 3) and hw == (40, 20)
  assert np.all(out[:40, :20] == 200) and np.all(out[:, 20:] == 0)
  small, hw = pipeline.fit_image(image[:10, :8], 40)     # never enlarged
  assert hw == (10, 8) and np.all(small[:10, :8] == 200)


# ----------------------------------------------------------------------------
# Pre-training.
# ----------------------------------------------------------------------------


def test_pretrain_batches_shapes_and_determinism(demo_dir):
  config = make_config(demo_dir)
  train = pipeline.pretrain_input(config, process_index=0, process_count=1)
  assert (train.num_records, train.batch_size, train.steps_per_epoch) == (24, 4, 6)
  batches = take(iter(train.dataset), 3)
  b = batches[0]
  assert b["global_crops"].shape == (4, 2, 16, 16, 3)
  assert b["local_crops"].shape == (4, 2, 8, 8, 3)
  assert b["global_crops"].dtype == b["local_crops"].dtype == np.float32
  assert b["boxes"].shape == (4, 4, 4) and b["boxes"].dtype == np.float32
  assert b["flips"].shape == (4, 4) and b["flips"].dtype == bool

  again = take(iter(pipeline.pretrain_input(config, process_index=0,
                                            process_count=1).dataset), 3)
  assert_batches_equal(batches, again)
  config.seed = 1
  other = take(iter(pipeline.pretrain_input(config, process_index=0,
                                            process_count=1).dataset), 1)
  assert not np.array_equal(other[0]["boxes"], batches[0]["boxes"])


def test_pretrain_device_augmentation_carries_images_and_views(demo_dir):
  config = make_config(demo_dir)
  config.crops.augment_on = "device"
  config.crops.device_image_size = 48
  batch = next(iter(pipeline.pretrain_input(config, process_index=0,
                                            process_count=1).dataset))
  assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image_hw"], np.full((4, 2), SIZE))
  assert np.all(batch["image"][:, SIZE:] == 0)
  assert np.all(batch["image"][:, :, SIZE:] == 0)
  assert batch["boxes"].shape == (4, 4, 4)
  assert batch["boxes"].max() <= SIZE
  assert "global_crops" not in batch


def test_iterator_state_restores_exactly(demo_dir):
  config = make_config(demo_dir)
  make = lambda: pipeline.pretrain_input(config, process_index=0, process_count=1)
  iterator = iter(make().dataset)
  take(iterator, 5)                       # 6 steps per epoch: the next 3 cross it
  state = iterator.get_state()
  json.dumps(state)                       # what a checkpoint stores
  expected = take(iterator, 3)
  restored = iter(make().dataset)
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected)


# ----------------------------------------------------------------------------
# Segmentation training: shards, epochs, fractions, per-record seeds.
# ----------------------------------------------------------------------------


def _train_images(data_dir):
  source = pipeline.open_split("demo", data_dir, "train")
  return [digest(common.decode_image(source[i]["image"])) for i in range(len(source))]


def _epoch(config, transform=None, index=0, count=1, epochs=1):
  train = pipeline.segmentation_input(config, transform, process_index=index,
                                      process_count=count)
  steps = train.steps_per_epoch * epochs
  return [b for b in take(iter(train.dataset), steps)]


def test_each_process_sees_its_shard_once_per_epoch(demo_dir):
  config = make_config(demo_dir)
  seen = []
  for index in range(2):
    batches = _epoch(config, index=index, count=2)
    assert batches[0]["image"].shape == (2, SIZE, SIZE, 3)
    assert batches[0]["label"].shape == (2, SIZE, SIZE)
    seen.append([digest(im) for b in batches for im in b["image"]])
  assert len(seen[0]) == len(set(seen[0])) == NUM_TRAIN // 2
  assert set(seen[0]).isdisjoint(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(_train_images(demo_dir))


def test_process_slices_concatenate_to_the_one_process_batches(demo_dir):
  """The data do not depend on the process count (two processes = one)."""
  config = make_config(demo_dir)
  one = _epoch(config, _noise_label, epochs=2)
  halves = [_epoch(config, _noise_label, index=i, count=2, epochs=2) for i in range(2)]
  for j, batch in enumerate(one):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][j][key], halves[1][j][key]]), batch[key])


def test_epochs_are_reshuffled(demo_dir):
  batches = _epoch(make_config(demo_dir), epochs=2)
  order = [digest(im) for b in batches for im in b["image"]]
  first, second = order[:NUM_TRAIN], order[NUM_TRAIN:]
  assert set(first) == set(second) == set(_train_images(demo_dir))
  assert first != second


def test_pretrain_fraction_reads_its_subset(demo_dir):
  config = make_config(demo_dir, train_fraction=0.5)
  train = pipeline.pretrain_input(config, process_index=0, process_count=1)
  assert (train.num_records, train.steps_per_epoch) == (12, 3)
  config.crops.augment_on = "device"        # the element carries the image
  config.crops.device_image_size = SIZE
  batches = take(iter(pipeline.pretrain_input(config, process_index=0,
                                              process_count=1).dataset), 3)
  seen = {digest(im) for b in batches for im in b["image"]}
  images = _train_images(demo_dir)
  assert seen == {images[i] for i in pipeline.subset_indices(NUM_TRAIN, 0.5, 0)}


def _noise_label(image, label, rng):
  return image, rng.integers(0, 256, label.shape, dtype=np.uint8)


def test_augmentation_depends_on_seed_epoch_and_record_only(demo_dir):
  config = make_config(demo_dir)
  def draws(batches):
    return {digest(im): digest(lab) for b in batches
            for im, lab in zip(b["image"], b["label"])}
  one_process = draws(_epoch(config, _noise_label))
  two_processes = {**draws(_epoch(config, _noise_label, 0, 2)),
                   **draws(_epoch(config, _noise_label, 1, 2))}
  assert one_process == two_processes
  two_epochs = _epoch(config, _noise_label, epochs=2)
  second = draws(two_epochs[len(two_epochs) // 2:])
  assert all(second[k] != v for k, v in one_process.items())


def test_two_worker_processes_match_in_process_and_restore(demo_dir):
  config = make_config(demo_dir)
  expected = take(iter(pipeline.segmentation_input(
      config, None, process_index=0, process_count=1).dataset), 6)
  config.num_workers = 2
  iterator = iter(pipeline.segmentation_input(config, None, process_index=0,
                                              process_count=1).dataset)
  assert_batches_equal(take(iterator, 3), expected[:3])
  state = iterator.get_state()
  json.dumps(state)
  assert_batches_equal(take(iterator, 3), expected[3:])
  iterator.set_state(state)               # rewind the running workers
  assert_batches_equal(take(iterator, 3), expected[3:])


def test_bad_batch_or_missing_dataset_is_explained(demo_dir, tmp_path):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.segmentation_input(make_config(demo_dir), None, process_index=0,
                                process_count=3)
  with pytest.raises(ValueError, match="24 records, fewer than one batch of 32"):
    pipeline.segmentation_input(make_config(demo_dir, batch_size=32), None,
                                process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError,
                     match=f"python -m glare_jax.data.prepare --dataset=demo "
                           f"--data_dir={tmp_path}"):
    pipeline.segmentation_input(make_config(tmp_path), None, process_index=0,
                                process_count=1)
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.evaluation_dataset(make_config(demo_dir), split="test",
                                process_index=0, process_count=1)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def test_evaluation_yields_whole_images_sharded(demo_dir):
  config = make_config(demo_dir)
  names = []
  for index in range(2):
    for element in pipeline.evaluation_dataset(config, process_index=index,
                                               process_count=2):
      assert element["image"].shape == (SIZE, SIZE, 3)
      assert element["label"].shape == (SIZE, SIZE)
      names.append(element["file_name"])
  assert sorted(names) == [f"{i:05d}.png" for i in range(NUM_VAL)]
  # Without explicit arguments the shard is jax.process_index() of jax.process_count().
  assert len(list(pipeline.evaluation_dataset(config))) == NUM_VAL
  # max_images: the split's first N records, shared out over the processes.
  firsts = [e["file_name"] for index in range(2) for e in pipeline.evaluation_dataset(
      config, max_images=3, process_index=index, process_count=2)]
  in_order = [e["file_name"] for e in pipeline.evaluation_dataset(
      config, process_index=0, process_count=1)]
  assert sorted(firsts) == sorted(in_order[:3])


def test_evaluation_keeps_each_image_size(tmp_path):
  rng = np.random.default_rng(0)
  sizes = {"3.png": (20, 28), "4.png": (12, 9)}
  for split in ("Train", "Val"):
    for name, hw in sizes.items():
      for folder, array in (("images_png", rng.integers(0, 256, hw + (3,), np.uint8)),
                            ("masks_png", rng.integers(0, 8, hw, np.uint8))):
        path = tmp_path / "manual" / split / "Rural" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
  prepare.prepare("loveda", tmp_path / "tfds", tmp_path / "manual")
  config = make_config(tmp_path / "tfds")
  config.dataset = "loveda"
  elements = list(pipeline.evaluation_dataset(config, process_index=0, process_count=1))
  assert {e["file_name"]: e["image"].shape[:2] for e in elements} == {
      f"Rural/{n}": hw for n, hw in sizes.items()}
  for e in elements:
    assert e["label"].shape == e["image"].shape[:2]


def test_per_record_work_does_not_print_its_source():
  """grain logs the repr of every map: an in-memory source of encoded images
  (glare_jax.bench, GBs) must not be part of it."""
  source = [{"image": b"\x89PNG" * 250_000}] * 64
  config = config_lib.pretrain_config("demo", "tiny")
  for work in (pipeline._PretrainExample(source, config.crops, 0),
               pipeline._FittedImage(source, 64),
               pipeline._SegmentationExample(source, None, 0),
               pipeline._EvalExample(source)):
    assert len(repr(work)) < 2000, type(work).__name__
