r"""Where the time of a jax.profiler trace goes, as text: the ops that cost most.

    python -m glare_jax.profile_summary TRACE_DIR [--top N]

TRACE_DIR is what `python -m glare_jax.bench --profile=TRACE_DIR` (or any
`jax.profiler.trace`) wrote; the newest `*.trace.json.gz` below it is read.
Each accelerator (a process named `/device:...`) gets, for its busiest
threads (its streams and XLA's op lines, which show the same time in other
words), the ops with the most self time: ms, calls and share of that thread's
busy time, and the busy time against the span of the trace. A trace with no
accelerator (a CPU run) gets the same for the host's threads. This is the profile a speed-up
should start from (BENCHMARKS.md), readable where no trace viewer is.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys
from typing import Any

from absl import flags

from glare_jax import cli


def newest_trace(root: pathlib.Path) -> pathlib.Path:
  traces = sorted(root.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"{root} holds no *.trace.json.gz (a jax.profiler.trace folder)")
  return traces[-1]


def self_times(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
  """(name, self time in us) of one thread's complete events: an event's duration
  less that of the events nested in it, so nested annotations count once."""
  out = []
  stack: list[list[Any]] = []          # [end, name, self time]
  for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
    while stack and stack[-1][0] <= e["ts"]:
      _, name, own = stack.pop()
      out.append((name, own))
    if stack:
      stack[-1][2] -= min(e["dur"], stack[-1][0] - e["ts"])
    stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
  out.extend((name, own) for _, name, own in stack)
  return out


def summarise(trace: dict[str, Any], top: int = 15, threads: int = 4) -> str:
  """The tables of the module doc for Chrome-trace JSON `trace` (traceEvents):
  for each accelerator (else the host), its `threads` busiest threads (streams,
  XLA op lines) with their `top` ops by self time."""
  events = trace.get("traceEvents", [])
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  # Python frames ('$file:line name') are the host's call stacks, not work.
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and not str(e.get("name", "")).startswith("$")]
  if not ops:
    return "no timed events in the trace"
  devices = sorted(pid for pid, name in process.items() if name.startswith("/device:"))
  pids = devices or sorted({e["pid"] for e in ops})
  start = min(e["ts"] for e in ops)
  span_ms = (max(e["ts"] + e["dur"] for e in ops) - start) / 1e3
  out = [f"trace span {span_ms:.1f} ms"
         + ("" if devices else " (no accelerator in the trace: host threads)")]
  for pid in pids:
    by_thread = collections.defaultdict(list)
    for e in ops:
      if e["pid"] == pid:
        by_thread[e.get("tid")].append(e)
    tables = []
    for tid, group in by_thread.items():
      total, calls = collections.Counter(), collections.Counter()
      for name, us in self_times(group):
        total[name] += us
        calls[name] += 1
      tables.append((sum(total.values()) / 1e3, tid, total, calls))
    for busy_ms, tid, total, calls in sorted(tables, key=lambda t: -t[0])[:threads]:
      label = f"{process.get(pid, pid)} / {thread.get((pid, tid), tid)}"
      out.append(f"\n{label}: busy {busy_ms:.1f} ms ({100 * busy_ms / span_ms:.0f}% of the "
                 f"span), {sum(calls.values())} ops")
      out.append(f"{'ms':>10} {'calls':>6} {'share':>6}  op")
      for name, us in total.most_common(top):
        out.append(f"{us / 1e3:10.2f} {calls[name]:6d} {100 * us / 1e3 / busy_ms:5.1f}%  "
                   f"{name[:120]}")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  fv = cli.flag_values()
  flags.DEFINE_integer("top", 15, "ops listed per thread", lower_bound=1, flag_values=fv)
  rest = cli.parse(fv, argv, prog="python -m glare_jax.profile_summary", doc=__doc__,
                   positional="TRACE_DIR")
  if len(rest) != 1:
    cli.fail(f"give one trace directory (got {len(rest)} arguments)")
  args = argparse.Namespace(trace_dir=pathlib.Path(rest[0]), top=fv.top)
  try:
    path = newest_trace(args.trace_dir)
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
  except (FileNotFoundError, OSError, ValueError) as e:
    return cli.report(e, verbose=fv.verbosity >= 1)
  print(f"{path}\n{summarise(trace, args.top)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
