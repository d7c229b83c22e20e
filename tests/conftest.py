"""Fixtures. Models and inputs are built by tiny_models.py, the invariants shared with tests_legacy/ live in
invariants.py; test modules import those two by name, never this file or another test module."""
import pytest
import torch

pytest.register_assert_rewrite("invariants", "tiny_models")  # their asserts report values, as a test's do

from tiny_models import FAMILIES  # noqa: E402  (after the rewrite registration)

torch.set_num_threads(2)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
