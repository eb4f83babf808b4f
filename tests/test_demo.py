"""The generated demo dataset: deterministic, every class, labels = regions."""

import numpy as np

from glare_jax.data import datasets
from glare_jax.data import pipeline
from glare_jax.data import prepare
from glare_jax.data.builders import common
from glare_jax.data.builders import demo

SIZE = 64


def test_examples_are_deterministic_and_independent():
  image, label = demo.example(0, "train", 3, SIZE)
  again_image, again_label = demo.example(0, "train", 3, SIZE)
  np.testing.assert_array_equal(image, again_image)
  np.testing.assert_array_equal(label, again_label)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
  assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
  for other in (demo.example(0, "train", 4, SIZE), demo.example(1, "train", 3, SIZE),
                demo.example(0, "validation", 3, SIZE)):
    assert not np.array_equal(image, other[0])


def test_every_class_appears_and_regions_are_smooth():
  labels = np.stack([demo.example(0, "train", i, SIZE)[1] for i in range(24)])
  assert set(np.unique(labels)) == set(range(len(datasets.DEMO_CLASSES)))
  for label in labels:
    assert 1 <= len(np.unique(label)) <= 4
  # Regions, not pixel noise: few horizontal or vertical neighbours differ.
  changes = np.mean(labels[:, :, 1:] != labels[:, :, :-1]) + np.mean(
      labels[:, 1:] != labels[:, :-1])
  assert changes < 0.08


def _block_means(image, label, block=4):
  """Mean colour of each block x block cell lying inside one region."""
  h, w = label.shape
  cells = image.reshape(h // block, block, w // block, block, 3).mean((1, 3))
  cell_labels = label.reshape(h // block, block, w // block, block)
  pure = (cell_labels == cell_labels[:, :1, :, :1]).all((1, 3))
  return cells[pure], cell_labels[:, 0, :, 0][pure]


def test_labels_match_the_textured_regions():
  """A nearest-class-colour rule on unseen images recovers the labels."""
  train = [_block_means(*demo.example(0, "train", i, SIZE)) for i in range(24)]
  colours = np.concatenate([c for c, _ in train])
  classes = np.concatenate([k for _, k in train])
  centres = np.stack([colours[classes == k].mean(0)
                      for k in range(len(datasets.DEMO_CLASSES))])
  hits = []
  for i in range(8):
    cells, truth = _block_means(*demo.example(0, "validation", i, SIZE))
    guess = np.argmin(((cells[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    hits.append(guess == truth)
  assert np.mean(np.concatenate(hits)) > 0.95   # shuffled labels give ~0.25


def test_prepared_demo_holds_the_generated_examples(tmp_path):
  prepare.prepare("demo", tmp_path, num_train=5, num_validation=2, image_size=32,
                  seed=7)
  for split, count in (("train", 5), ("validation", 2)):
    source = pipeline.open_split("demo", tmp_path, split)
    assert len(source) == count
    for i in range(count):
      raw = source[i]
      index = int(raw["file_name"].decode()[:-4])
      image, label = demo.example(7, split, index, 32)
      np.testing.assert_array_equal(common.decode_image(raw["image"]), image)
      np.testing.assert_array_equal(common.decode_label(raw["label"]), label)


def test_source_domain_is_deterministic_and_differs_from_the_target():
  from glare_jax.data.builders import demo_source
  image, label = demo_source.example(0, "train", 3, SIZE)
  again = demo_source.example(0, "train", 3, SIZE)
  np.testing.assert_array_equal(image, again[0])
  np.testing.assert_array_equal(label, again[1])
  assert not np.array_equal(image, demo.example(0, "train", 3, SIZE)[0])
  labels = np.stack([demo_source.example(0, "train", i, SIZE)[1] for i in range(24)])
  assert set(np.unique(labels)) == set(range(len(datasets.DEMO_CLASSES)))

  # Palettes differ: the target's nearest-class-colour rule fails on the source.
  target = [_block_means(*demo.example(0, "train", i, SIZE)) for i in range(24)]
  colours = np.concatenate([c for c, _ in target])
  classes = np.concatenate([k for _, k in target])
  centres = np.stack([colours[classes == k].mean(0) for k in range(len(datasets.DEMO_CLASSES))])
  hits = []
  for i in range(8):
    cells, truth = _block_means(*demo_source.example(0, "validation", i, SIZE))
    guess = np.argmin(((cells[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    hits.append(guess == truth)
  assert np.mean(np.concatenate(hits)) < 0.5


def test_source_domain_prepares_as_its_own_dataset(tmp_path):
  path = prepare.prepare("demo_source", tmp_path, num_train=3, num_validation=2, image_size=32)
  assert path.parent.name == "demo_source"
  source = pipeline.open_split("demo_source", tmp_path, "validation")
  assert len(source) == 2
