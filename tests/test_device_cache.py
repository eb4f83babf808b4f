"""data_cache='device': sources decoded once and kept on the devices.

The cached pipeline yields the records, order and views of the uncached device
pipeline in one process (with several, each caches and reads only its shard),
and restores its position from a checkpointed state; the gather
returns each batch row's own source on every mesh layout; and one training step
from the cache equals one step from the shipped images: same crops, same loss,
same parameters.
"""

import itertools

import jax
import numpy as np
import pytest

from glare_jax.configs import common as config_lib
from glare_jax.data import device_cache
from glare_jax.data import pipeline
from glare_jax.data import prepare
from glare_jax.models import init_params
from glare_jax.train import pretrain, sharding

NUM_TRAIN, SIZE = 20, 64
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare.prepare("demo", data_dir, num_train=NUM_TRAIN, num_validation=2, image_size=SIZE)
  return data_dir


def make_config(data_dir, cache):
  c = config_lib.pretrain_config("demo", "tiny")  # 64 px globals, 4 x 32 px locals, batch 8
  c.data_dir = str(data_dir)
  c.crops.augment_on = "device"
  c.crops.device_image_size = 48  # the 64 px demo images are shrunk to fit
  c.data_cache = "device" if cache else "none"
  return c


def test_a_process_caches_and_reads_only_its_shard(demo_dir):
  one = pipeline.pretrain_input(make_config(demo_dir, True), process_index=0,
                                process_count=1)
  cached = pipeline.pretrain_input(make_config(demo_dir, True), process_index=1,
                                   process_count=2)
  assert cached.cache_images.shape == (NUM_TRAIN // 2, 48, 48, 3)
  assert cached.cache_rows == NUM_TRAIN // 2
  np.testing.assert_array_equal(cached.cache_images, one.cache_images[1::2])
  assert cached.batch_size == one.batch_size // 2
  rows = np.concatenate([b["index"] for b in itertools.islice(iter(cached.dataset), 6)])
  assert rows.min() >= 0 and rows.max() < NUM_TRAIN // 2


def test_cached_pipeline_gives_the_same_records_and_views(demo_dir):
  plain = pipeline.pretrain_input(make_config(demo_dir, False), process_index=0,
                                  process_count=1)
  cached = pipeline.pretrain_input(make_config(demo_dir, True), process_index=0,
                                   process_count=1)
  assert cached.cache_images.shape == (NUM_TRAIN, 48, 48, 3)
  assert cached.cache_rows == NUM_TRAIN
  assert (cached.num_records, cached.batch_size, cached.steps_per_epoch) == (
      plain.num_records, plain.batch_size, plain.steps_per_epoch)
  a, b = iter(plain.dataset), iter(cached.dataset)
  for _ in range(5):  # two epochs and more: the reshuffle too
    x, y = next(a), next(b)
    assert set(y) == {"index", "image_hw", "boxes", "flips"} and y["index"].dtype == np.int32
    np.testing.assert_array_equal(cached.cache_images[y["index"]], x["image"])
    for k in ("image_hw", "boxes", "flips"):
      np.testing.assert_array_equal(y[k], x[k])
  state = b.get_state()
  after = [next(b) for _ in range(3)]
  b.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(b)["index"], want["index"])


def mesh_config(fsdp):
  cfg = config_lib.pretrain_config("demo").mesh
  cfg.fsdp = fsdp
  return cfg


@pytest.mark.parametrize("fsdp", [1, 2])
def test_gather_takes_each_row_from_its_process_shard(fsdp):
  mesh = sharding.make_mesh(mesh_config(fsdp))  # 8 devices: (8, 1) or (4, 2)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  cache = device_cache.put(images, mesh, rows=7)  # padded like a smaller process shard
  assert cache.shape == (8, 7, 4, 4, 3) and cache.sharding.spec == sharding.batch_sharding(mesh).spec
  index = rng.integers(0, 5, 16).astype(np.int32)
  gathered = jax.jit(lambda c, i: device_cache.gather(c, i, mesh))(
      cache, sharding.global_batch(index, mesh))
  np.testing.assert_array_equal(gathered, images[index])
  with pytest.raises(ValueError, match="rows=3 < the 5 images"):
    device_cache.put(images, mesh, rows=3)


def test_config_is_checked(demo_dir):
  c = make_config(demo_dir, True)
  c.crops.augment_on = "host"
  with pytest.raises(ValueError, match="set config.crops.augment_on='device'"):
    pipeline.pretrain_input(c)
  c.data_cache = "host"
  with pytest.raises(ValueError, match="config.data_cache='host'"):
    pipeline.pretrain_input(c)


@pytest.mark.slow
def test_step_from_the_cache_equals_step_from_shipped_images(demo_dir):
  """The whole jitted update (gather, device augmentation, objective, optimizer) on
  the first batch of each pipeline. The objective is DINO's, the cheapest to
  compile: the two paths differ only before it, in where the sources come from."""
  mesh = sharding.make_mesh(mesh_config(1))
  results = []
  for cache_on in (False, True):
    config = make_config(demo_dir, cache_on)
    config.objective = "dino"
    train = pipeline.pretrain_input(config)
    t = pretrain.build(config, mesh, train.steps_per_epoch)
    batch = sharding.global_batch(next(iter(train.dataset)), mesh)
    cache = (device_cache.put(train.cache_images, mesh, train.cache_rows)
             if cache_on else None)
    shapes = jax.eval_shape(lambda k: init_params(t.models, k, config), jax.random.key(0))
    rng = np.random.default_rng(0)  # random weights without compiling the initialisers
    params = jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32),
                          shapes)
    state = t.init(params, jax.random.key(0))
    step = t.update.lower(state, batch, cache).compile(FAST_COMPILE)
    state, metrics = step(state, batch, cache)
    results.append((jax.device_get(metrics), jax.device_get(state["params"])))
  (m0, p0), (m1, p1) = results
  assert set(m0) == set(m1) and "loss/glob" in m0
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  assert np.isfinite(m0["loss"]) and abs(float(m0["loss"])) > 0
