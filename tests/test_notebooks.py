"""The Colab notebooks: committed without outputs, and each runs end to end in smoke
mode on CPU (executed with nbclient, the parameters cell overridden papermill-style)."""

import importlib.util
import json
import pathlib

import pytest
from PIL import Image

from conftest import LOVEDA_SAMPLE, REPO
from glare_jax.visualize import CAPTION, GAP

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_convert_and_attention", "02_pretrain_loveda_tpu", "03_finetune_and_evaluate")


def read(name: str) -> dict:
  return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_with_a_parameters_cell(name):
  nb = read(name)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in code), \
      f"{name}.ipynb has outputs: clear them before committing"
  first = code[0]
  assert first["metadata"].get("tags") == ["parameters"]
  assert "SMOKE = False" in "".join(first["source"])


def execute(name: str, work: pathlib.Path, **params) -> None:
  """Runs the notebook with `params` injected after its parameters cell (as papermill
  does: a cell tagged 'injected-parameters'); raises on the first failing cell."""
  nbformat = pytest.importorskip("nbformat", reason="notebook tests need the 'notebooks' "
                                 "extra: pip install -e '.[notebooks]'")
  nbclient = pytest.importorskip("nbclient", reason="notebook tests need the 'notebooks' "
                                 "extra: pip install -e '.[notebooks]'")
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  params = dict(SMOKE=True, WORK=str(work), **params)
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(at + 1, injected)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()


@pytest.fixture
def one_device(monkeypatch):
  """The commands see the machine as a user would: one CPU device, not the 8 fake
  devices of the test process."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


@pytest.mark.slow
def test_01_convert_and_attention(tmp_path, one_device):
  pytest.importorskip("torch", reason="notebook 01 converts a .pth: needs the 'convert' extra")
  execute(NAMES[0], tmp_path)
  assert json.loads((tmp_path / "ckpt/udi_random/model.json").read_text())["num_prefix"] == 2
  with Image.open(tmp_path / "attention_udi.png") as figure:   # 2 demo images x (1 + 2 heads)
    assert figure.size == (3 * 224 + 2 * GAP, 2 * (CAPTION + 224) + GAP)


@pytest.mark.slow
def test_02_pretrain(tmp_path, one_device):
  pytest.importorskip("torch", reason="notebook 02 converts a .pth: needs the 'convert' extra")
  loveda = str(LOVEDA_SAMPLE) if LOVEDA_SAMPLE.is_dir() else ""
  execute(NAMES[1], tmp_path, LOVEDA_DIR=loveda)
  run = tmp_path / "runs/glare_demo"
  assert (run / "checkpoints/4/state").is_dir()
  assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
  assert (run / "attention.png").stat().st_size > 0
  if importlib.util.find_spec("matplotlib"):   # the loss terms and lr, side by side
    with Image.open(run / "metrics.png") as figure:
      assert figure.size[0] > 1.5 * figure.size[1]
  if loveda:
    assert list((tmp_path / "tensorflow_datasets/loveda").glob("*/*.array_record*"))


@pytest.mark.slow
def test_03_finetune_and_evaluate(tmp_path, one_device):
  pytest.importorskip("torch", reason="notebook 03 converts a .pth: needs the 'convert' extra")
  for module in ("glare_jax.train.finetune", "glare_jax.evaluation.multiseed"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"notebook 03 runs {module}, which this checkout does not have")
  execute(NAMES[2], tmp_path)
  report = json.loads((tmp_path / "seg/random_udi/report.json").read_text())
  assert report["num_runs"] == 1 and report["mIoU"]["mean"] is not None
