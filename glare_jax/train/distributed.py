"""Multi-process start-up: `jax.distributed.initialize` from flags or the cluster.

Call `initialize(config.distributed)` first thing in a program, before any JAX
computation. Where the processes come from decides how it is configured:

    config.distributed.coordinator_address   what happens
    'host:port'                              explicit: num_processes, process_id from the config
    'auto'                                   JAX's own detection (Cloud TPU metadata, SLURM,
                                             Open MPI, Kubernetes)
    '' (default)                             SLURM with more than one task -> JAX's SLURM
                                             detection; TPU pod environment (several worker
                                             hosts) -> JAX's TPU detection; else one process

One process needs no initialisation: all local devices form the mesh. Calling
`initialize` again is harmless (the first call wins).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
from absl import logging

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to start: `method` in {'single', 'flags', 'auto', 'slurm', 'tpu'}."""
  method: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_started: Plan | None = None


def plan(dist_config: Any, environ: Mapping[str, str] | None = None) -> Plan:
  """Decides how to initialise from `config.distributed` and the environment."""
  env = os.environ if environ is None else environ
  address = str(dist_config.coordinator_address or "")
  if address == "auto":
    return Plan("auto")
  if address:
    num, pid = int(dist_config.num_processes), int(dist_config.process_id)
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"config.distributed: process_id={pid} must be in [0, num_processes="
                       f"{num})")
    if ":" not in address:
      raise ValueError(f"config.distributed.coordinator_address={address!r} must be "
                       "'host:port' (or 'auto', or '' for automatic detection)")
    return Plan("flags", dict(coordinator_address=address, num_processes=num,
                              process_id=pid))
  if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return Plan("slurm", dict(cluster_detection_method="slurm"))
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Plan("tpu")
  return Plan("single")


def initialize(dist_config: Any) -> Plan:
  """Initialises `jax.distributed` once, as `plan` decides; returns the plan used."""
  global _started
  if _started is not None:
    return _started
  p = plan(dist_config)
  if p.method != "single":
    is_initialized = getattr(jax.distributed, "is_initialized", lambda: False)
    if is_initialized():
      logging.info("distributed: already initialised elsewhere; keeping it")
    else:
      logging.info("distributed: initialising via %s %s", p.method, dict(p.kwargs))
      jax.distributed.initialize(**p.kwargs)
  _started = p
  logging.info("distributed: process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), p.method)
  return p
