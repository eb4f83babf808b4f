"""Confusion matrix and mmseg metrics against hand-written NumPy."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.evaluation import metrics

C = 5


def numpy_confusion(pred, label, num_classes, ignore=255):
  cm = np.zeros((num_classes, num_classes), np.int64)
  for p, g in zip(pred.ravel(), label.ravel()):
    if g != ignore and 0 <= g < num_classes:
      cm[g, p] += 1
  return cm


def mmseg_reference(preds, labels, num_classes, ignore=255):
  """mmseg's intersect_and_union + total_area_to_metrics, per image then summed."""
  inter = union = area_label = 0
  for pred, label in zip(preds, labels):
    keep = label != ignore
    p, g = pred[keep], label[keep]
    hist = lambda x: np.histogram(x, bins=num_classes, range=(0, num_classes - 1))[0]
    i = hist(p[p == g])
    ap, ag = hist(p), hist(g)
    inter, union, area_label = inter + i, union + ap + ag - i, area_label + ag
  with np.errstate(divide="ignore", invalid="ignore"):
    iou, acc = inter / union, inter / area_label
  return 100 * inter.sum() / area_label.sum(), 100 * np.nanmean(iou), 100 * np.nanmean(acc), iou


def make_batch(seed, n=3, hw=(6, 7)):
  rng = np.random.default_rng(seed)
  label = rng.choice([0, 1, 2, 255], size=(n, *hw), p=[0.4, 0.3, 0.2, 0.1]).astype(np.uint8)
  pred = rng.choice([0, 1, 2, 4], size=(n, *hw), p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32)
  return pred, label   # class 3 never occurs; class 4 is predicted but never labelled


def test_confusion_matrix_matches_numpy_and_ignores():
  pred, label = make_batch(0)
  label[0, 0, :3] = [7, 200, 255]       # out-of-range labels are not counted, like mmseg
  cm = jax.jit(metrics.confusion_matrix, static_argnums=(2,))(pred, label, C)
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(cm, numpy_confusion(pred, label, C))


def test_metrics_match_mmseg_with_absent_classes():
  pred, label = make_batch(1)
  m = metrics.compute_metrics(numpy_confusion(pred, label, C))
  a_acc, miou, macc, iou = mmseg_reference(pred, label, C)
  assert m["aAcc"] == pytest.approx(a_acc)
  assert m["mIoU"] == pytest.approx(miou)
  assert m["mAcc"] == pytest.approx(macc)
  assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])   # absent from labels and preds
  assert m["IoU"][4] == 0.0 and math.isnan(m["Acc"][4])        # predicted, never labelled
  assert m["mIoU"] == pytest.approx(np.mean(m["IoU"][[0, 1, 2, 4]]))
  assert m["mAcc"] == pytest.approx(np.mean(m["Acc"][[0, 1, 2]]))
  np.testing.assert_allclose(m["IoU"][:3], 100 * iou[:3])


def test_hand_computed_example():
  label = np.array([[0, 0, 1, 255]])
  pred = np.array([[0, 1, 1, 0]])
  m = metrics.compute_metrics(numpy_confusion(pred, label, 3))
  # class 0: TP 1, FN 1, FP 0 -> IoU 1/2, Acc 1/2; class 1: TP 1, FP 1 -> IoU 1/2, Acc 1.
  assert m["aAcc"] == pytest.approx(100 * 2 / 3)
  np.testing.assert_allclose(m["IoU"][:2], [50.0, 50.0])
  np.testing.assert_allclose(m["Acc"][:2], [50.0, 100.0])
  assert math.isnan(m["IoU"][2]) and m["mIoU"] == pytest.approx(50.0)
  assert m["mAcc"] == pytest.approx(75.0) and m["num_pixels"] == 3


def test_accumulation_over_batches_equals_one_batch():
  batches = [make_batch(s) for s in range(3)]
  update = jax.jit(metrics.update_confusion)
  cm_dev = jnp.zeros((C, C), jnp.int32)
  host = metrics.ConfusionMatrix(C)
  for pred, label in batches:
    cm_dev = update(cm_dev, pred, label)
    host.add(metrics.confusion_matrix(pred, label, C))
  pred = np.concatenate([b[0] for b in batches])
  label = np.concatenate([b[1] for b in batches])
  whole = numpy_confusion(pred, label, C)
  np.testing.assert_array_equal(cm_dev, whole)
  np.testing.assert_array_equal(host.total, whole)
  assert host.total.dtype == np.int64
  a_acc, miou, macc, _ = mmseg_reference(pred, label, C)
  assert host.metrics()["mIoU"] == pytest.approx(miou)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_confusion_over_a_sharded_batch(axis_type):
  pred, label = make_batch(4, n=8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cm = jax.jit(metrics.confusion_matrix, static_argnums=(2,))(
      jax.device_put(pred, shard), jax.device_put(label, shard), C)
  np.testing.assert_array_equal(cm, numpy_confusion(pred, label, C))


def test_table_and_eval_json(tmp_path):
  pred, label = make_batch(5)
  m = metrics.compute_metrics(numpy_confusion(pred, label, C))
  names = ("grass", "water", "sand", "forest", "road")
  table = metrics.format_table(m, names)
  assert all(n in table for n in names) and f"mIoU {m['mIoU']:.2f}" in table
  path = metrics.write_eval_json(tmp_path / "run" / "eval.json", m, names, step=20, seed=1)
  data = json.loads(path.read_text())
  assert data["mIoU"] == pytest.approx(m["mIoU"], abs=1e-4) and data["step"] == 20
  assert data["per_class"]["forest"] == {"IoU": None, "Acc": None}
  assert data["per_class"]["road"]["IoU"] == 0.0
  with pytest.raises(ValueError, match="class names"):
    metrics.metrics_to_json(m, names[:2])
