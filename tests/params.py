"""Shared test parameters (Liger-Kernel style): backends, dtypes with tolerances, ragged shapes."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Both backends; on a CPU-only machine "triton" runs under the interpreter (tests/conftest.py).
IMPLS = ("torch", "triton")

#: (N, M, k, offset): square and rectangular problems with ragged sizes (not multiples of the
#: 32 x 32 interpreter tiles), a single pair, k below the minimum dot width, and offsets.
SHAPES = (
    (1, 1, 8, 0),
    (17, 17, 33, 0),
    (64, 64, 64, 0),
    (95, 95, 8, 0),
    (17, 40, 33, 23),
    (20, 95, 64, 7),
)
