"""Multi-field GCL (paper Eq. 5) against the definition (tests/definition.py)."""

from __future__ import annotations

import definition
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from params import DEVICE

import gcl_ops


def eq5_by_definition(lhs, rhs, weights, scale, lhs_gamma, rhs_gamma, renormalize, **ids):
    """Paper Eq. 5 in float64 from the definition."""
    return definition.multi_field_loss(
        lhs, rhs, weights, scale, lhs_gamma, rhs_gamma, renormalize, **ids
    )


def gammas(count: int) -> st.SearchStrategy[list[float]]:
    return st.lists(st.floats(0.05, 1.0), min_size=count, max_size=count).map(
        lambda values: [v / sum(values) for v in values]
    )


@given(
    n=st.integers(1, 24),
    k=st.integers(2, 16),
    m=st.integers(1, 3),
    r=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    renormalize=st.booleans(),
    with_ids=st.booleans(),
    data=st.data(),
)
def test_matches_equation_5(n, k, m, r, seed, renormalize, with_ids, data) -> None:
    generator = torch.Generator().manual_seed(seed)

    def fields(count: int) -> list[torch.Tensor]:
        return [
            torch.randn(n, k, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(count)
        ]

    lhs, rhs = fields(m), fields(r)
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * 10
    scale = torch.tensor(data.draw(st.floats(1.0, 50.0)), dtype=torch.float64, requires_grad=True)
    ids = (
        {"query_ids": torch.randint(0, max(1, n // 2), (n,), generator=generator)}
        if with_ids
        else {}
    )
    lhs_gamma, rhs_gamma = data.draw(gammas(m)), data.draw(gammas(r))

    got = gcl_ops.multi_field_gcl_loss(
        lhs,
        rhs,
        weights,
        scale,
        lhs_gamma=lhs_gamma,
        rhs_gamma=rhs_gamma,
        renormalize=renormalize,
        **ids,
    )
    want = eq5_by_definition(lhs, rhs, weights, scale, lhs_gamma, rhs_gamma, renormalize, **ids)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    leaves = (*lhs, *rhs, scale)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-9)


def test_one_field_each_side_is_twice_the_single_field_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(17, 8, generator=generator, dtype=torch.float64)
    doc = torch.randn(17, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(17, generator=generator, dtype=torch.float64)
    single = gcl_ops.gcl_loss(query, doc, weights, 12.0)
    multi = gcl_ops.multi_field_gcl_loss([query], [doc], weights, 12.0)
    torch.testing.assert_close(multi, 2 * single)


def test_module_returns_open_clip_style_dict() -> None:
    generator = torch.Generator().manual_seed(1)
    lhs = [torch.randn(9, 6, generator=generator)]
    rhs = [torch.randn(9, 6, generator=generator), torch.randn(9, 6, generator=generator)]
    module = gcl_ops.MultiFieldGCLLoss(rhs_gamma=[0.3, 0.7])
    out = module(lhs, rhs, torch.tensor(10.0), output_dict=True)
    assert list(out) == ["contrastive_loss"]
    want = gcl_ops.multi_field_gcl_loss(lhs, rhs, None, 10.0, rhs_gamma=[0.3, 0.7])
    torch.testing.assert_close(out["contrastive_loss"], want)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lhs_gamma": [0.5, 0.6]}, ValueError, "lhs_gamma must sum to 1"),
        ({"rhs_gamma": [1.0]}, ValueError, "rhs_gamma has 1 entries but there are 2 fields"),
        ({"rhs_gamma": [1.5, -0.5]}, ValueError, "rhs_gamma must be non-negative"),
        ({"lhs": []}, TypeError, "lhs must be a non-empty sequence"),
        ({"lhs": torch.randn(4, 3)}, TypeError, "lhs must be a non-empty sequence"),
        (
            {"rhs": [torch.randn(4, 3), torch.randn(4, 5)]},
            ValueError,
            r"rhs\[1\] has width 5, expected 3",
        ),
        (
            {"rhs": [torch.randn(4, 3), torch.randn(3, 3)]},
            ValueError,
            r"rhs\[1\] has 3 rows, expected 4",
        ),
        ({"weights": -torch.ones(4)}, ValueError, "weights must be >= 0"),
    ],
)
def test_bad_input(kwargs, error, message) -> None:
    generator = torch.Generator().manual_seed(2)
    args = {
        "lhs": [torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)],
        "rhs": [torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)],
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        gcl_ops.multi_field_gcl_loss(**args)


def test_cancelling_fields_are_reported() -> None:
    field = torch.randn(5, 4)
    with pytest.raises(ValueError, match="the lhs field average row 0 is all zeros"):
        gcl_ops.multi_field_gcl_loss([field, -field], [field])


def test_triton_and_torch_paths_agree() -> None:
    generator = torch.Generator().manual_seed(3)
    fields = [torch.randn(45, 24, generator=generator, device="cpu") for _ in range(3)]
    weights = torch.rand(45, generator=generator) * 5
    ids = torch.randint(0, 30, (45,), generator=generator)
    results = {}
    for impl in ("torch", "triton"):
        leaves = [f.to(DEVICE).requires_grad_() for f in fields]
        loss = gcl_ops.multi_field_gcl_loss(
            leaves[:1], leaves[1:], weights.to(DEVICE), 20.0, query_ids=ids.to(DEVICE), impl=impl
        )
        results[impl] = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@given(
    n=st.integers(1, 16),
    h=st.integers(1, 20),
    k=st.integers(2, 12),
    r=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    renormalize=st.booleans(),
    reduction=st.sampled_from(["mean", "weighted_mean"]),
    data=st.data(),
)
def test_hard_negatives_match_the_definition(n, h, k, r, seed, renormalize, reduction, data):
    # Negatives carry the document-side fields: the averaged term gets their gamma-weighted
    # average (re-normalised like the documents'), the term of rhs field j gets field j.
    generator = torch.Generator().manual_seed(seed)

    def field(rows: int) -> torch.Tensor:
        return torch.randn(rows, k, generator=generator, dtype=torch.float64, requires_grad=True)

    lhs, rhs, negatives = [field(n)], [field(n) for _ in range(r)], [field(h) for _ in range(r)]
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * 10
    doc_ids = torch.randint(0, n + 2, (n,), generator=generator)
    negative_ids = torch.randint(0, n + 2, (h,), generator=generator)
    scale = torch.tensor(data.draw(st.floats(1.0, 50.0)), dtype=torch.float64, requires_grad=True)
    rhs_gamma = data.draw(gammas(r))
    ids = dict(doc_ids=doc_ids, negative_ids=negative_ids)

    got = gcl_ops.multi_field_gcl_loss(
        lhs, rhs, weights, scale, rhs_gamma=rhs_gamma, renormalize=renormalize,
        reduction=reduction, negatives=negatives, **ids,
    )  # fmt: skip

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True)

    def average(fields: list[torch.Tensor]) -> torch.Tensor:
        return sum(g * unit(x) for g, x in zip(rhs_gamma, fields))

    options = dict(reduction=reduction, **ids)
    want = definition.loss_with_negatives(
        unit(lhs[0]), average(rhs), average(negatives), weights, scale, normalize=renormalize,
        **options,
    )  # fmt: skip
    for right, negative in zip(rhs, negatives):
        want = want + definition.loss_with_negatives(
            unit(lhs[0]), unit(right), unit(negative), weights, scale, normalize=False, **options
        )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    leaves = (*lhs, *rhs, *negatives, scale)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_negatives_must_have_one_tensor_per_rhs_field() -> None:
    fields = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(ValueError, match=r"one tensor per rhs field \(2\), got 1"):
        gcl_ops.multi_field_gcl_loss(fields[:1], fields[1:], negatives=[fields[0]])
    with pytest.raises(ValueError, match="negatives\\[1\\] has width 2, expected 3"):
        gcl_ops.multi_field_gcl_loss(
            fields[:1], fields[1:], negatives=[fields[0], torch.randn(4, 2, dtype=torch.float64)]
        )
