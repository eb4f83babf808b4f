"""Progress output, metrics.jsonl resumption, TensorBoard scalars and the NaN guard."""

import io
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_trainer
from glare_jax.train import checkpoint
from glare_jax.train import logging as train_logging


def metrics(loss, **extra):
  return {"loss": jnp.float32(loss), **{k: jnp.float32(v) for k, v in extra.items()}}


def make_logger(tmp_path, stream=None, **kw):
  kw = {**dict(total_steps=8, images_per_step=16, log_every_steps=2, tensorboard=False), **kw}
  return train_logging.MetricLogger(tmp_path, stream=stream or io.StringIO(), **kw)


def test_plain_lines_when_not_a_tty(tmp_path):
  out = io.StringIO()
  with make_logger(tmp_path, out) as log:
    for step in range(1, 5):
      log.record(step, metrics(1.0 / step, **{"loss/glob": 2.0}))
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in out.getvalue()
  assert lines[0].startswith("step 2/8 (25%) | ")
  assert " img/s | loss 0.5 | ETA " in lines[0] and "loss/glob" not in lines[0]
  assert lines[1].startswith("step 4/8 (50%)")
  kept = [r for r in train_logging.read_metrics(tmp_path / "metrics.jsonl")]
  assert kept[0]["loss/glob"] == 2.0     # every metric in the file, not on the console


def test_line_fits_100_columns_and_eta_leaves_out_the_compile(tmp_path, monkeypatch):
  """A 10 s first step (compiling) then 0.1 s steps: the ETA is the steps' time."""
  clock = [1000.0]
  monkeypatch.setattr(train_logging.time, "perf_counter", lambda: clock[0])
  class Tty(io.StringIO):
    def isatty(self):
      return True
  out = Tty()
  many = {f"loss/term_{i}": 1e6 + i for i in range(20)}
  with make_logger(tmp_path, out, total_steps=100_000, log_every_steps=10) as log:
    clock[0] += 10.0                       # the first call compiles before it returns
    for step in range(1, 21):
      log.record(step, metrics(123456.789, **many))
      clock[0] += 0.1
  lines = [l.strip("\r\n").replace("\x1b[K", "") for l in out.getvalue().split("\r") if l]
  assert lines and all(len(l) <= 100 for l in lines), lines
  # Step 20 is logged 1.9 s after step 1 was recorded: 99_980 steps left at 1.9 / 20 s
  # = 2:38:18 (with the 10 s compile in it, it would be 16:31:24).
  assert lines[-1].endswith("ETA 2:38:18"), lines[-1]
  assert "160.0 img/s" in lines[-1]


def test_progress_bar_on_a_tty(tmp_path):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  out = Tty()
  with make_logger(tmp_path, out, log_every_steps=4) as log:
    for step in range(1, 9):
      log.record(step, metrics(1.0))
  text = out.getvalue()
  assert text.count("\r") == 2 and text.endswith("\n")
  assert "[##########..........] step 4/8 (50%)" in text
  assert "[####################] step 8/8 (100%)" in text
  out = Tty()
  with make_logger(tmp_path, out, log_every_steps=4) as log:
    for step in range(1, 5):
      log.record(step, metrics(1.0))
  assert out.getvalue().endswith("\n")        # a stopped run still ends its line


def test_jsonl_resume_has_no_duplicate_steps(tmp_path):
  with make_logger(tmp_path, log_every_steps=1) as log:
    for step in range(1, 7):
      log.record(step, metrics(step))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss"')                     # torn line of a killed writer
  # Resumed from the step-4 checkpoint: steps 5 and 6 are recomputed.
  with make_logger(tmp_path, log_every_steps=1, start_step=4) as log:
    for step in range(5, 9):
      log.record(step, metrics(10 * step))
  records = train_logging.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["loss"] for r in records] == [1, 2, 3, 4, 50, 60, 70, 80]
  assert all(r["images_per_s"] > 0 for r in records)


def test_nonfinite_metrics_name_the_first_bad_step(tmp_path):
  with make_logger(tmp_path, log_every_steps=4) as log:
    log.record(1, metrics(1.0, **{"loss/reg": 0.5, "grad_norm": 1.0}))
    log.record(2, metrics(1.0, **{"loss/reg": 0.5, "grad_norm": 1.0}))
    log.record(3, metrics(1.0, **{"loss/reg": np.nan, "grad_norm": np.inf}))
    with pytest.raises(train_logging.NonFiniteError,
                       match=r"step 3: grad_norm=inf, loss/reg=nan\. Stopping"):
      log.record(4, metrics(np.nan, **{"loss/reg": np.nan, "grad_norm": np.nan}))
  assert train_logging.read_metrics(tmp_path / "metrics.jsonl") == []


def read_scalars(logdir):
  """(tag, step, value) of every scalar in the event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_tensorboard_scalars_only_on_log_steps(tmp_path):
  with make_logger(tmp_path, tensorboard=True) as log:
    for step in range(1, 5):
      log.record(step, metrics(step, **{"loss/loc1": 0.25}))
  scalars = read_scalars(tmp_path / "tensorboard")
  assert [(t, s, v) for t, s, v in scalars if t == "loss"] == [("loss", 2, 2.0), ("loss", 4, 4.0)]
  assert ("loss/loc1", 4, 0.25) in scalars
  assert {t for t, _, _ in scalars} == {"loss", "loss/loc1", "images_per_s"}


def test_nan_stops_the_run_and_the_last_good_checkpoint_resumes(tmp_path):
  """NaN at a checkpoint step: the bad state is not saved; restart from step 4."""
  opts = tiny_trainer.Options(steps=10, checkpoint_every=4, log_every=3, nan_at_step=8)
  with pytest.raises(train_logging.NonFiniteError, match=r"at step 8: .*loss=nan"):
    tiny_trainer.train(tmp_path, opts)
  with checkpoint.Checkpointer(tmp_path, every_steps=4, keep=2) as ckpt:
    assert ckpt.all_steps() == [4]
  assert [r["step"] for r in train_logging.read_metrics(tmp_path / "metrics.jsonl")] == [3, 6]

  opts.nan_at_step = 0
  state = tiny_trainer.train(tmp_path, opts).state
  assert int(state["step"]) == 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  steps = [r["step"] for r in train_logging.read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == [3, 6, 9, 10]
