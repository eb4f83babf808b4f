"""jax.distributed start-up: the plan from flags / SLURM / TPU, and 2 processes = 1."""

import json

import ml_collections as mlc
import numpy as np
import pytest

import tiny_trainer
from glare_jax import integrity
from glare_jax.train import distributed
from glare_jax.train import logging as train_logging

SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


def dist(address="", num=1, pid=0):
  return mlc.ConfigDict(dict(coordinator_address=address, num_processes=num, process_id=pid))


@pytest.mark.parametrize("cfg,env,method,kwargs", [
    (dist(), {}, "single", {}),
    (dist("10.0.0.1:1234", 4, 2), SLURM, "flags",                  # flags win over the env
     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)),
    (dist("auto"), {}, "auto", {}),
    (dist(), SLURM, "slurm", dict(cluster_detection_method="slurm")),
    (dist(), {**SLURM, "SLURM_NTASKS": "1"}, "single", {}),      # one task: no coordinator
    (dist(), {"SLURM_JOB_ID": "42"}, "single", {}),               # salloc shell, not srun
    (dist(), {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu", {}),
    (dist(), {"TPU_WORKER_HOSTNAMES": "localhost"}, "single", {}),  # single-host TPU VM
])
def test_plan(cfg, env, method, kwargs):
  p = distributed.plan(cfg, env)
  assert (p.method, dict(p.kwargs)) == (method, kwargs)


@pytest.mark.parametrize("cfg,match", [
    (dist("10.0.0.1:1234", 2, 2), r"process_id=2 must be in \[0, num_processes=2\)"),
    (dist("10.0.0.1", 2, 0), "must be 'host:port'"),
])
def test_plan_rejects_bad_flags(cfg, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan(cfg, {})


def test_initialize_single_process_is_idempotent(monkeypatch):
  monkeypatch.setattr(distributed, "_started", None)
  for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
            "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(v, raising=False)
  first = distributed.initialize(dist())
  # A second call, even with other flags, keeps the first start-up.
  assert distributed.initialize(dist("127.0.0.1:1", 2, 1)) is first
  assert first.method == "single"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 processes x 4 CPU devices (data 2 x fsdp 4 across them) = 1 process x 8 devices."""
  port = tiny_trainer.free_port()
  common = ["--steps=6", "--checkpoint_every=3", "--log_every=1",
            "--data=2", "--fsdp=4", "--fsdp_rules=.*/kernel=fsdp",
            f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
  procs = [tiny_trainer.launch([f"--workdir={tmp_path / 'two'}", f"--process_id={i}",
                                f"--out={tmp_path / 'two.npz'}", *common], devices=4)
           for i in range(2)]
  try:
    ref = tiny_trainer.train(tmp_path / "one",
                             tiny_trainer.Options(steps=6, checkpoint_every=3, log_every=1)).state
  finally:
    outs = tiny_trainer.finish(*procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out

  two = np.load(tmp_path / "two.npz")
  for path, value in tiny_trainer.flatten(ref["params"]).items():
    np.testing.assert_allclose(two[f"params/{path}"], value, rtol=1e-4, atol=1e-6,
                               err_msg=path)
  loss = lambda d: [r["loss"] for r in train_logging.read_metrics(d / "metrics.jsonl")]  # noqa: E731
  np.testing.assert_allclose(loss(tmp_path / "two"), loss(tmp_path / "one"), rtol=2e-5)
  assert len(loss(tmp_path / "two")) == 6
  # One data-iterator file per process in every checkpoint.
  for step in ("3", "6"):
    files = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / step / "data").iterdir()
                   if p.name.startswith("process_"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    # Process 0's manifest covers what both processes wrote.
    integrity.verify(tmp_path / "two" / "checkpoints" / step)
    listed = json.loads((tmp_path / "two" / "checkpoints" / step / "manifest.json").read_text())
    assert {"data/process_0-of-2.json", "data/process_1-of-2.json"} <= set(listed["files"])
  # Only process 0 prints the progress.
  assert "step 6/6" in outs[0] and "step 6/6" not in outs[1]
