r"""The miniature Table 1: source model -> continual step -> probe and FPN mIoU, 3 seeds.

    python scripts/mini_table.py --workdir=/tmp/mini_table [--seeds=3] [--quick]

Run from the repository root. Every stage is a config of configs/demo_mini.py:

1. `stage=source`: UDI's objective from scratch on `demo_source`, every weight
   trained; its teacher's backbone is exported as a converted checkpoint
   (WORKDIR/source_model), the "UDI" starting point of every row.
2. Per row and seed: continual pre-training on `demo`, adapters only (UDI -> UDI,
   UDI -> FLSL, UDI -> GLARE and GLARE's Table 5 levels), whose metrics.jsonl
   holds the dense linear probe at step 0 and at the end; then the FPN fine-tune
   (`stage=seg`) of its teacher with the same seed. The row "UDI (source)" probes
   and fine-tunes the source model itself.
3. WORKDIR/table.md and table.json: mean +- std over the seeds of the probe mIoU,
   its change from the source model, and the fine-tuned mIoU.

Everything runs in this process, with a persistent compilation cache in
WORKDIR/jax_cache (seeds 2 and 3 of a row reuse seed 1's programs). A re-run
skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # configs/ and glare_jax/ from this checkout

# Row key -> (label, objective, GLARE levels); 'random' and 'source' have no continual step.
ROWS = {
    "random": ("random init (no pre-training)", None, None),
    "source": ("UDI (source model, no continual step)", None, None),
    "udi": ("UDI -> UDI", "udi", "all"),
    "glare": ("UDI -> GLARE (all levels)", "glare", "all"),
    "flsl": ("UDI -> FLSL", "flsl", "all"),
    "glob": ("GLARE: global only", "glare", "glob"),
    "glob_loc": ("GLARE: global + local", "glare", "glob_loc"),
    "glob_reg": ("GLARE: global + regional", "glare", "glob_reg"),
    "reg_loc": ("GLARE: regional + local", "glare", "reg_loc"),
}

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run, the table and the cache go.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per row (continual step and fine-tune).")
_QUICK = flags.DEFINE_bool("quick", False, "Every stage a few steps long (a smoke run).")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to run, of {list(ROWS)}.")
_DATA_DIR = flags.DEFINE_string("dataset_dir", "", "Where the generated datasets go (default: the configs' data_dir).")
flags.mark_flag_as_required("workdir")


def _config(arg: str, data_dir: str):
  from configs import demo_mini  # pylint: disable=g-import-not-at-top
  c = demo_mini.get_config(arg + (",quick" if _QUICK.value else ""))
  if data_dir:
    c.data_dir = data_dir
  return c


def _run(mode: str, config, workdir: pathlib.Path) -> None:
  """The checks and the run of glare_jax.main, in this process."""
  from glare_jax.train import checkpoint, finetune, pretrain  # pylint: disable=g-import-not-at-top
  module = pretrain if mode == "pretrain" else finetune
  if hasattr(module, "check"):
    module.check(config, workdir)
  checkpoint.check_config(config, workdir)
  module.run(config, str(workdir))


def source_model(workdir: pathlib.Path, data_dir: str) -> pathlib.Path:
  """Stage 1: pre-trains the source model (or finds it) and exports its teacher."""
  from glare_jax.models import load  # pylint: disable=g-import-not-at-top
  from glare_jax.train import init_checkpoint  # pylint: disable=g-import-not-at-top
  out = workdir / "source_model"
  if not (out / load.SPEC_FILE).is_file():
    _run("pretrain", _config("stage=source", data_dir), workdir / "source")
    backbone, spec = init_checkpoint.read_backbone(workdir / "source", "teacher")
    load.save_converted(out, {"backbone": backbone}, spec, overwrite=True)
  return out


def fine_tune(init: pathlib.Path | None, seed: int, workdir: pathlib.Path, data_dir: str,
              adapters: bool) -> float:
  """The FPN fine-tune's final validation mIoU (skipped when already finished);
  init None: from a random backbone."""
  c = _config("stage=seg", data_dir)
  c.seed, c.init_checkpoint = seed, str(init or "")
  if not adapters:
    c.model.adapter_mode = "none"
  done = workdir / "eval.json"
  if not done.is_file() or json.loads(done.read_text()).get("step") != c.total_steps:
    _run("finetune", c, workdir)
  return json.loads(done.read_text())["mIoU"]


def row_results(key: str, source: pathlib.Path, workdir: pathlib.Path, seeds: int,
                data_dir: str) -> dict[str, list[float]]:
  """{'probe': [per seed], 'finetune': [per seed]} of one row."""
  from glare_jax.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  from glare_jax.train import logging as train_logging  # pylint: disable=g-import-not-at-top
  _, objective, levels = ROWS[key]
  out = {"probe": [], "finetune": []}
  for seed in range(seeds):
    run_dir = workdir / key / f"seed_{seed}"
    if key == "random":          # a freshly initialised ViT of the source's architecture
      config = _config("stage=continual", data_dir)
      out["probe"].append(_probe_random(config, seed)["mIoU"])
      out["finetune"].append(fine_tune(None, seed, run_dir / "seg", data_dir, False))
      continue
    if objective is None:        # the source model itself: the probe is deterministic
      if not out["probe"]:
        config = _config("stage=continual", data_dir)
        out["probe"].append(probe_lib.score_checkpoint(config, str(source))[0]["mIoU"])
      out["finetune"].append(fine_tune(source, seed, run_dir / "seg", data_dir, False))
      continue
    c = _config(f"objective={objective},levels={levels}", data_dir)
    c.seed, c.init_checkpoint = seed, str(source)
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    probed = [r for r in train_logging.read_metrics(metrics) if "probe/mIoU" in r]
    if not probed or probed[-1]["step"] != _last_checkpoint(run_dir / "pretrain"):
      _run("pretrain", c, run_dir / "pretrain")
      probed = [r for r in train_logging.read_metrics(metrics) if "probe/mIoU" in r]
    out["probe"].append(probed[-1]["probe/mIoU"])
    out["finetune"].append(fine_tune(run_dir / "pretrain", seed, run_dir / "seg", data_dir,
                                     True))
  return out


def _last_checkpoint(workdir: pathlib.Path) -> int | None:
  from glare_jax.train import init_checkpoint  # pylint: disable=g-import-not-at-top
  try:
    return init_checkpoint.latest_step(workdir)
  except FileNotFoundError:
    return None


def _probe_random(config, seed: int) -> dict:
  """The probe of a ViT initialised with `seed` (no adapters, as the source model)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from glare_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from glare_jax.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  from glare_jax.models import vit_from_config  # pylint: disable=g-import-not-at-top
  from glare_jax.train import sharding  # pylint: disable=g-import-not-at-top
  prepare.prepare_generated(config.dataset, config.data_dir)
  vit = vit_from_config(config.model, drop_path=0.0, adapter_mode="none")
  size = config.probe.image_size
  params = vit.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh):
    return probe_lib.Probe.from_config(config, mesh, vit).run(params)


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def table(results: dict[str, dict[str, list[float]]], seeds: int) -> str:
  """The Markdown table: probe mIoU, its change from the source model, FPN mIoU."""
  base = np.mean(results["source"]["probe"]) if "source" in results else None
  lines = ["| row | probe mIoU | Δ probe vs source | FPN fine-tune mIoU |",
           "|---|---|---|---|"]
  for key, r in results.items():
    delta = ("" if base is None or key == "source"
             else f"{np.mean(r['probe']) - base:+.2f}")
    lines.append(f"| {ROWS[key][0]} | {_mean_std(r['probe'])} | {delta} | "
                 f"{_mean_std(r['finetune'])} |")
  lines.append(f"\nmean ± std over {seeds} seeds (std over seeds, ddof 0); the source "
               "model's probe is deterministic (one value). Seeds: the continual step's "
               "and the fine-tune's (random init: the initialisation's).")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(_ROWS.value) - set(ROWS))
  if unknown:
    raise app.UsageError(f"unknown rows {unknown}; known: {list(ROWS)}")
  workdir = pathlib.Path(_WORKDIR.value).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  start = time.perf_counter()
  source = source_model(workdir, _DATA_DIR.value)
  timings, results = {"source_pretraining": time.perf_counter() - start}, {}
  for key in _ROWS.value:        # the table is rewritten after every row
    t0 = time.perf_counter()
    results[key] = row_results(key, source, workdir, _SEEDS.value, _DATA_DIR.value)
    timings[key] = time.perf_counter() - t0
    logging.info("row %s: %s (%.0f s)", key, results[key], timings[key])
    text = table(results, _SEEDS.value)
    (workdir / "table.md").write_text(text + "\n")
    (workdir / "table.json").write_text(json.dumps(
        {"rows": results, "seconds": timings, "total_seconds": time.perf_counter() - start,
         "quick": _QUICK.value, "seeds": _SEEDS.value}, indent=2) + "\n")
  print(text)
  print(f"\n{(time.perf_counter() - start) / 60:.1f} min in all; {workdir / 'table.md'}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
