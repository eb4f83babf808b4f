"""objectives/chunked.py: the loss, sums and gradients of a batch in chunks equal
those of the whole batch under plain autodiff; the gradients come back in image order."""

import jax
import jax.numpy as jnp
import numpy as np

from glare_jax.objectives import chunked


def sums_of(p, d, r, c):
  """Per-image terms summed over the images of the inputs: a nonlinear one of the
  parameters and the differentiated inputs, one of `rest`, one of the constants."""
  h = jnp.tanh(d["x"] @ p["w"]) * r["mask"][:, None]            # [b, 3]
  return {"a": jnp.sum(h ** 2), "b": jnp.sum(d["y"] * c["scale"]),
          "n": jnp.sum(r["mask"].astype(jnp.float32))}


def test_chunks_give_the_whole_batch_loss_sums_and_gradients():
  rng = np.random.default_rng(0)
  p = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  d = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
       "y": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  r = {"mask": jnp.asarray([1, 0, 1, 1, 0, 1], bool)}
  c = {"scale": jnp.float32(0.5)}
  coef = {"a": jnp.float32(0.3), "b": jnp.float32(-2.0)}

  def whole(p, d):
    s = sums_of(p, d, r, c)
    return 0.3 * s["a"] - 2.0 * s["b"], s

  def in_chunks(p, d):
    return chunked.weighted_sums_in_chunks(sums_of, 3, p, d, r, c, coef)

  (want, want_sums), want_grads = jax.value_and_grad(whole, (0, 1), has_aux=True)(p, d)
  (got, got_sums), got_grads = jax.jit(jax.value_and_grad(in_chunks, (0, 1), has_aux=True))(p, d)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in want_sums:
    np.testing.assert_allclose(got_sums[k], want_sums[k], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # d loss / d y is -2 * scale for every image: the chunks' gradients are put back
  # in image order (chunk c holds images c, c + 3).
  np.testing.assert_allclose(got_grads[1]["y"], np.full((6, 2), -1.0))
  # Without differentiation: the same loss and sums.
  loss, sums = jax.jit(in_chunks)(p, d)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(sums["n"]) == 4.0
  # A cotangent other than 1 scales the gradients.
  g2 = jax.grad(lambda p: 2.0 * in_chunks(p, d)[0])(p)
  np.testing.assert_allclose(g2["w"], 2.0 * np.asarray(want_grads[0]["w"]), rtol=1e-5)
