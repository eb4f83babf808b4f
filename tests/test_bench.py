"""`python -m glare_jax.bench` end to end on CPU: one JSON line with the documented
keys, from the real step with every speed switch on (`:tiny,fast`)."""

import gzip
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from glare_jax import bench_table, profile_summary

REPO = pathlib.Path(__file__).resolve().parents[1]

KEYS = {"img_per_s", "step_ms", "compile_s", "peak_mem_gb", "device"}


def bench(*args, **env):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0",  # compile fast: timing is not tested
             **env)
  return subprocess.run([sys.executable, "-m", "glare_jax.bench", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_step_mode_prints_one_json_line(tmp_path):
  # DINO's objective keeps the compile short; the GLARE step runs in test_objectives
  # and test_device_cache. Every speed switch is on: bf16, 'auto' (= xla on CPU)
  # attention, scanned + rematerialised blocks, the device cache. The profile
  # cannot be written (its folder's parent is a file): the figures still come.
  (tmp_path / "file").write_text("")
  r = bench("--config=configs/loveda.py:tiny,fast,objective=dino", "--steps=2", "--warmup=0",
            "--records=16", "--source_size=96", "--config.crops.device_image_size=64",
            f"--profile={tmp_path / 'file' / 'trace'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "--profile: no trace" in r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  record = json.loads(lines[0])
  assert KEYS <= set(record), sorted(record)
  assert record["img_per_s"] > 0 and record["step_ms"] > 0 and record["compile_s"] > 0
  assert record["device"] == "cpu" and record["peak_mem_gb"] is None  # no memory stats on CPU
  assert record["batch"] == 8 and record["records"] == 16
  assert record["config"]["data_cache"] == "device" and record["config"]["scan_blocks"]
  assert record["xla_gflop_per_img"] > 0 and math.isfinite(record["loss"])


def test_unknown_dataset_size_is_explained():
  r = bench("--config=configs/ade20k.py:tiny", "--steps=1")
  assert r.returncode != 0
  assert "give --records and --source_size" in r.stderr


def test_gpu_script_is_valid_bash():
  script = REPO / "scripts" / "gpu_bench.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  if shutil.which("shellcheck"):
    out = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_table_reads_the_reference_lines_as_printed():
  text = ("2.11.0+cu130 1.0.15 NVIDIA H100 80GB HBM3\n"
          "torch eager batch=64: 300.4 ms/step, 213 img/s, warmup 9s, loss 9.123, peak mem 10.5 GiB\n"
          "torch eager batch=128: 347.8 ms/step, 368 img/s, warmup 2s, loss 9.101, peak mem 21.0 GiB\n")
  ref = bench_table.reference_figures(text)
  assert ref == {64: {"img_per_s": 213.0, "step_ms": 300.4, "peak_gib": 10.5},
                 128: {"img_per_s": 368.0, "step_ms": 347.8, "peak_gib": 21.0}}
  runs = [{"run": "fast_b512", "device": "NVIDIA H100 80GB HBM3", "batch": 512,
           "img_per_s": 2944.0, "step_ms": 173.9, "compile_s": 41.2, "peak_mem_gb": 51.3},
          {"run": "epoch_b512", "device": "NVIDIA H100 80GB HBM3", "batch": 512,
           "img_per_s": 2800.0, "epoch_s": 0.9, "run_s": 150.2}]
  rows = bench_table.table(ref, runs).splitlines()
  assert rows[2] == "| torch eager | 64 | 213 | 300.4 | - | 10.5 | 0.6 | - | - |"
  assert rows[3] == "| torch eager | 128 | 368 | 347.8 | - | 21.0 | 1.0 | - | - |"
  assert rows[4] == "| fast_b512 | 512 | 2944.0 | 173.9 | 41.2 | 51.3 | 8.0 | - | - |"
  assert rows[5] == "| epoch_b512 | 512 | 2800.0 | - | - | - | 7.6 | 0.9 | 150.2 |"
  assert rows[6].startswith("device: NVIDIA H100 80GB HBM3 |")
  assert "no reference" in bench_table.table({}, runs).splitlines()[-1]


@pytest.mark.slow
def test_gpu_script_rehearsal_on_cpu(tmp_path):
  """The GPU call's script end to end on this CPU (REHEARSE=1: tiny model, small
  batches), the least that proves it: every run's flags are accepted, the step and
  epoch runs (RUNS) print their JSON lines, the table lists them, the batch-512
  run's profile comes back as text and as a trace. Python 3 on PATH is this
  interpreter, as on the GPU machine."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "python3").chmod(0o755)
  out = tmp_path / "out"
  env = dict(os.environ, REHEARSE="1", REHEARSE_CONFIG="tiny,objective=dino", OUT=str(out),
             WHEELS=str(tmp_path / "no_wheels"), PATH=f"{bin_dir}:{os.environ['PATH']}", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0", BUDGET="900",
             RUNS="fast_b512,epoch_b512")
  r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh")], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  runs = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
  # fast_b64 is fast_b128 at the rehearsal's batch of 8: skipped as the same run
  assert [x["run"] for x in runs] == ["fast_b512", "epoch_b512"]
  log = (out / "log.txt").read_text()
  for name in ("fast_b512_save_dots", "fast_b128", "fast_b512_xla_attention",
               "plain_device_aug_b128"):
    assert f"bench {name}: flags checked, not run" in log, log[-3000:]
  assert "bench fast_b64: the same run as fast_b128, skipped" in log
  assert all(x["img_per_s"] > 0 and x["compile_s"] > 0 for x in runs)
  assert runs[1]["mode"] == "epoch" and runs[1]["run_s"] > 0
  table = (out / "table.txt").read_text().splitlines()
  assert len(table) == 2 + len(runs) + 1 and table[-1].startswith("device: cpu")
  profile = (out / "profile_b512.txt").read_text()
  assert "busy" in profile and "ms  calls  share  op" in profile, profile
  assert (out / "trace_b512.json.gz").is_file() and not (out / "trace").exists()


PROBE = '''
import os, sys, threading, time
def _watch():  # wraps JAX's backend start once jax is imported in this process
  while True:
    xb = sys.modules.get("jax._src.xla_bridge")
    if xb is not None and hasattr(xb, "_init_backend"):
      real = xb._init_backend
      def started(platform, *a, **k):
        with open(os.environ["PROBE_OUT"], "a") as f:
          f.write(f"{os.getpid()} {platform}\\n")
        return real(platform, *a, **k)
      xb._init_backend = started
      return
    time.sleep(0.002)
threading.Thread(target=_watch, daemon=True).start()
'''


@pytest.mark.slow
def test_input_workers_start_no_jax_backend(tmp_path):
  """grain's worker processes must not start a JAX backend: on a GPU each would
  claim most of the card's memory. Host and device augmentation, 2 workers."""
  (tmp_path / "sitecustomize.py").write_text(PROBE)
  for config in ("configs/loveda.py:tiny", "configs/loveda.py:tiny,fast"):
    out = tmp_path / f"started_{len(config)}.txt"
    r = bench(f"--config={config}", "--mode=input", "--steps=3", "--batch=8", "--records=32",
              "--source_size=96", "--config.crops.device_image_size=64",
              "--config.num_workers=2", PROBE_OUT=str(out),
              PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["img_per_s"] > 0
    started = out.read_text().split()
    assert len(started) == 2 and started[1] == "cpu", started  # the main process, once


def test_profile_summary_counts_self_time_per_device_thread(tmp_path):
  meta = lambda pid, name, tid=None: ({"ph": "M", "pid": pid, "name": "process_name",
                                       "args": {"name": name}} if tid is None else
                                      {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                                       "args": {"name": name}})
  op = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name,
                                        "ts": ts, "dur": dur}
  trace = {"traceEvents": [
      meta(1, "/device:GPU:0"), meta(1, "XLA Ops", 10), meta(1, "Stream #7(Compute)", 11),
      meta(2, "/host:CPU"),
      op(1, 10, "fusion.1", 0, 1000), op(1, 10, "gemm", 1000, 3000),
      op(1, 10, "fusion.1", 4000, 1000),
      op(1, 11, "scope", 0, 2000), op(1, 11, "kernel_a", 500, 500),  # nested: 1.5 + 0.5 ms
      op(2, 5, "host_work", 0, 9000), op(2, 5, "$bench.py:1 run", 0, 9000)]}
  text = profile_summary.summarise(trace, top=5).splitlines()
  assert text[0] == "trace span 9.0 ms"
  assert "/device:GPU:0 / XLA Ops: busy 5.0 ms (56% of the span), 3 ops" in text
  rows = [line.split() for line in text]
  assert ["3.00", "1", "60.0%", "gemm"] in rows and ["2.00", "2", "40.0%", "fusion.1"] in rows
  assert ["1.50", "1", "75.0%", "scope"] in rows and ["0.50", "1", "25.0%", "kernel_a"] in rows
  assert not any("host_work" in line for line in text)   # the host only without a device

  # The command reads the newest trace below a jax.profiler folder.
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "vm.trace.json.gz", "wt") as f:
    json.dump(trace, f)
  r = subprocess.run([sys.executable, "-m", "glare_jax.profile_summary", str(tmp_path)],
                     cwd=REPO, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "gemm" in r.stdout, r.stderr
  r = subprocess.run([sys.executable, "-m", "glare_jax.profile_summary", str(folder / "none")],
                     cwd=REPO, capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "holds no *.trace.json.gz" in r.stderr
