"""The blocked statistics of the CPU path against the materialised definition."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcl_ops.reference import blockwise_gcl_stats, naive_gcl_stats


@st.composite
def rectangular_problems(draw: st.DrawFn, max_rows: int = 24, max_cols: int = 40):
    """Rows (N, k) against columns (M, k), M >= offset + N, with optional ids."""
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(n, max(n, max_cols)))
    offset = draw(st.integers(0, m - n))
    k = draw(st.integers(1, 12))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    query = torch.randn(n, k, generator=generator, dtype=torch.float64)
    doc = torch.randn(m, k, generator=generator, dtype=torch.float64)
    ids = {}
    if draw(st.booleans()):
        ids["query_ids"] = torch.randint(0, draw(st.integers(1, m)), (m,), generator=generator)
    if draw(st.booleans()):
        ids["doc_ids"] = torch.randint(0, draw(st.integers(1, m)), (m,), generator=generator)
    return query, doc, ids, offset


@given(
    problem=rectangular_problems(),
    scale=st.floats(0.5, 100.0),
    normalize=st.booleans(),
    block_elements=st.sampled_from([1, 7, 40, 1 << 18]),
    data=st.data(),
)
def test_blockwise_stats_match_materialised_stats(
    problem, scale, normalize, block_elements, data
) -> None:
    query, doc, ids, offset = problem
    scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    query.requires_grad_(), doc.requires_grad_()
    common = dict(offset=offset, normalize=normalize, **ids)
    got = blockwise_gcl_stats(query, doc, scale_t, block_elements=block_elements, **common)
    want = naive_gcl_stats(query, doc, scale_t, **common)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    # A random upstream gradient on the finite statistics (a column with everything excluded
    # has col_lse = -inf and no gradient).
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    upstream = [
        torch.randn(t.shape, generator=generator, dtype=torch.float64) * torch.isfinite(t)
        for t in want
    ]

    def pull(stats):
        total = sum((u * torch.nan_to_num(t, neginf=0.0)).sum() for u, t in zip(upstream, stats))
        return torch.autograd.grad(total, (query, doc, scale_t))

    for g, w in zip(pull(got), pull(want)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("with_ids", [False, True])
def test_gradcheck_blockwise_function(normalize: bool, offset: int, with_ids: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(13, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    doc = torch.randn(17, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    ids = {}
    if with_ids:
        ids = {
            "query_ids": torch.randint(0, 5, (17,), generator=generator),
            "doc_ids": torch.randint(0, 9, (17,), generator=generator),
        }
    # block_elements=40 makes blocks of 2 rows: several blocks and a ragged last one.
    fn = functools.partial(
        blockwise_gcl_stats, offset=offset, block_elements=40, normalize=normalize, **ids
    )
    assert torch.autograd.gradcheck(fn, (query, doc, scale))
