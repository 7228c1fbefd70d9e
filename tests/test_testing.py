"""gcl_ops.testing: the strategies make valid batches and the checker catches broken wrappers."""

from __future__ import annotations

import definition
import pytest
import torch
from hypothesis import given

import gcl_ops
from gcl_ops.testing import GCLBatch, assert_matches_reference, definition_loss, gcl_batches


@given(batch=gcl_batches(max_n=20))
def test_strategy_makes_valid_batches(batch: GCLBatch) -> None:
    n, k = batch.query.shape
    assert batch.doc.shape == (n, k) and 1 <= n <= 20
    assert batch.weights is None or (batch.weights.shape == (n,) and (batch.weights >= 0).all())
    for ids in (batch.query_ids, batch.doc_ids):
        assert ids is None or (ids.shape == (n,) and ids.dtype == torch.int64)
    assert 0.5 <= batch.logit_scale <= 100
    # Every row can be normalised.
    assert (batch.query.norm(dim=-1) > 0).all() and (batch.doc.norm(dim=-1) > 0).all()


def _batch(n: int = 12, seed: int = 0) -> GCLBatch:
    generator = torch.Generator().manual_seed(seed)
    return GCLBatch(
        query=torch.randn(n, 5, generator=generator, dtype=torch.float64),
        doc=torch.randn(n, 5, generator=generator, dtype=torch.float64),
        weights=torch.rand(n, generator=generator, dtype=torch.float64) * 5,
        logit_scale=9.0,
        query_ids=torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])[:n],
    )


def test_accepts_the_module_form() -> None:
    module = gcl_ops.GCLLoss()
    assert_matches_reference(lambda q, d, w, t, **ids: module(q, d, t, w, **ids), _batch())


@pytest.mark.parametrize(
    ("broken", "what"),
    [
        (lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, None, t, **ids), "loss value"),
        (lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, w, t), "loss value"),
        (
            lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, w, t.detach(), **ids),
            "gradient w.r.t. logit_scale",
        ),
        (
            lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d.detach(), w, t, **ids),
            "gradient w.r.t. doc",
        ),
        (
            lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, w, t, reduction="sum", **ids),
            "loss value",
        ),
        (lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, w, t, reduction="none", **ids), "shape"),
    ],
)
def test_catches_broken_wrappers(broken, what: str) -> None:
    with pytest.raises(AssertionError, match=what):
        assert_matches_reference(broken, _batch())


def test_reduction_none_is_checked_per_pair() -> None:
    good = lambda q, d, w, t, **ids: gcl_ops.gcl_loss(q, d, w, t, reduction="none", **ids)  # noqa: E731
    assert_matches_reference(good, _batch(), reduction="none")
    swapped = lambda q, d, w, t, **ids: good(q, d, w, t, **ids).flip(0)  # noqa: E731
    with pytest.raises(AssertionError, match="loss value"):
        assert_matches_reference(swapped, _batch(), reduction="none")


@given(batch=gcl_batches(max_n=24))
def test_its_definition_agrees_with_the_tests_definition(batch: GCLBatch) -> None:
    # Two definitions written independently (gcl_ops.testing, tests/definition.py).
    for reduction in ("mean", "sum", "none"):
        got = definition_loss(
            batch.query, batch.doc, batch.weights, batch.logit_scale, reduction=reduction,
            **batch.ids(),
        )  # fmt: skip
        want = definition.loss(
            batch.query, batch.doc, batch.weights, batch.logit_scale, reduction=reduction,
            **batch.ids(),
        )  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@given(batch=gcl_batches(max_n=20, min_loss=0.1))
def test_min_loss_keeps_away_from_degenerate_batches(batch: GCLBatch) -> None:
    assert batch.n >= 2
    assert batch.weights is None or float(batch.weights.max()) >= 0.1
    assert float(definition.loss(batch.query, batch.doc, batch.weights, batch.logit_scale,
                                 **batch.ids())) >= 0.1  # fmt: skip
