"""Mesh, shardings and process-local batches; 1 vs 8 devices and FSDP train alike."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tiny_trainer
from glare_jax.train import logging as train_logging
from glare_jax.train import sharding


def mesh_config(data=-1, fsdp=1):
  return mlc.ConfigDict(dict(data=data, fsdp=fsdp, fsdp_rules=()))


def test_make_mesh_fills_data_axis():
  mesh = sharding.make_mesh(mesh_config(-1, 2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh(mesh_config(), jax.devices()[:1]).shape) == {
      "data": 1, "fsdp": 1}


@pytest.mark.parametrize("data,fsdp,match", [(3, 2, "needs 6 devices"),
                                             (-1, 3, "does not divide the 8 devices"),
                                             (-1, 0, "must be >= 1")])
def test_make_mesh_rejects_bad_shapes(data, fsdp, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(mesh_config(data, fsdp))


def test_local_batch_size_is_global_over_processes():
  mesh = sharding.make_mesh(mesh_config(-1, 2))
  assert sharding.local_batch_size(16, mesh) == 16      # one process here
  with pytest.raises(ValueError, match=r"batch_size=12 .* data-parallel size 8 "
                                       r"\(mesh data=4 x fsdp=2\)"):
    sharding.local_batch_size(12, mesh)


def test_global_batch_splits_leading_axis_over_both_axes():
  mesh = sharding.make_mesh(mesh_config(-1, 2))
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "flip": np.arange(16) % 2 == 0}
  batch = sharding.global_batch(local, mesh)
  for k, x in batch.items():
    assert x.sharding.spec == P(("data", "fsdp"))
    assert [s.data.shape[0] for s in x.addressable_shards] == [2] * 8
    np.testing.assert_array_equal(np.asarray(x), local[k])
  with pytest.raises(ValueError, match="'step' is a scalar"):
    sharding.global_batch({"step": np.int32(3)}, mesh)


def test_param_rules_shard_largest_divisible_dimension(caplog):
  mesh = sharding.make_mesh(mesh_config(-1, 4))
  params = {"backbone": {"block_0": {"qkv": {"kernel": jnp.zeros((64, 192)),
                                             "bias": jnp.zeros((192,))}},
                         "pos_embed": jnp.zeros((1, 198, 64))},
            "head": {"kernel": jnp.zeros((6, 5))}}
  rules = ((r"backbone/.*/kernel", "fsdp"), (r"backbone/pos_embed", "fsdp"),
           (r"head/.*", "fsdp"), (r".*", None))
  with caplog.at_level("INFO"):
    out = sharding.param_shardings(params, mesh, rules)
  assert out["backbone"]["block_0"]["qkv"]["kernel"].spec == P(None, "fsdp")   # 192 > 64
  assert out["backbone"]["block_0"]["qkv"]["bias"].spec == P()                 # rule '.*': None
  assert out["backbone"]["pos_embed"].spec == P(None, None, "fsdp")            # 198 % 4 != 0
  assert out["head"]["kernel"].spec == P()                                     # nothing divides
  assert "backbone/block_0/qkv/kernel (64, 192) -> (None, 'fsdp')" in caplog.text
  assert "head/kernel (6, 5) stays replicated" in caplog.text
  with pytest.raises(ValueError, match="axis 'model' of rule"):
    sharding.param_shardings(params, mesh, ((".*", "model"),))


def test_state_shardings_follow_the_parameter_they_mirror():
  mesh = sharding.make_mesh(mesh_config(-1, 4))
  params = {"backbone": {"kernel": jnp.zeros((8, 32))}, "head": {"kernel": jnp.zeros((8, 32)),
                                                               "bias": jnp.zeros((32,))}}
  tx = optax.multi_transform({"t": optax.adamw(1e-3), "f": optax.set_to_zero()},
                             {"backbone": {"kernel": "f"}, "head": {"kernel": "t", "bias": "t"}})
  state = {"params": params, "opt_state": tx.init(params), "teacher": params,
           "step": jnp.int32(0), "centre": jnp.zeros((32,)), "rng": jax.random.key(0)}
  shapes = jax.eval_shape(lambda: state)
  out = sharding.state_shardings(shapes, mesh, (("head/kernel", "fsdp"),))
  fsdp = P(None, "fsdp")
  assert out["params"]["head"]["kernel"].spec == fsdp
  assert out["teacher"]["head"]["kernel"].spec == fsdp
  adam = out["opt_state"].inner_states["t"].inner_state[0]
  assert adam.mu["head"]["kernel"].spec == fsdp and adam.nu["head"]["kernel"].spec == fsdp
  assert adam.mu["head"]["bias"].spec == P() and adam.count.spec == P()
  # 'centre' has the shape of head/bias but its path does not end with it.
  for k in ("step", "centre", "rng"):
    assert out[k].spec == P()
  assert out["params"]["backbone"]["kernel"].spec == P()


def losses(workdir):
  return np.array([r["loss"] for r in train_logging.read_metrics(workdir / "metrics.jsonl")])


def test_one_eight_devices_and_fsdp_train_alike(tmp_path):
  """The global batch is fixed: 1 device, 8-way data parallel and 2x4 FSDP agree."""
  kw = dict(steps=5, log_every=1, checkpoint_every=0)
  one = tiny_trainer.train(tmp_path / "one", tiny_trainer.Options(**kw), jax.devices()[:1])
  dp = tiny_trainer.train(tmp_path / "dp", tiny_trainer.Options(**kw))
  rules = ((r".*/kernel", "fsdp"),)
  fsdp = tiny_trainer.train(tmp_path / "fsdp",
                            tiny_trainer.Options(**kw, data=2, fsdp=4, fsdp_rules=rules))

  ref = losses(tmp_path / "one")
  assert len(ref) == 5 and ref[-1] < ref[0]
  np.testing.assert_allclose(losses(tmp_path / "dp"), ref, rtol=2e-5)
  np.testing.assert_allclose(losses(tmp_path / "fsdp"), ref, rtol=2e-5)
  for other in (dp, fsdp):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 other.state["params"], one.state["params"])

  # The FSDP program kept kernels (and their teacher copies and Adam moments) sharded.
  sh = fsdp.shardings
  assert sh["params"]["hidden"]["kernel"].spec == P(None, "fsdp")  # [16, 64]
  assert sh["params"]["out"]["kernel"].spec == P("fsdp", None)     # [64, 8]
  assert sh["teacher"]["out"]["kernel"].spec == P("fsdp", None)
  adam = sh["opt_state"].inner_states["train"].inner_state[1][0]
  assert adam.mu["hidden"]["kernel"].spec == P(None, "fsdp")
  assert sh["params"]["hidden"]["bias"].spec == P() and sh["centre"].spec == P()
  assert dp.shardings["params"]["hidden"]["kernel"].spec == P()
