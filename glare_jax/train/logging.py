"""What a run reports: a progress line on stdout, `metrics.jsonl`, TensorBoard; NaN guard.

    logger = MetricLogger(workdir, total_steps=T, start_step=s0, images_per_step=B,
                          log_every_steps=config.log_every_steps)
    for step in range(s0 + 1, T + 1):
      state, metrics = update(state, batch)       # metrics: dict of scalar jax.Arrays
      logger.record(step, metrics)                # no device sync except on log steps
      if ckpt.due(step) or step == T:
        logger.flush()                            # raises NonFiniteError on NaN/Inf ...
        ckpt.save(step, state, data_iter)         # ... so a bad state is never saved
    logger.close()

`record` keeps the metrics of every step (device scalars, cheap) and `flush`
fetches them all at once: each step is checked for non-finite values, so the
error names the first bad step and its terms even between log steps. The values
of log steps (every `log_every_steps`, and the last step) are written.

The console gets one line of at most 100 columns per log step (step/total, %,
img/s, loss, ETA); every metric goes to metrics.jsonl and TensorBoard. Rates and
the ETA count from the first recorded step, so compiling is not in them.

On resume (`start_step` > 0) `metrics.jsonl` is cut back to the steps up to
`start_step` and TensorBoard purges later events, so no step appears twice.
Only process 0 writes; every process runs the check, so all stop together.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
  """A metric (loss term, gradient norm, ...) became NaN or Inf."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl; a torn last line (killed writer) is skipped."""
  out = []
  path = pathlib.Path(path)
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_value(v: float) -> str:
  return f"{v:.4g}"


WIDTH = 100   # columns of the progress line


class MetricLogger:
  """Progress line, metrics.jsonl and TensorBoard scalars of one run."""

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
               images_per_step: int, log_every_steps: int, tensorboard: bool = True,
               stream: TextIO | None = None, resume_note: Callable[[], str] | None = None):
    self.workdir = pathlib.Path(workdir)
    self.resume_note = resume_note   # e.g. Checkpointer.intact_note, for the NaN message
    self.total_steps = int(total_steps)
    self.images_per_step = int(images_per_step)
    self.log_every_steps = max(int(log_every_steps), 1)
    self.stream = sys.stdout if stream is None else stream
    self.writes = jax.process_index() == 0
    self._tty = self.writes and hasattr(self.stream, "isatty") and self.stream.isatty()
    self._pending: list[tuple[int, Mapping[str, Any]]] = []
    self._t_start = self._t_last = time.perf_counter()
    self._step_start = self._step_last = int(start_step)
    self._jsonl = None
    self._tb = None
    self._line_open = False
    self._started = False
    if self.writes:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = self._open_jsonl(self.workdir / "metrics.jsonl", int(start_step))
      if tensorboard:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(
            str(self.workdir / "tensorboard"),
            purge_step=int(start_step) + 1 if start_step else None)

  @staticmethod
  def _open_jsonl(path: pathlib.Path, start_step: int) -> TextIO:
    """Opens for appending after dropping records of steps > start_step."""
    if path.exists():
      kept = [r for r in read_metrics(path) if r.get("step", 0) <= start_step]
      tmp = path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      tmp.replace(path)
    return path.open("a", buffering=1)

  def is_log_step(self, step: int) -> bool:
    return step % self.log_every_steps == 0 or step == self.total_steps

  def record(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Keeps `metrics` (scalars) of `step`; on a log step, flushes."""
    if not self._started:    # the first step has compiled (dispatch waits for that)
      self._started = True
      self._t_start = self._t_last = time.perf_counter()
      self._step_start = self._step_last = int(step) - 1
    self._pending.append((int(step), metrics))
    if self.is_log_step(step):
      self.flush()

  def flush(self) -> None:
    """Fetches pending metrics, checks every step, writes the log steps.

    Raises NonFiniteError at the first step with a NaN/Inf value, naming it and
    its non-finite terms; nothing of that step or later is written.
    """
    if not self._pending:
      return
    pending, self._pending = self._pending, []
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), values in zip(pending, fetched):
      values = {k: float(np.asarray(v)) for k, v in values.items()}
      bad = sorted(k for k, v in values.items() if not math.isfinite(v))
      if bad:
        terms = ", ".join(f"{k}={values[k]}" for k in bad)
        raise NonFiniteError(
            f"non-finite metrics at step {step}: {terms}. Stopping; no checkpoint of "
            f"step {step} or later is written"
            + (f"; {self.resume_note()}" if self.resume_note else ""))
      if self.is_log_step(step):
        self._write(step, values)

  def _write(self, step: int, values: dict[str, float]) -> None:
    now = time.perf_counter()
    steps = step - self._step_last
    rate = steps * self.images_per_step / max(now - self._t_last, 1e-9)
    per_step = (now - self._t_start) / max(step - self._step_start, 1)
    eta = (self.total_steps - step) * per_step
    self._t_last, self._step_last = now, step
    if not self.writes:
      return
    record = {"step": step, **values, "images_per_s": rate}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    self._print(step, values, rate, eta)

  def progress_line(self, step: int, values: dict[str, float], rate: float,
                    eta: float) -> str:
    """'step 150/160 (94%) | 52.3 img/s | loss 5.543 | ETA 0:00:12' (<= WIDTH columns)."""
    frac = step / max(self.total_steps, 1)
    loss = values.get("loss", next(iter(values.values()), math.nan))
    line = (f"step {step}/{self.total_steps} ({100 * frac:.0f}%) | {rate:.1f} img/s | "
            f"loss {_fmt_value(loss)} | ETA {_fmt_duration(eta)}")
    if self._tty:
      bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
      line = f"[{bar}] {line}"
    return line[:WIDTH]

  def _print(self, step: int, values: dict[str, float], rate: float, eta: float) -> None:
    line = self.progress_line(step, values, rate, eta)
    if self._tty:
      self._line_open = step != self.total_steps
      end = "" if self._line_open else "\n"
      self.stream.write(f"\r{line}\x1b[K{end}")
    else:
      self.stream.write(f"{line}\n")
    self.stream.flush()

  def write_scalars(self, step: int, values: Mapping[str, float], label: str = "") -> None:
    """An evaluation's scalars of `step` (e.g. probe/mIoU), written at once as their own
    metrics.jsonl record, TensorBoard scalars and one printed line."""
    if not self.writes:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._line_open:
      self.stream.write("\n")
      self._line_open = False
    terms = " ".join(f"{k} {_fmt_value(v)}" for k, v in values.items())
    self.stream.write(f"{label or 'evaluation'} at step {step}/{self.total_steps} | {terms}\n")
    self.stream.flush()

  def close(self) -> None:
    if self._line_open:        # end the progress line before anything else prints
      self.stream.write("\n")
      self._line_open = False
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
