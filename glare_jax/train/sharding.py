"""Device mesh, shardings of the train state and the batch, process-local batches.

The mesh has two axes:

    data   pure data parallelism (parameters replicated)
    fsdp   data parallelism whose devices also split the parameters named by
           `config.mesh.fsdp_rules`

The batch is split over both axes (every device sees B / (data * fsdp) examples).
Parameters are replicated unless an FSDP rule names them; a rule shards the
largest dimension of the parameter that the axis size divides. Optimizer state
and the EMA teacher follow the parameter they mirror (matched by path suffix and
shape), everything else in the train state is replicated.

    mesh = make_mesh(config.mesh)
    shardings = state_shardings(jax.eval_shape(init, rng), mesh, config.mesh.fsdp_rules)
    state = jax.jit(init, out_shardings=shardings)(rng)
    batch = global_batch(next(data_iter), mesh)     # process-local numpy -> jax.Array
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")   # the batch's leading axis is split over both


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh from `config.mesh` (data=-1: all remaining devices).

  Axis types are `Auto` (the compiler propagates shardings), so model code needs
  no sharding annotations. `devices` defaults to all devices of all processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if fsdp < 1:
    raise ValueError(f"config.mesh.fsdp must be >= 1, got {fsdp}")
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data < 1 or data * fsdp != len(devices):
    raise ValueError(f"config.mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                     f"but there are {len(devices)}; set config.mesh.data=-1 to use them all")
  kwargs = {}
  if hasattr(jax.sharding, "AxisType"):
    kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), DATA_AXES, devices=devices, **kwargs)


def use_mesh(mesh: Mesh) -> contextlib.AbstractContextManager:
  """Context that makes `mesh` current (`jax.set_mesh` where JAX has it).

  Inside it, bare PartitionSpecs are accepted wherever a sharding is (e.g.
  `jax.lax.with_sharding_constraint(x, P('data'))`).
  """
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  if hasattr(jax.sharding, "use_mesh"):
    return jax.sharding.use_mesh(mesh)
  return mesh  # older JAX: Mesh is itself a context manager


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data' and 'fsdp'; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Examples each process loads per step: global / process_count, validated.

  The global batch is a property of the experiment, not of the hardware: it must
  be divisible by the number of processes and by the data-parallel size.
  """
  n_proc, dp = jax.process_count(), data_parallel_size(mesh)
  if global_batch % n_proc:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{n_proc} processes")
  if global_batch % dp:
    raise ValueError(
        f"config.batch_size={global_batch} is not divisible by the data-parallel size "
        f"{dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); pick a "
        f"batch size that is a multiple of {dp} or use fewer devices")
  return global_batch // n_proc


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Process-local numpy batch (a pytree, leading axis B_local) -> global jax.Arrays.

  Each process passes its own B / process_count examples (its shard of the
  data); the result is one array of leading size B, split over the mesh's data
  axes, each process's examples in the rows its devices hold.
  """
  sharding = batch_sharding(mesh)
  n_proc = jax.process_count()

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch entry {path_str(path)!r} is a scalar; every batch "
                       "entry needs a leading batch axis")
    local_batch_size(x.shape[0] * n_proc, mesh)
    return jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])

  return jax.tree_util.tree_map_with_path(put, local)


def path_str(path: Iterable[Any]) -> str:
  """A jax key path -> 'a/b/0/c' (dict keys, attribute names, sequence indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_shardings(params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = ()) -> Any:
  """NamedShardings for a parameter tree from (regex, axis) rules.

  The first rule whose regex fully matches the '/'-joined path decides: axis
  None or '' replicates; a mesh axis name shards the largest dimension of the
  parameter that the axis size divides (replicated, with a log line, when none
  does). Unmatched parameters are replicated. `params` may hold arrays or
  jax.ShapeDtypeStructs.
  """
  compiled = []
  for regex, axis in rules:
    if axis and axis not in mesh.shape:
      raise ValueError(f"config.mesh.fsdp_rules: axis {axis!r} of rule {regex!r} is not "
                       f"a mesh axis {tuple(mesh.shape)}")
    compiled.append((re.compile(regex), axis or None))

  sharded = []

  def one(path, leaf):
    name = path_str(path)
    axis = next((a for r, a in compiled if r.fullmatch(name)), None)
    shape = tuple(leaf.shape)
    if axis is None or mesh.shape[axis] == 1:
      return replicated(mesh)
    size = mesh.shape[axis]
    order = sorted(range(len(shape)), key=lambda i: -shape[i])  # stable: first on ties
    dim = next((i for i in order if shape[i] % size == 0), None)
    if dim is None:
      logging.info("sharding: %s %s stays replicated (no dimension divisible by %s=%d)",
                   name, shape, axis, size)
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[dim] = axis
    sharded.append((name, shape, P(*spec)))
    return NamedSharding(mesh, P(*spec))

  out = jax.tree_util.tree_map_with_path(one, params)
  for name, shape, spec in sharded:
    logging.info("sharding: %s %s -> %s", name, shape, tuple(spec))
  if any(axis for _, axis in rules) and not sharded:
    logging.warning("sharding: config.mesh.fsdp_rules %s sharded no parameter", rules)
  return out


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = (),
                    params_key: str = "params") -> Any:
  """Shardings for a whole train state (a dict holding `state[params_key]`).

  Parameters follow `rules` (see `param_shardings`). Any other leaf whose path
  ends with a parameter's path and has its shape (the EMA teacher's copy, Adam's
  `mu`/`nu`) gets that parameter's sharding; the rest (step, rng, centres,
  counters) is replicated. `state` is usually `jax.eval_shape(init, rng)`.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(
      param_shardings(state[params_key], mesh, rules))[0]:
    by_path[path_str(path)] = sharding
  shapes = {path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(state[params_key])[0]}

  def one(path, leaf):
    parts = path_str(path).split("/")
    for i in range(len(parts)):             # longest matching suffix first
      suffix = "/".join(parts[i:])
      if suffix in by_path and shapes[suffix] == tuple(getattr(leaf, "shape", ())):
        return by_path[suffix]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, state)
