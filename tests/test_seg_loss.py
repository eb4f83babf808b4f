"""Fine-tuning loss (vs PyTorch) and the mmcv poly + linear warm-up schedule."""

import jax.numpy as jnp
import numpy as np
import pytest

from glare_jax.objectives.segmentation import seg_cross_entropy
from glare_jax.train.seg_schedule import poly_warmup_schedule

from torch_ref import F, needs_torch, torch


@needs_torch
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_matches_mmseg_in_torch(avg_non_ignore):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)     # [B, h, w, C]
  labels = rng.integers(0, 6, (2, 16, 20)).astype(np.uint8)
  labels[:, :3] = 255
  t = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(16, 20),
                    mode="bilinear", align_corners=False)
  nll = F.cross_entropy(t, torch.from_numpy(labels.astype(np.int64)), ignore_index=255,
                        reduction="none")
  # mmseg: mean over all pixels unless avg_non_ignore (then over the labelled ones).
  ref = nll.sum() / ((labels != 255).sum() if avg_non_ignore else labels.size)
  out = seg_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                          avg_non_ignore=avg_non_ignore)
  assert float(out) == pytest.approx(float(ref), rel=1e-5)


def test_poly_schedule_with_linear_warmup_is_mmcv():
  lr, total, warm, ratio = 6e-5, 2000, 150, 1e-6
  sched = poly_warmup_schedule(lr, total, warmup_steps=warm, warmup_ratio=ratio)
  for t in [0, 1, 75, 149, 150, 151, 1000, 1999, 2000]:
    regular = lr * (1 - t / total)
    expected = regular * (1 - (1 - t / warm) * (1 - ratio)) if t < warm else regular
    assert float(sched(t)) == pytest.approx(expected, rel=1e-5, abs=1e-14)
  assert float(sched(0)) == pytest.approx(lr * 1e-6, rel=1e-4)
  assert float(sched(2000)) == 0.0
  power = poly_warmup_schedule(1.0, 10, power=0.9, min_lr=1e-4)
  assert float(power(5)) == pytest.approx((1 - 1e-4) * 0.5 ** 0.9 + 1e-4, rel=1e-5)
  with pytest.raises(ValueError, match="warmup_steps"):
    poly_warmup_schedule(lr, 100, warmup_steps=100)
