"""PyTorch for the tests' reference implementations (the `convert` extra).

Without it `torch` and `F` are None and the tests marked `needs_torch` skip;
the rest of their modules still run.
"""

import pytest

try:
  import torch
  F = torch.nn.functional
except ImportError:
  torch = F = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch reference: needs the "
                                 "'convert' extra (pip install -e '.[convert]')")
