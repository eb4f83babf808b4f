"""Mutation check of the objectives' wiring: every mutant below changes one line
of glare_jax/objectives/ (or the cross-attention) the way a refactor might (a
view swapped, the wrong centre, temperature or normaliser, a mask negated or
dropped, a stop-gradient moved, a view index off by one), and the named fast
tests must fail on it.

    python scripts/mutants.py              # every mutant (~15 s each on 2 cores)
    python scripts/mutants.py -k loc1 -j 2 # those whose name holds 'loc1', 2 at a time
    python scripts/mutants.py --list

Each mutant runs in a copy of the checkout (the working tree is never edited).
The unmutated code must pass the same tests first. A surviving mutant is a
missing test: add the test. tests/test_mutants.py checks that every mutant's
text is still found exactly once, so the list cannot rot silently.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
COPIED = ("glare_jax", "configs", "tests", "pyproject.toml")

GLARE = "glare_jax/objectives/glare.py"
UDI = "glare_jax/objectives/udi.py"
DINO = "glare_jax/objectives/dino.py"
FLSL = "glare_jax/objectives/flsl.py"
COMMON = "glare_jax/objectives/common.py"
HEADS = "glare_jax/models/heads.py"
REF = "tests/test_objective_reference.py"
T_GLARE = (f"{REF}::test_glare_matches_reference_fast",)
T_DINO = (f"{REF}::test_dino_matches_reference",)
T_UDI = (f"{REF}::test_udi_matches_reference",)
T_FLSL = (f"{REF}::test_flsl_matches_reference",)
T_CLEAN = ("tests/test_paper_readings.py::test_clean_student_input_matches_reference",)
T_PAPER = ("tests/test_paper_readings.py::test_paper_form_cross_attention_matches_reference",)


class Mutant(NamedTuple):
  name: str
  path: str       # file relative to the repository root
  old: str        # text found exactly once in the file
  new: str
  tests: tuple[str, ...]


MUTANTS = (
    # --- GLARE: views
    Mutant("reg_teacher_ca_reads_own_view", GLARE,
           "student.last_patches(), other(teacher.last_patches()), regions, mapped)",
           "student.last_patches(), teacher.last_patches(), regions, mapped)", T_GLARE),
    Mutant("reg_regions_mapped_into_own_view", GLARE,
           "hw, other(boxes), other(flips), hw,", "hw, boxes, flips, hw,", T_GLARE),
    Mutant("reg_starts_from_other_view_attention", GLARE,
           "cls_attn = cls_attn.reshape(b, g, -1, hw[0] * hw[1])",
           "cls_attn = other(cls_attn.reshape(b, g, -1, hw[0] * hw[1]))", T_GLARE),
    Mutant("loc1_target_from_other_view", GLARE,
           "loc1_loss(distorted, teacher_patches, inp",
           "loc1_loss(distorted, other(teacher_patches), inp", T_GLARE),
    Mutant("loc2_globals_against_own_view", GLARE,
           "sum_g = loc2_sum(s_gp, other(t_p), cg.index", "sum_g = loc2_sum(s_gp, t_p, cg.index",
           T_GLARE),
    Mutant("loc2_locals_rows_not_offset_per_view", GLARE,
           "stacked = cl.index + n * jnp.arange(g)[:, None, None]",
           "stacked = cl.index + jnp.arange(g)[:, None, None]", T_GLARE),
    Mutant("glob_pairs_off_by_one", GLARE,
           "pairs = (jnp.arange(g)[:, None] != jnp.arange(v)[None, :])",
           "pairs = (jnp.arange(g)[:, None] + 1 != jnp.arange(v)[None, :])", T_GLARE),
    # --- GLARE: teacher / student
    Mutant("student_sees_clean_globals", GLARE,
           "student_distorted = self.student(sp, student_input, k_drop_g, patch_mask)",
           "student_distorted = self.student(sp, clean_global, k_drop_g, patch_mask)", T_GLARE),
    Mutant("teacher_runs_student_backbone", GLARE,
           "teacher_global = self.teacher(tp, clean_global)",
           "teacher_global = self.teacher(sp, clean_global)", T_GLARE),
    Mutant("teacher_head_is_student_head", GLARE,
           'consts = dict(head=tp["head"]', 'consts = dict(head=sp["head"]',
           T_GLARE),
    Mutant("reg_student_ca_with_teacher_params", GLARE,
           'lambda q, kv: ca.apply({"params": sp["cross_attention"]}, q, kv)',
           'lambda q, kv: ca.apply({"params": tp["cross_attention"]}, q, kv)', T_GLARE),
    Mutant("reg_stop_gradient_on_student", GLARE,
           "return z_s, jax.lax.stop_gradient(z_t), mask, mapped.keep",
           "return jax.lax.stop_gradient(z_s), z_t, mask, mapped.keep", T_GLARE),
    # --- GLARE: centres and temperatures
    Mutant("local_terms_use_global_centre", GLARE,
           'c = centres["local"]', 'c = centres["global"]', T_GLARE),
    Mutant("reg_uses_local_centre", GLARE,
           'mask, centres["region"], t_temp,', 'mask, centres["local"], t_temp,', T_GLARE),
    Mutant("glob_teacher_at_student_temperature", GLARE,
           'teacher_cls, centres["global"], t_temp, s_temp)',
           'teacher_cls, centres["global"], s_temp, s_temp)', T_GLARE),
    Mutant("local_centre_wrong_count", GLARE,
           "patches = views * grid[0] * grid[1]", "patches = views * grid[0]", T_GLARE),
    Mutant("centre_moves_away_from_teacher", COMMON,
           "return centre * momentum + batch_mean * (1.0 - momentum)",
           "return centre * (1.0 - momentum) + batch_mean * momentum", T_GLARE),
    Mutant("centre_added_not_subtracted", COMMON, "t = t - centre", "t = t + centre", T_GLARE),
    # --- GLARE: normalisers and masks
    Mutant("loc2_normalised_by_views", GLARE,
           'norm["loc2"] = jnp.maximum(loc2_count, 1.0)', 'norm["loc2"] = b * g', T_GLARE),
    Mutant("loc1_normalised_by_all_patches", GLARE,
           "per_view = jnp.sum(ce * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)",
           "per_view = jnp.sum(ce * m, -1) / m.shape[-1]", T_GLARE),
    Mutant("loc1_cells_negated", GLARE,
           "m = cells.astype(jnp.float32)", "m = (~cells).astype(jnp.float32)", T_GLARE),
    Mutant("reg_keep_mask_ignored", GLARE,
           "mask = mapped.inside & mapped.keep[..., None]", "mask = mapped.inside", T_GLARE),
    Mutant("reg_count_ignores_mask", GLARE,
           "reg_count = jnp.sum(reg_mask.astype(jnp.float32))",
           "reg_count = float(reg_mask.size)", T_GLARE),
    # --- GLARE: the switches of docs/DESIGN.md, "Readings of the paper"
    Mutant("clean_student_pass_ignored", GLARE,
           "student_global = self.student(sp, clean_global, jax.random.fold_in(k_drop_g, 1))",
           "student_global = student_distorted", T_CLEAN),
    Mutant("clean_student_loc1_reads_clean_pass", GLARE,
           "distorted = student_out[4] if self.clean_student else student_patches",
           "distorted = student_patches", T_CLEAN),
    Mutant("paper_cross_attention_normalises_context", HEADS,
           "norm1 = (lambda x: x) if paper else nn.LayerNorm(",
           "norm1 = (lambda x: x) if not paper else nn.LayerNorm(", T_PAPER),
    # --- DINO
    Mutant("dino_warmup_temperature_off_by_one_epoch", COMMON,
           "frac = epoch / max(warmup_epochs - 1, 1)", "frac = epoch / max(warmup_epochs, 1)",
           T_DINO),
    Mutant("dino_teacher_sees_locals", DINO,
           't = self.teacher(teacher_params, batch["global_crops"])',
           't = self.teacher(teacher_params, batch["local_crops"][:, :2])', T_DINO),
    Mutant("dino_student_head_for_teacher", DINO,
           '(t_cls,) = common.apply_head(head, teacher_params["head"]',
           '(t_cls,) = common.apply_head(head, student_params["head"]', T_DINO),
    # --- UDI
    Mutant("udi_patch_target_from_own_view", UDI,
           "teacher_ca_global = other(teacher_ca[:, :, :sg])",
           "teacher_ca_global = teacher_ca[:, :, :sg]", T_UDI),
    Mutant("udi_cls_plus_mix_with_own_cls", UDI,
           "(1 - a) * other(heads.teacher_cls)", "(1 - a) * heads.teacher_cls", T_UDI),
    Mutant("udi_patch_mask_dropped", UDI,
           "t_temp, s_temp), samples.global_valid)",
           "t_temp, s_temp), samples.global_valid | True)", T_UDI),
    Mutant("udi_cls_plus_wrong_pair_count", UDI,
           "/ (g + nl * g)", "/ (g + nl)", T_UDI),
    Mutant("udi_patch_uses_cls_centre", UDI,
           'heads.student_patch, centres["patch"]',
           'heads.student_patch, centres["cls"]', T_UDI),
    # --- FLSL
    Mutant("flsl_teacher_sees_second_global", FLSL,
           "g_img[:, :1], train=False)", "g_img[:, 1:], train=False)", T_FLSL),
    Mutant("flsl_scales_swapped", FLSL,
           "mode_s.append(meanshift(x, enc, tau_sa))", "mode_s.append(meanshift(x, enc, tau_ca))",
           T_FLSL),
    Mutant("flsl_volume_on_teacher", FLSL,
           "jax.nn.softmax(p / s_temp, -1).reshape(-1, p.shape[-1]) for p in s_pred]",
           "jax.nn.softmax(p / s_temp, -1).reshape(-1, p.shape[-1]) for p in t_pred]", T_FLSL),
)


def check(mutant: Mutant, root: pathlib.Path = REPO) -> str:
  """The mutated file's text; raises when `old` is not found exactly once."""
  text = (root / mutant.path).read_text()
  count = text.count(mutant.old)
  if count != 1:
    raise ValueError(f"mutant {mutant.name}: {mutant.path} holds its text {count} times "
                     f"(needs exactly 1): {mutant.old!r}")
  return text.replace(mutant.old, mutant.new)


def run_tests(root: pathlib.Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  try:
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, "timeout"
  return out.returncode, (out.stdout + out.stderr)[-2000:]


def copy_checkout(dst: pathlib.Path) -> None:
  for name in COPIED:
    src = REPO / name
    if src.is_dir():
      shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(src, dst / name)


def run_mutant(mutant: Mutant | None, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
  """pytest's exit code on the mutated copy (1: a test failed, the mutant is killed)."""
  with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
    root = pathlib.Path(tmp)
    copy_checkout(root)
    if mutant is not None:
      text = check(mutant, root)
      compile(text, mutant.path, "exec")
      (root / mutant.path).write_text(text)
    return run_tests(root, tests, timeout)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("-k", default="", help="only mutants whose name contains this")
  parser.add_argument("-j", type=int, default=1, help="mutants run at a time")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
  parser.add_argument("--list", action="store_true")
  args = parser.parse_args(argv)
  chosen = [m for m in MUTANTS if args.k in m.name]
  for m in chosen:
    check(m)
  if args.list:
    for m in chosen:
      print(f"{m.name:40s} {m.path}")
    return 0
  tests = tuple(sorted({t for m in chosen for t in m.tests}))
  rc, log = run_mutant(None, tests, args.timeout)
  if rc != 0:
    print(f"the unmutated code fails its tests (rc {rc}):\n{log}")
    return 2
  start = time.time()
  survived = []
  with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
    runs = {m.name: pool.submit(run_mutant, m, m.tests, args.timeout) for m in chosen}
    for m in chosen:
      rc, log = runs[m.name].result()
      verdict = {1: "killed"}.get(rc, "SURVIVED" if rc == 0 else f"ERROR rc={rc}")
      print(f"{verdict:10s} {m.name}", flush=True)
      if rc != 1:
        survived.append(m.name)
        if rc != 0:
          print(log)
  killed = len(chosen) - len(survived)
  print(f"{killed}/{len(chosen)} mutants killed in {time.time() - start:.0f} s")
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
