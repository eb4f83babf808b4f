"""The README's commands stay true: install and test commands are CI's, every module
exists, every training command parses into a config, and every fine-tuning command
fits the model it starts from."""

import importlib.util
import itertools
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
README = (REPO / "README.md").read_text()
# Prefix tokens of the converted checkpoints the README names (docs/parity.md).
CONVERTED_PREFIX = {"ckpt/udi_s16": 2, "ckpt/dino_s16": 1, "ckpt/flsl_s16": 0}
ARCHITECTURE = ("variant", "patch_size", "num_prefix", "adapter_mode", "adapter_dim",
                "adapter_scale")


def bash_blocks() -> list[list[str]]:
  """Each ```bash block as logical lines (continuations joined, comments dropped)."""
  blocks = []
  for body in re.findall(r"```bash\n(.*?)```", README, re.S):
    text = body.replace("\\\n", " ")
    blocks.append([ln.strip() for ln in text.splitlines()
                   if ln.strip() and not ln.strip().startswith("#")])
  return blocks


def expand(lines: list[str]) -> list[list[str]]:
  """Commands of a block with its `for V in ...; do ... done` loops unrolled."""
  out, stack = [], []        # stack: (variable, values, body lines)
  body: list[str] = []
  for line in lines:
    m = re.fullmatch(r"for (\w+) in (.+); do", line)
    if m:
      stack.append((m.group(1), m.group(2).split(), body))
      body = []
    elif line == "done":
      var, values, outer = stack.pop()
      loop = [f"@for {var} {' '.join(values)}", *body, "@done"]
      body = outer + loop
    else:
      body.append(line)
  assert not stack, "unbalanced for/done"
  _run(body, {}, out)
  return out


def _run(lines, env, out):
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("@for "):
      _, var, *values = line.split()
      depth, j = 1, i + 1
      while depth:
        depth += lines[j].startswith("@for ") - (lines[j] == "@done")
        j += 1
      for v in values:
        _run(lines[i + 1:j - 1], {**env, var: v}, out)
      i = j
      continue
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line)
    out.append(shlex.split(expanded, comments=True))
    i += 1


COMMANDS = [c for block in bash_blocks() for c in expand(block)]
PYTHON_M = [c for c in COMMANDS if c[:2] == ["python", "-m"]]


def test_install_and_test_commands_are_what_ci_runs():
  ci = [ln.strip() for ln in (REPO / ".ci/run").read_text().splitlines()
        if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
  tests = [ln for ln in ci if ln.startswith("python -m pytest")]
  install = " && ".join(ln for ln in ci if ln not in tests and "--dry-run" not in ln)
  blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  assert blocks[0].startswith(install + " && python -m glare_jax.main --config=configs/demo.py")
  assert blocks[1].splitlines() == tests == ['python -m pytest -q -n 2 tests -m "not slow"',
                                             "python -m pytest -q -n 2 tests -m slow"]


def test_every_module_exists():
  modules = {c[2] for c in PYTHON_M}
  assert {"glare_jax.main", "glare_jax.convert", "glare_jax.visualize",
          "glare_jax.data.prepare", "glare_jax.evaluation.report"} <= modules
  missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
  assert not missing


def parse(args: list[str]):
  """(config, workdir) as glare_jax.main's flags read them."""
  argv = ["prog", *[a for a in args if a.startswith(("--config", "--workdir"))]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)   # override flags are found in argv
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


def model_of(config) -> dict:
  m = {f: config.model[f] for f in ARCHITECTURE}
  if m["adapter_mode"] == "none":
    m = {f: v for f, v in m.items() if not f.startswith("adapter_")}
  return m


def test_training_commands_parse_and_fine_tuning_fits_its_source(monkeypatch):
  monkeypatch.chdir(REPO)
  runs = [c for c in PYTHON_M if c[2] in ("glare_jax.main", "glare_jax.evaluation.multiseed")]
  assert len(runs) > 50
  pretrained = {}
  for cmd in runs:
    config, workdir = parse(cmd[3:])
    assert workdir, cmd
    if config.mode == "pretrain":
      assert cmd[2] == "glare_jax.main", cmd
      pretrained[workdir] = config
    else:
      assert config.mode == "finetune", cmd
    source = config.init_checkpoint
    if source in CONVERTED_PREFIX:          # no adapters, its own prefix count
      # (pre-training may add fresh prefix tokens: GLARE's [CLS] on FLSL, Table 3)
      assert (config.model.num_prefix == CONVERTED_PREFIX[source]
              or config.mode == "pretrain" and config.model.num_prefix > CONVERTED_PREFIX[source]), cmd
      assert config.mode == "pretrain" or config.model.adapter_mode == "none", cmd
    elif source:
      assert source in pretrained, f"{cmd}: {source} is made by no command above it"
      assert model_of(config) == model_of(pretrained[source]), cmd
  assert len(pretrained) > 20


@pytest.mark.parametrize("table", [f"Table {i}" for i in range(1, 9)])
def test_every_table_has_a_section(table):
  assert re.search(rf"^### {table}\b", README, re.M)


def test_loop_expansion():
  cmds = expand(["A=1", "for X in a b; do", "for Y in 1 2; do", "run $X ${Y}_z", "done",
                 "done"])
  assert [c for c in cmds if c[0] == "run"] == [
      ["run", a, f"{b}_z"] for a, b in itertools.product("ab", "12")]
