"""Aggregate the eval.json of several fine-tuning seeds: mean and std per metric.

    python -m glare_jax.evaluation.report runs/loveda_seg/seed_*/eval.json \
        --out runs/loveda_seg/report.json [--name "UDI -> GLARE"]

prints e.g. `mIoU 51.50 (+-0.01)  aAcc 70.20 (+-0.03)  mAcc 64.30 (+-0.05)` and a
per-class table. The standard deviation is NumPy's default (ddof=0, over the
seeds); `--ddof 1` gives the sample estimate. Per-class values that are null
(class absent from a run's labels and predictions) are left out of that class's
statistics.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any, Sequence

from absl import flags
import numpy as np

from glare_jax import cli

SUMMARY = ("mIoU", "aAcc", "mAcc")


def _stats(values: Sequence[float | None], ddof: int) -> dict[str, Any]:
  v = np.array([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None, "n": 0}
  std = float(np.std(v, ddof=ddof)) if v.size > ddof else math.nan
  return {"mean": round(float(v.mean()), 4), "std": None if math.isnan(std) else round(std, 4),
          "n": int(v.size)}


def aggregate(runs: Sequence[dict[str, Any]], ddof: int = 0) -> dict[str, Any]:
  """Mean / std over runs of every summary metric and per-class IoU and Acc."""
  if not runs:
    raise ValueError("aggregate needs at least one eval.json")
  classes = list(runs[0]["per_class"])
  for i, r in enumerate(runs):
    if list(r["per_class"]) != classes:
      raise ValueError(f"run {i} has classes {list(r['per_class'])[:3]}..., "
                       f"run 0 has {classes[:3]}...: not the same dataset")
  out = {"num_runs": len(runs), "ddof": ddof, "units": runs[0].get("units", "percent")}
  for key in SUMMARY:
    out[key] = _stats([r[key] for r in runs], ddof)
  out["per_class"] = {
      name: {m: _stats([r["per_class"][name][m] for r in runs], ddof) for m in ("IoU", "Acc")}
      for name in classes}
  return out


def _fmt(s: dict[str, Any]) -> str:
  if s["mean"] is None:
    return "   n/a        "
  std = "n/a" if s["std"] is None else f"{s['std']:.2f}"
  return f"{s['mean']:5.2f} (+-{std})"


def format_report(report: dict[str, Any], name: str = "") -> str:
  """The paper's Table 1 style: `mIoU 51.50 (+-0.01)` plus per-class rows."""
  head = "  ".join(f"{k} {_fmt(report[k])}" for k in SUMMARY)
  lines = [f"{name + ': ' if name else ''}{head}   [{report['num_runs']} runs]"]
  width = max(len("class"), *(len(c) for c in report["per_class"]))
  lines.append(f"{'class':<{width}}  {'IoU':<14}  {'Acc':<14}")
  for cls, s in report["per_class"].items():
    lines.append(f"{cls:<{width}}  {_fmt(s['IoU']):<14}  {_fmt(s['Acc']):<14}")
  return "\n".join(lines)


def load_runs(paths: Sequence[str | pathlib.Path]) -> list[dict[str, Any]]:
  runs = []
  for p in paths:
    p = pathlib.Path(p)
    if not p.is_file():
      raise FileNotFoundError(f"eval file {p} does not exist")
    try:
      runs.append(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(f"{p} is not valid JSON: {e}") from None
    missing = [k for k in (*SUMMARY, "per_class") if k not in runs[-1]]
    if missing:
      raise ValueError(f"{p} lacks {missing}: not an eval.json")
  return runs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Prints the aggregate of the eval.json files in `argv` (and writes --out)."""
  fv = cli.flag_values()
  flags.DEFINE_string("out", None, "write the aggregate here (JSON)", flag_values=fv)
  flags.DEFINE_string("name", "", "row label, e.g. 'UDI -> GLARE'", flag_values=fv)
  flags.DEFINE_integer("ddof", 0, "delta degrees of freedom of the std", lower_bound=0,
                       flag_values=fv)
  evals = cli.parse(fv, argv, prog="python -m glare_jax.evaluation.report", doc=__doc__,
                    positional="EVAL_JSON...")
  if not evals:
    cli.fail("give the eval.json files, one per seed; `--help` says how")
  try:
    report = aggregate(load_runs(evals), ddof=fv.ddof)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e, verbose=fv.verbosity >= 1)
  report["files"] = [str(p) for p in evals]
  print(format_report(report, fv.name))
  if fv.out:
    out = pathlib.Path(fv.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
  return report


if __name__ == "__main__":
  main()
  sys.exit(0)
