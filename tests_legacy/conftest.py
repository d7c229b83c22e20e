"""LLaVA-3D's stack (transformers 4.37.2): refuse any other, the attention fixture, and the shared invariants.

Models and inputs are built by llava3d_models.py. The invariant tables and checks are tests/invariants.py,
the same file tests/ runs on transformers 5: this conftest puts tests/ on sys.path so test modules import
it by name (`invariants` is a plain module there; nothing else of tests/ is imported here).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

if transformers.__version__ != "4.37.2":  # on another stack these tests would prove nothing: refuse to run
    raise RuntimeError(f"tests_legacy/ runs in .venv-legacy (transformers 4.37.2), not {transformers.__version__}")

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # after this folder: its names come first
pytest.register_assert_rewrite("invariants", "llava3d_models")

torch.set_num_threads(2)


@pytest.fixture(params=["eager", "sdpa"])
def attn(request):
    return request.param
