"""Helpers for the model tests (importable by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import pytest
import torch

# Same rule as tests/conftest.py's requires_gpu; importing `conftest` by name is
# ambiguous once subfolders have their own conftest.py.
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Write a test once, run it on the CPU here and on the GPU where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]
