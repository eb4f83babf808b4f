r"""The table of BENCHMARKS.md from one `scripts/gpu_bench.sh` call's results.

    python -m glare_jax.bench_table OUT_DIR     # reads torch_ref.txt and bench.jsonl

`torch_ref.txt` is what the PyTorch reference step printed (lines like
`torch eager batch=64: 300.4 ms/step, 213 img/s, warmup 9s, loss 9.1, peak mem
10.5 GiB`); `bench.jsonl` holds one `glare_jax.bench` JSON line per run, with the
run's name under "run". The "x ref" column divides a run's img/s by the best
eager img/s of the reference in the same call.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

from glare_jax import cli

_REFERENCE_LINE = re.compile(r"torch eager batch=(\d+): ([\d.]+) ms/step, (\d+) img/s"
                             r".*peak mem ([\d.]+) GiB")
COLUMNS = ("run", "batch", "img/s", "step ms", "compile s", "peak GiB", "x ref", "epoch s",
           "100 epochs s")


def reference_figures(text: str) -> dict[int, dict[str, float]]:
  """{batch: {img_per_s, step_ms, peak_gib}} of the reference's eager lines."""
  return {int(m[1]): {"img_per_s": float(m[3]), "step_ms": float(m[2]),
                      "peak_gib": float(m[4])}
          for m in _REFERENCE_LINE.finditer(text)}


def _cell(value: Any) -> str:
  return "-" if value is None else str(value)


def table(reference: dict[int, dict[str, float]], runs: list[dict[str, Any]]) -> str:
  """Markdown rows: the reference first, then each run of `bench.jsonl`."""
  best = max((r["img_per_s"] for r in reference.values()), default=None)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for batch, r in sorted(reference.items()):
    lines.append(f"| torch eager | {batch} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | - | "
                 f"{r['peak_gib']} | {r['img_per_s'] / best:.1f} | - | - |")
  for r in runs:
    ratio = f"{r['img_per_s'] / best:.1f}" if best and r.get("img_per_s") else "-"
    cells = (r["run"], r.get("batch"), r.get("img_per_s"), r.get("step_ms"), r.get("compile_s"),
             r.get("peak_mem_gb"), ratio, r.get("epoch_s"), r.get("run_s"))
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  device = runs[0]["device"] if runs else "?"
  lines.append(f"device: {device} | x ref: img/s over the best torch eager img/s above"
               + ("" if best else " (no reference figure in this call)"))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  fv = cli.flag_values()
  rest = cli.parse(fv, argv, prog="python -m glare_jax.bench_table", doc=__doc__,
                   positional="OUT_DIR")
  if len(rest) != 1:
    cli.fail(f"give one OUT_DIR (got {len(rest)} arguments)")
  out = pathlib.Path(rest[0])
  ref_file, runs_file = out / "torch_ref.txt", out / "bench.jsonl"
  reference = reference_figures(ref_file.read_text()) if ref_file.exists() else {}
  runs = ([json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
          if runs_file.exists() else [])
  print(table(reference, runs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
