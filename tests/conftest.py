"""Shared test configuration: the Triton interpreter, hypothesis profiles, the gpu marker."""

from __future__ import annotations

import os
import sys

import torch

# Without a GPU the Triton kernels run on the CPU under the interpreter, which triton selects
# when a kernel is defined: the variable must be set before anything imports triton. Importing
# torch does not; importing gcl_ops (in the test modules, after this file) does.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (used when CI is set): reproducible examples; "dev": fresh random examples each run;
# "thorough" (HYPOTHESIS_PROFILE=thorough): ten times as many, for a long look before a release.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def restore_matmul_precision():
    """Put both fp32 precision settings back as they were (the newer one first, then legacy)."""
    matmul = torch.backends.cuda.matmul
    new_setting = matmul.fp32_precision
    global_setting = torch.backends.fp32_precision
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the newer API was in use: restoring it restores everything
        legacy = None
    try:
        yield
    finally:
        torch.backends.fp32_precision = global_setting
        matmul.fp32_precision = new_setting
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
