"""Multi-seed aggregation of eval.json files and the fine-tuning configs."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.data import seg_transforms as st
from glare_jax.data.datasets import get_info
from glare_jax.evaluation import metrics, report
from glare_jax.models.segmenter import segmenter_from_config
from glare_jax.train.seg_schedule import schedule_from_config

NAMES = ("a", "b", "c")


def write_run(path, cm):
  return metrics.write_eval_json(path, metrics.compute_metrics(np.asarray(cm)), NAMES)


def test_aggregate_mean_std_and_absent_classes(tmp_path, capsys):
  cms = [[[5, 1, 0], [0, 4, 0], [0, 0, 0]],     # class c absent: null IoU
         [[4, 2, 0], [1, 3, 0], [0, 0, 2]],
         [[6, 0, 0], [2, 2, 0], [0, 1, 1]]]
  paths = [write_run(tmp_path / f"seed_{i}" / "eval.json", cm) for i, cm in enumerate(cms)]
  per_run = [metrics.compute_metrics(np.asarray(cm)) for cm in cms]
  out = report.main([str(p) for p in paths] + ["--out", str(tmp_path / "report.json"),
                                               "--name", "UDI -> GLARE"])
  miou = [m["mIoU"] for m in per_run]
  assert out["mIoU"]["mean"] == pytest.approx(np.mean(miou), abs=1e-3)
  assert out["mIoU"]["std"] == pytest.approx(np.std(miou), abs=1e-3)
  c_iou = [m["IoU"][2] for m in per_run[1:]]
  assert out["per_class"]["c"]["IoU"]["n"] == 2
  assert out["per_class"]["c"]["IoU"]["mean"] == pytest.approx(np.mean(c_iou), abs=1e-3)
  assert json.loads((tmp_path / "report.json").read_text())["num_runs"] == 3
  printed = capsys.readouterr().out
  assert printed.startswith("UDI -> GLARE: mIoU ") and f"{np.mean(miou):5.2f} (+-" in printed
  sample = report.aggregate(report.load_runs(paths), ddof=1)
  assert sample["aAcc"]["std"] == pytest.approx(
      np.std([m["aAcc"] for m in per_run], ddof=1), abs=1e-3)


def test_report_rejects_mixed_datasets_and_bad_files(tmp_path):
  a = write_run(tmp_path / "a.json", np.eye(3, dtype=int))
  b = metrics.write_eval_json(tmp_path / "b.json", metrics.compute_metrics(np.eye(2, dtype=int)),
                              ("x", "y"))
  with pytest.raises(ValueError, match="not the same dataset"):
    report.aggregate(report.load_runs([a, b]))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not an eval.json"):
    report.load_runs([tmp_path / "bad.json"])
  with pytest.raises(FileNotFoundError):
    report.load_runs([tmp_path / "missing.json"])


@pytest.mark.parametrize("name,dataset,steps,warmup", [
    ("loveda_seg", "loveda", 2000, 150), ("ade20k_seg", "ade20k", 20000, 1500),
    ("cityscapes_seg", "cityscapes", 20000, 1500),
    ("pascal_context_seg", "pascal_context", 20000, 1500)])
def test_configs_hold_the_protocol(name, dataset, steps, warmup):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.mode, c.dataset, c.total_steps, c.optim.warmup_steps) == ("finetune", dataset,
                                                                     steps, warmup)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.power, c.optim.min_lr) == (6e-5, 0.01, 1.0, 0.0)
  assert c.batch_size == 16 and c.num_seeds == 3 and c.eval.save_predictions is False
  assert c.model.pos_resize == "size" and c.model.drop_path == 0.1
  assert c.model.pos_grid * c.model.patch_size == c.crop_size
  assert tuple(c.fpn.feature_blocks) == (2, 5, 8, 11) and c.eval.mode == "whole"
  assert float(schedule_from_config(c)(steps)) == 0.0


def test_tiny_config_builds_the_pipeline():
  c = importlib.import_module("configs.loveda_seg").get_config("tiny,adapter_mode=none,slide")
  info = get_info(c.dataset)
  assert c.model.adapter_mode == "none" and c.eval.mode == "slide" and c.total_steps == 20
  t = st.train_transform_from_config(c, info)
  rng = np.random.default_rng(0)
  img, lab = t(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8),
               rng.integers(0, 8, (100, 100), dtype=np.uint8), rng)
  assert img.shape == (c.crop_size, c.crop_size, 3) and lab.max() <= 255
  model = segmenter_from_config(c, info.num_classes)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, c.crop_size, c.crop_size, 3)))[0])
  assert out.shape == (2, c.crop_size // 16, c.crop_size // 16, info.num_classes)
  assert st.test_transform_from_config(c, info).scale == (128, 128)
  with pytest.raises(ValueError, match="unknown config argument"):
    importlib.import_module("configs.loveda_seg").get_config("tinyy")
