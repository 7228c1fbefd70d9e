"""Score-to-weight functions of GCL (Zhu, Jung, Clark 2025, arXiv 2404.08535, Eq. 1-3).

A query-document pair carries a relevance score ``s`` in ``(0, s_max]``; the loss weighs the pair
by ``w = STW(s) >= 0``. For MarqoGS-10M ``s = 101 - position`` and ``s_max = 100``.

- ``constant``:     ``c``
- ``linear``:       ``s``
- ``inverse``:      ``s_max / (s_max - s + 1)``
- ``inverse_sqrt``: ``s_max / sqrt(s_max - s + 1)``
- ``piecewise``:    ``s_max`` if ``s >= 0.9 s_max`` else ``s_max / (0.9 s_max - s + 1)``
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

WeightKind = Literal["constant", "linear", "inverse", "inverse_sqrt", "piecewise"]
WEIGHT_KINDS: tuple[str, ...] = ("constant", "linear", "inverse", "inverse_sqrt", "piecewise")

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | float


def _as_float_tensor(values: ArrayLike, name: str) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def score_to_weight(
    scores: ArrayLike,
    kind: WeightKind = "inverse",
    *,
    s_max: float = 100.0,
    c: float = 1.0,
) -> torch.Tensor:
    """Map relevance scores to non-negative loss weights (paper Eq. 1-3).

    Args:
        scores: ``(N,)`` (any shape) scores in ``(0, s_max]``; tensors keep their device and
            floating dtype, integers and array-likes become the default float dtype.
        kind: ``"constant" | "linear" | "inverse" | "inverse_sqrt" | "piecewise"`` (default
            ``"inverse"``, the paper's best single-field choice); see the module docstring.
        s_max: the largest possible score (default 100, MarqoGS-10M's ``101 - position``).
        c: the value of the ``constant`` weight (default 1, which makes GCL the CLIP loss).

    Returns:
        Weights of the same shape as ``scores``, all ``> 0`` (``>= 0`` for ``constant`` with
        ``c = 0``).

    Raises:
        ValueError: an unknown ``kind``, ``s_max <= 0``, ``c < 0``, or a score that is NaN or lies
            outside ``(0, s_max]``.

    Equivalent PyTorch for ``kind="inverse"``: ``s_max / (s_max - scores + 1)``.
    """
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}")
    if not (math.isfinite(s_max) and s_max > 0):
        raise ValueError(f"s_max must be a positive finite number, got {s_max}")
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"c must be a non-negative finite number, got {c}")
    s = _as_float_tensor(scores, "scores")
    if s.numel() > 0:
        bad = torch.isnan(s) | (s <= 0) | (s > s_max)
        if bool(bad.any()):
            first = s.reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(
                f"scores must lie in (0, s_max={s_max}]; {int(bad.sum())} do not (e.g. {first})"
            )
    if kind == "constant":
        return torch.full_like(s, c)
    if kind == "linear":
        return s.clone()
    if kind == "inverse":
        return s_max / (s_max - s + 1)
    if kind == "inverse_sqrt":
        return s_max / torch.sqrt(s_max - s + 1)
    # piecewise: full weight for the top 10% of the score range, inverse decay below it.
    threshold = 0.9 * s_max
    return torch.where(s >= threshold, torch.full_like(s, s_max), s_max / (threshold - s + 1))


def score_from_count(counts: ArrayLike, *, base: float = 1.1) -> torch.Tensor:
    """The paper's e-commerce relevance score from an engagement count: ``log_base(count) + 1``.

    Args:
        counts: ``(N,)`` (any shape) engagement counts (clicks, purchases, ...), each ``>= 1``.
        base: logarithm base (default 1.1, as in the paper).

    Returns:
        Scores ``>= 1`` of the same shape, in the default float dtype (or the input's float dtype).

    Raises:
        ValueError: ``base <= 1`` or a count that is NaN, infinite or below 1.

    Equivalent PyTorch: ``torch.log(counts) / math.log(base) + 1``.
    """
    if not (math.isfinite(base) and base > 1):
        raise ValueError(f"base must be a finite number > 1, got {base}")
    n = _as_float_tensor(counts, "counts")
    if n.numel() > 0:
        bad = ~torch.isfinite(n) | (n < 1)
        if bool(bad.any()):
            first = n.reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(
                f"counts must be finite and >= 1; {int(bad.sum())} are not (e.g. {first})"
            )
    return torch.log(n) / math.log(base) + 1
