"""glare_jax.testing writes UDI's training-checkpoint layout: the same keys and shapes
as the independent torch writer, and the converter reads it as a UDI teacher."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_vit as tv  # noqa: E402

from glare_jax import convert, testing  # noqa: E402


def test_layout_matches_the_torch_writer(tmp_path):
  path = testing.write_udi_checkpoint(tmp_path / "udi.pth", seed=1)
  ours = convert.read_torch_file(path)   # weights-only load: no pickled code needed
  ref, _ = tv.make_layout("udi_full", tv.TINY, grid=4,
                          head=dict(k=256, hidden=128, bottleneck=32))
  assert set(ours) == set(ref)
  for net in ("teacher", "student"):
    assert {k: tuple(v.shape) for k, v in ours[net].items()} == {
        k: tuple(v.shape) for k, v in ref[net].items()}
  # the one head is stored three times; student and teacher differ
  t = ours["teacher"]
  assert torch.equal(t["head.0.mlp.0.weight"], t["head.2.mlp.0.weight"])
  assert not torch.equal(t["backbone.backbone.pos_embed"],
                         ours["student"]["module.backbone.backbone.pos_embed"])


def test_converts_as_a_udi_teacher_with_peaked_attention(tmp_path):
  testing.write_udi_checkpoint(tmp_path / "udi.pth", pos_grid=3, out_dim=64, seed=2)
  params, spec, _ = convert.convert_checkpoint(tmp_path / "udi.pth")
  assert (spec.source_format, spec.which, spec.variant) == ("udi", "teacher", "tiny_test")
  assert (spec.num_prefix, spec.pos_grid, spec.head_dim_out) == (2, 3, 64)
  assert set(params) == {"backbone", "head", "cross_attention"}
  sd = testing.udi_state_dicts(pos_grid=3, out_dim=64, seed=2)["teacher"]
  np.testing.assert_array_equal(params["backbone"]["pos_embed"],
                                sd["backbone.backbone.pos_embed"])
  vit = tv.ViT(**{k: tv.TINY[k] for k in ("d", "depth", "heads", "mlp")}, num_prefix=2, grid=3)
  vit.load_state_dict({k[len("backbone.backbone."):]: torch.from_numpy(v)
                       for k, v in sd.items() if k.startswith("backbone.backbone.")})
  images = np.random.default_rng(0).standard_normal((4, 48, 48, 3)).astype(np.float32)
  _, attn = tv.torch_forward(vit, images)
  cls = attn[:, :, 0, 2:]                               # [4, heads, 9]
  assert cls.max(-1).mean() > 3 / cls.shape[-1]         # far from uniform


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'XL'"):
    testing.udi_state_dicts(variant="XL")
