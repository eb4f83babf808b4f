"""A weighted sum of per-image terms over a batch in chunks, differentiated chunk by chunk.

    loss, sums = weighted_sums_in_chunks(fn, chunks, params, diff, rest, consts, coef)

`loss = sum_k coef[k] * sums[k]`, `sums` added over chunks of B / chunks images;
only one chunk's intermediates are alive at a time and nothing is recomputed
(docs/DESIGN.md, "Head chunks"; the memory figures are in BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]


def _split(chunks: int, tree: Any) -> Any:
  """[B, ...] -> [chunks, B / chunks, ...], chunk c = images c, c + chunks, ..."""
  def one(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, tree)


def _unsplit(tree: Any) -> Any:
  """The inverse of `_split`."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def weighted(sums: Sums, coef: dict[str, jax.Array]) -> jax.Array:
  """sum_k coef[k] * sums[k]: the loss of the module doc."""
  return sum(coef[k] * sums[k] for k in coef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def weighted_sums_in_chunks(fn: Callable[..., Sums], chunks: int, params: Any, diff: Any,
                            rest: Any, consts: Any, coef: dict[str, jax.Array]
                            ) -> tuple[jax.Array, Sums]:
  per_chunk = jax.lax.map(lambda x: fn(params, x[0], x[1], consts),
                          (_split(chunks, diff), _split(chunks, rest)))
  sums = jax.tree.map(lambda x: jnp.sum(x, 0), per_chunk)
  return weighted(sums, coef), sums


def _forward(fn, chunks, params, diff, rest, consts, coef):
  def chunk(grad_params, inputs):
    d, r = inputs
    loss = lambda p, d_: (lambda s: (weighted(s, coef), s))(fn(p, d_, r, consts))
    (value, sums), (g_p, g_d) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, d)
    return jax.tree.map(jnp.add, grad_params, g_p), (value, sums, g_d)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_params, (values, per_chunk, grad_diff) = jax.lax.scan(
      chunk, zeros, (_split(chunks, diff), _split(chunks, rest)))
  sums = jax.tree.map(lambda x: jnp.sum(x, 0), per_chunk)
  return (jnp.sum(values), sums), (grad_params, _unsplit(grad_diff))


def _backward(fn, chunks, residuals, cotangents):
  del fn, chunks
  grad_params, grad_diff = residuals
  g = cotangents[0]                    # of the loss; `sums` is not differentiated
  scale = lambda t: jax.tree.map(lambda x: (g * x).astype(x.dtype), t)
  return scale(grad_params), scale(grad_diff), None, None, None


weighted_sums_in_chunks.defvjp(_forward, _backward)
