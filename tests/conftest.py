"""Test setup: 8 fake CPU devices, float32 matmuls, the shared sample data."""

import os
import pathlib

# Backend optimisation level 0 halves CPU compile times; results stay within the
# tests' float tolerances (parity, losses) and programs are otherwise unchanged.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("GLARE_SHARED", REPO.parent / "shared"))
LOVEDA_SAMPLE = SHARED / "data" / "loveda_sample"


@pytest.fixture
def loveda_sample() -> pathlib.Path:
  """The three real LoveDA tiles shipped beside the checkout (CI has them)."""
  if not LOVEDA_SAMPLE.is_dir():
    pytest.skip(f"needs the LoveDA sample tiles at {LOVEDA_SAMPLE} "
                "(../shared beside the checkout, or set GLARE_SHARED)")
  return LOVEDA_SAMPLE
