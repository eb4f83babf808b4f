"""A dense linear probe: how well frozen patch tokens segment, in seconds.

    probe = Probe.from_config(config, mesh)        # loads the capped splits once
    metrics = probe.run(backbone_params)           # {'mIoU', 'aAcc', 'mAcc', ...}

The FPN fine-tune (2k to 20k iterations, 3 seeds) has capacity of its own that
can hide how good the features are; a linear map cannot. Steps:

1. Features: the backbone's patch tokens [B, h, w, D] on images resized to
   `probe.image_size` (the final-norm tokens, or with `probe.feature_blocks` the
   concatenated outputs of those blocks, the FPN's taps), adapters included.
2. Targets: each patch's label distribution [B, h, w, C], the class fractions of
   its p x p pixels; ignored pixels are left out, patches without a labelled
   pixel have weight 0.
3. Fit: closed-form ridge regression of targets on features over the labelled
   train split (deterministic). Sufficient statistics (X'X, X'Y, sums) are summed
   per batch on the devices (the batch is sharded over the mesh's data axes) and
   in float64 on the host; the solve is in float64:
     W = (Cov_xx + lam I)^-1 Cov_xy,  b = mean_y - mean_x W,
     lam = probe.ridge * trace(Cov_xx) / D.
4. Score: logits = X W + b per patch, upsampled bilinearly to the label
   resolution (the resized label), argmax, and the confusion-matrix metrics of
   fine-tuning (`evaluation/metrics.py`: mIoU, aAcc, mAcc).

Images and labels are resized to a square of `probe.image_size` (labels by
nearest neighbour); only the first `probe.max_train_images` /
`probe.max_val_images` records of each split are used, decoded once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from PIL import Image

from glare_jax.data import datasets
from glare_jax.data.seg_transforms import to_train_ids
from glare_jax.evaluation import metrics as metrics_lib
from glare_jax.models.fpn import resize_bilinear

Array = jax.Array
# (backbone params, normalised images [B, S, S, 3]) -> patch features [B, h, w, D]
FeatureFn = Callable[[Any, Array], Array]


@dataclasses.dataclass(frozen=True)
class ProbeSplit:
  """Images and labels of one split at the probe's size (host arrays)."""
  images: np.ndarray   # [N, S, S, 3] uint8
  labels: np.ndarray   # [N, S, S] uint8 train ids, IGNORE_INDEX ignored


def resize_pair(image: np.ndarray, label: np.ndarray, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(image [H, W, 3] uint8, label [H, W]) -> both [size, size]: bilinear / nearest."""
  if image.shape[:2] == (size, size):
    return image, label
  image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST))
  return image, label


def load_split(config: mlc.ConfigDict, split: str, max_images: int) -> ProbeSplit:
  """The first `max_images` records of a prepared split (0: all), resized."""
  from glare_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from glare_jax.data.codec import decode_image, decode_label  # pylint: disable=g-import-not-at-top
  info = datasets.get_info(config.dataset, config.data_dir)
  source = pipeline.open_split(config.dataset, config.data_dir, split)
  count = min(len(source), max_images) if max_images else len(source)
  size = config.probe.image_size
  images = np.zeros((count, size, size, 3), np.uint8)
  labels = np.zeros((count, size, size), np.uint8)
  for i in range(count):
    raw = source[i]
    image, label = decode_image(raw["image"]), to_train_ids(decode_label(raw["label"]), info)
    if label.shape != image.shape[:2]:
      raise ValueError(f"{config.dataset} {split} record {raw['file_name']!r}: label "
                       f"{label.shape} does not match image {image.shape}")
    images[i], labels[i] = resize_pair(image, label.astype(np.uint8), size)
  if not np.any(labels != info.ignore_index):
    raise ValueError(f"{config.dataset} {split}: the first {count} records have no labelled "
                     "pixel; the probe needs labels (set probe.every_epochs=0)")
  return ProbeSplit(images, labels)


def patch_targets(labels: Array, patch: int, num_classes: int) -> tuple[Array, Array]:
  """labels [B, S, S] -> (class fractions [B, h, w, C], weight [B, h, w]: 1 where the
  patch has a labelled pixel). Ignored pixels (any id outside [0, C)) are left out."""
  b, s, _ = labels.shape
  h = s // patch
  onehot = jax.nn.one_hot(labels.astype(jnp.int32), num_classes, dtype=jnp.float32)  # 0 if ignored
  counts = onehot.reshape(b, h, patch, h, patch, num_classes).sum((2, 4))         # [B, h, h, C]
  total = counts.sum(-1)
  return counts / jnp.maximum(total, 1.0)[..., None], (total > 0).astype(jnp.float32)


def backbone_features(vit: Any, feature_blocks: Sequence[int] = ()) -> FeatureFn:
  """A FeatureFn of a ViT: its final-norm patch tokens, or the concatenated
  outputs of `feature_blocks` (0-indexed, before the final norm, as the FPN's)."""
  feature_blocks = tuple(feature_blocks)

  def features(params, images):
    tokens, aux = vit.apply({"params": params}, images)     # [B, P+N, D]
    (h, w), prefix = aux["grid"], aux["num_prefix"]
    parts = ([aux["blocks"][i] for i in feature_blocks] if feature_blocks else [tokens])
    x = jnp.concatenate([t[:, prefix:] for t in parts], axis=-1)   # [B, N, D']
    return x.reshape(x.shape[0], h, w, -1).astype(jnp.float32)

  return features


def solve_ridge(stats: dict[str, np.ndarray], ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """Summed statistics -> (W [D, C], b [C]) in float64 (module doc, step 3)."""
  n = stats["n"]
  if n <= 0:
    raise ValueError("the probe's train split has no labelled patch")
  mean_x, mean_y = stats["sx"] / n, stats["sy"] / n
  cov_xx = stats["xx"] / n - np.outer(mean_x, mean_x)
  cov_xy = stats["xy"] / n - np.outer(mean_x, mean_y)
  d = cov_xx.shape[0]
  lam = ridge * max(np.trace(cov_xx) / d, 1e-12)
  w = np.linalg.solve(cov_xx + lam * np.eye(d), cov_xy)
  return w, mean_y - mean_x @ w


class Probe:
  """The dense linear probe of the module doc, jitted once per probe."""

  def __init__(self, features: FeatureFn, train: ProbeSplit, val: ProbeSplit, *,
               num_classes: int, patch_size: int, mesh: jax.sharding.Mesh, batch_size: int,
               ridge: float, mean: Sequence[float], std: Sequence[float]):
    size = train.images.shape[1]
    if size % patch_size or val.images.shape[1] != size:
      raise ValueError(f"probe images of {size} px (val {val.images.shape[1]}) must be one "
                       f"size, a multiple of the patch size {patch_size}")
    from glare_jax.train import sharding  # pylint: disable=g-import-not-at-top
    sharding.local_batch_size(batch_size, mesh)   # divisibility, with a clear error
    self.train, self.val, self.mesh = train, val, mesh
    self.batch_size, self.ridge, self.num_classes = batch_size, ridge, num_classes
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0

    def patch_features(params, images):          # uint8 [B, S, S, 3] -> [B, h, w, D]
      return features(params, (images.astype(jnp.float32) - mean) / std)

    def stats(params, images, labels):
      x = patch_features(params, images)
      y, weight = patch_targets(labels, patch_size, num_classes)
      x, y, weight = (a.reshape(-1, a.shape[-1]) for a in (x, y, weight[..., None]))
      xw = x * weight
      hi = functools.partial(jnp.einsum, precision="highest")
      return dict(xx=hi("nd,ne->de", xw, x), xy=hi("nd,nc->dc", xw, y), sx=xw.sum(0),
                  sy=(y * weight).sum(0), n=weight.sum())

    def confusion(params, w, b, images, labels):
      x = patch_features(params, images)
      logits = jnp.einsum("bhwd,dc->bhwc", x, w, precision="highest") + b   # [B, h, w, C]
      logits = resize_bilinear(logits, labels.shape[1:3])                     # [B, S, S, C]
      pred = jnp.argmax(logits, axis=-1)
      return metrics_lib.confusion_matrix(pred, labels, num_classes)

    replicated = sharding.replicated(mesh)      # totals over the global batch, every process
    self._stats = jax.jit(stats, out_shardings=replicated)
    self._confusion = jax.jit(confusion, out_shardings=replicated)

  @classmethod
  def from_config(cls, config: mlc.ConfigDict, mesh: jax.sharding.Mesh,
                  vit: Any = None) -> "Probe":
    """The probe of a pre-training config (`config.probe`, `config.crops`) on `vit`
    (default: the ViT of `config.model`)."""
    from glare_jax.models import vit_from_config  # pylint: disable=g-import-not-at-top
    p = config.probe
    info = datasets.get_info(config.dataset, config.data_dir)
    vit = vit or vit_from_config(config.model, drop_path=0.0)
    return cls(backbone_features(vit, p.feature_blocks),
               load_split(config, p.train_split, p.max_train_images),
               load_split(config, p.val_split, p.max_val_images),
               num_classes=info.num_classes, patch_size=config.model.patch_size, mesh=mesh,
               batch_size=p.batch_size, ridge=p.ridge, mean=config.crops.mean,
               std=config.crops.std)

  def _batches(self, split: ProbeSplit):
    """This process's share of `split` as global batches; the last batch is padded
    with ignored labels (no weight in the fit, not counted in the score)."""
    from glare_jax.train import sharding  # pylint: disable=g-import-not-at-top
    n_proc, index = jax.process_count(), jax.process_index()
    local = self.batch_size // n_proc
    per_process = math.ceil(len(split.images) / n_proc)
    rows = np.arange(index * per_process, (index + 1) * per_process)
    steps = max(1, math.ceil(per_process / local))
    for s in range(steps):
      take = rows[s * local:(s + 1) * local]
      take = take[take < len(split.images)]
      images = np.zeros((local,) + split.images.shape[1:], np.uint8)
      labels = np.full((local,) + split.labels.shape[1:], datasets.IGNORE_INDEX, np.uint8)
      images[:len(take)], labels[:len(take)] = split.images[take], split.labels[take]
      yield sharding.global_batch((images, labels), self.mesh)

  def fit(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W [D, C], b [C]) float64: the ridge fit on the train split."""
    total: dict[str, np.ndarray] = {}
    for images, labels in self._batches(self.train):
      part = jax.device_get(self._stats(params, images, labels))
      for k, v in part.items():
        total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    return solve_ridge(total, self.ridge)

  def score(self, params: Any, w: np.ndarray, b: np.ndarray) -> metrics_lib.ConfusionMatrix:
    """The validation split's confusion matrix under the classifier (W, b)."""
    cm = metrics_lib.ConfusionMatrix(self.num_classes)
    w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    for images, labels in self._batches(self.val):
      cm.add(jax.device_get(self._confusion(params, w, b, images, labels)))
    return cm

  def run(self, params: Any) -> dict[str, Any]:
    """Fit on train, score on validation: compute_metrics' dict (percent)."""
    w, b = self.fit(params)
    return self.score(params, w, b).metrics()


def score_checkpoint(config: mlc.ConfigDict, checkpoint: str, which: str = "teacher"
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(compute_metrics' dict, what was probed) of a converted checkpoint or a
  pre-training workdir, with `config.probe` on `config.dataset` and `config.model`
  (adapters included; a checkpoint without adapters is probed without them)."""
  from glare_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from glare_jax.models import vit_from_config  # pylint: disable=g-import-not-at-top
  from glare_jax.train import init_checkpoint, sharding  # pylint: disable=g-import-not-at-top
  prepare.prepare_generated(config.dataset, config.data_dir)
  backbone, spec = init_checkpoint.read_backbone(checkpoint, which)
  has_adapters = any("adapter" in block for block in backbone.values()
                     if isinstance(block, dict))
  vit = vit_from_config(config.model, drop_path=0.0,
                        adapter_mode=config.model.adapter_mode if has_adapters else "none")
  p = config.probe
  shapes = jax.eval_shape(vit.init, jax.random.key(0),
                          jnp.zeros((1, p.image_size, p.image_size, 3), jnp.float32))["params"]
  params = init_checkpoint.fit_backbone(shapes, backbone, spec,
                                        pos_resize=config.model.pos_resize, path=checkpoint)
  mesh = sharding.make_mesh(config.mesh)
  probe = Probe.from_config(config, mesh, vit)
  with sharding.use_mesh(mesh):
    metrics = probe.run(jax.device_put(params, sharding.replicated(mesh)))
  about = dict(checkpoint=str(checkpoint), which=which, adapters=has_adapters,
               dataset=config.dataset, split=p.val_split, train_images=len(probe.train.images),
               val_images=len(probe.val.images), image_size=p.image_size,
               feature_blocks=list(p.feature_blocks), ridge=p.ridge)
  return metrics, about


def summary(metrics: dict[str, Any], prefix: str = "probe/") -> dict[str, float]:
  """{'probe/mIoU', 'probe/aAcc', 'probe/mAcc'}: the scalars a run logs."""
  return {f"{prefix}{k}": float(metrics[k]) for k in ("mIoU", "aAcc", "mAcc")}
