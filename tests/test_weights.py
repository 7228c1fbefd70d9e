"""Score-to-weight functions (paper Eq. 1-3) and the e-commerce count score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcl_ops import WEIGHT_KINDS, score_from_count, score_to_weight

S_MAX = 100.0
scores_in_range = st.floats(1e-3, S_MAX, allow_nan=False)


def by_hand(s: float, kind: str, s_max: float = S_MAX, c: float = 1.0) -> float:
    """The paper's formulas, one scalar at a time."""
    if kind == "constant":
        return c
    if kind == "linear":
        return s
    if kind == "inverse":
        return s_max / (s_max - s + 1)
    if kind == "inverse_sqrt":
        return s_max / math.sqrt(s_max - s + 1)
    return s_max if s >= 0.9 * s_max else s_max / (0.9 * s_max - s + 1)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@given(values=st.lists(scores_in_range, min_size=1, max_size=20))
def test_matches_scalar_formula(kind: str, values: list[float]) -> None:
    weights = score_to_weight(torch.tensor(values, dtype=torch.float64), kind, c=2.5)
    expected = torch.tensor([by_hand(s, kind, c=2.5) for s in values], dtype=torch.float64)
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("kind", ["linear", "inverse", "inverse_sqrt", "piecewise"])
@given(a=scores_in_range, b=scores_in_range)
def test_non_constant_kinds_are_monotone_and_positive(kind: str, a: float, b: float) -> None:
    low, high = sorted((a, b))
    w = score_to_weight(torch.tensor([low, high], dtype=torch.float64), kind)
    assert (w > 0).all()
    assert w[0] <= w[1]


def test_top_score_gets_full_weight() -> None:
    # At s = s_max the inverse forms give s_max / 1.
    for kind in ("inverse", "inverse_sqrt", "piecewise", "linear"):
        assert score_to_weight([S_MAX], kind).item() == pytest.approx(S_MAX)


def test_piecewise_threshold() -> None:
    w = score_to_weight([89.0, 90.0], "piecewise")
    assert w[1].item() == pytest.approx(100.0)
    assert w[0].item() == pytest.approx(100.0 / 2.0)


def test_accepts_numpy_ints_and_keeps_float_dtype() -> None:
    from_ints = score_to_weight(np.array([1, 50, 100]), "inverse")
    assert from_ints.dtype == torch.get_default_dtype()
    half = score_to_weight(torch.tensor([10.0, 20.0], dtype=torch.float16), "linear")
    assert half.dtype == torch.float16


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.5, float("nan"), float("inf")])
def test_scores_outside_range_raise(bad: float) -> None:
    with pytest.raises(ValueError, match=r"scores must lie in \(0, s_max"):
        score_to_weight([50.0, bad], "inverse")


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        score_to_weight([1.0], "cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="s_max"):
        score_to_weight([1.0], s_max=0.0)
    with pytest.raises(ValueError, match="c must be"):
        score_to_weight([1.0], "constant", c=-1.0)
    with pytest.raises(TypeError, match="real numbers"):
        score_to_weight(torch.tensor([True]))


def test_score_from_count() -> None:
    counts = torch.tensor([1.0, 1.1, 1.1**10], dtype=torch.float64)
    torch.testing.assert_close(
        score_from_count(counts), torch.tensor([1.0, 2.0, 11.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="counts must be finite and >= 1"):
        score_from_count([0.5])
    with pytest.raises(ValueError, match="base"):
        score_from_count([2.0], base=1.0)
