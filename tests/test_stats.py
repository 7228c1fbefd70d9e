"""The fused statistics (Triton kernels and the blocked PyTorch path) against the definition.

Without a GPU, ``impl="triton"`` runs the kernels under the Triton interpreter (conftest.py).
Every comparison is against ``naive_gcl_stats`` in float64 with a random upstream gradient; low
precision follows Cut Cross-Entropy's rule: no worse than the naive PyTorch computation in the
same dtype, plus a margin.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from params import DEVICE, IMPLS, SHAPES

import gcl_ops
from gcl_ops import contrastive, reference
from gcl_ops.contrastive import gcl_stats
from gcl_ops.reference import naive_gcl_stats

MARGINS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_problem(n, m, k, offset, *, with_ids, seed, alignment=0.5):
    """Rows near their positive column (so that the statistics vary), optional duplicate ids."""
    generator = torch.Generator().manual_seed(seed)
    doc = torch.randn(m, k, generator=generator, dtype=torch.float64)
    query = alignment * doc[offset : offset + n] + torch.randn(
        n, k, generator=generator, dtype=torch.float64
    )
    ids = {}
    if with_ids:
        ids["query_ids"] = torch.randint(0, max(1, m // 3), (m,), generator=generator)
        ids["doc_ids"] = torch.randint(0, max(1, m // 2), (m,), generator=generator)
    return query, doc, ids


def stats_and_grads(fn, query, doc, scale, upstream, dtype, **kwargs) -> list[torch.Tensor]:
    """``[neg_row, neg_col, pos, d query, d doc, d scale]`` of ``fn`` in ``dtype`` (float64 out).

    The upstream gradient of an infinite statistic (a row or column without negatives) is 0.
    """
    query = query.to(device=DEVICE, dtype=dtype).requires_grad_()
    doc = doc.to(device=DEVICE, dtype=dtype).requires_grad_()
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(scale, dtype=scale_dtype, device=DEVICE, requires_grad=True)
    kwargs = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for name, value in kwargs.items()
    }
    stats = fn(query, doc, scale, **kwargs)
    total = sum(
        (u.to(DEVICE, stat.dtype) * torch.where(torch.isfinite(stat), stat, 0.0)).sum()
        for u, stat in zip(upstream, stats)
    )
    grads = torch.autograd.grad(total, (query, doc, scale))
    return [t.detach().double().cpu() for t in (*stats, *grads)]


NAMES = ("neg_row", "neg_col", "pos", "grad query", "grad doc", "grad scale")


def check_against_definition(impl, query, doc, scale, dtype, seed=0, **kwargs) -> None:
    """The CCE rule for every statistic and gradient: error vs the float64 definition at most
    twice the naive same-dtype error plus ``margin * max(1, max|truth|)``."""
    generator = torch.Generator().manual_seed(seed)
    upstream = [
        torch.randn(n, generator=generator, dtype=torch.float64)
        for n in (query.shape[0], doc.shape[0], query.shape[0])
    ]
    truth = stats_and_grads(naive_gcl_stats, query, doc, scale, upstream, torch.float64, **kwargs)
    baseline = stats_and_grads(naive_gcl_stats, query, doc, scale, upstream, dtype, **kwargs)
    got = stats_and_grads(
        lambda q, d, t, **kw: gcl_stats(q, d, t, impl=impl, **kw),
        query,
        doc,
        scale,
        upstream,
        dtype,
        **kwargs,
    )
    for name, g, b, t in zip(NAMES, got, baseline, truth):
        infinite = torch.isinf(t)
        assert torch.equal(torch.isinf(g), infinite), f"{name}: infinities differ"
        finite = ~infinite
        g, b, t = g[finite], b[finite], t[finite]
        if t.numel() == 0:
            continue
        baseline_error = float(torch.nan_to_num((b - t).abs(), nan=0.0, posinf=0.0).max())
        allowed = 2 * baseline_error + MARGINS[dtype] * max(1.0, float(t.abs().max()))
        error = float((g - t).abs().max())
        assert error <= allowed, (
            f"{name}: error {error:.3e} > allowed {allowed:.3e} ({impl}, {dtype})"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "m", "k", "offset"), SHAPES)
@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_matches_definition_fp32(impl, n, m, k, offset, with_ids, normalize) -> None:
    query, doc, ids = make_problem(n, m, k, offset, with_ids=with_ids, seed=n * m + k)
    if not normalize:  # raw rows of norm ~1, like cosines (test_raw_dot_products_* goes far)
        query, doc = query / math.sqrt(k), doc / math.sqrt(k)
    check_against_definition(
        impl,
        query,
        doc,
        17.0,
        torch.float32,
        offset=offset,
        normalize=normalize,
        **ids,
    )


@pytest.mark.parametrize(("n", "m", "k", "offset"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_no_worse_than_pytorch(n, m, k, offset, dtype) -> None:
    query, doc, ids = make_problem(n, m, k, offset, with_ids=True, seed=k)
    check_against_definition("triton", query, doc, 30.0, dtype, offset=offset, **ids)


def test_torch_path_float64_across_block_boundaries(monkeypatch) -> None:
    # 40-entry blocks: two rows of 20 columns at a time, a ragged last block.
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 40)
    for n, m, k, offset in ((13, 20, 6, 3), (19, 19, 5, 0)):
        query, doc, ids = make_problem(n, m, k, offset, with_ids=True, seed=m)
        check_against_definition("torch", query, doc, 9.0, torch.float64, offset=offset, **ids)


@st.composite
def problems(draw, max_rows=40, max_cols=64, max_k=40):
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(n, max(n, max_cols)))
    return (n, m, draw(st.integers(1, max_k)), draw(st.integers(0, m - n)),
            draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=15)
@given(problem=problems(), scale=st.floats(0.5, 100.0), normalize=st.booleans())
def test_random_problems(impl, problem, scale, normalize) -> None:
    n, m, k, offset, with_ids, seed = problem
    query, doc, ids = make_problem(n, m, k, offset, with_ids=with_ids, seed=seed)
    dtype = torch.float64 if impl == "torch" else torch.float32
    # k = 1 with normalisation: every gradient through x / |x| is exactly 0 and low precision
    # leaves only cancellation noise of relative size eps * |dL/dx^| / |x|; test it raw.
    normalize = normalize and k > 1
    if not normalize:  # raw rows of norm ~1, like cosines
        query, doc = query / math.sqrt(k), doc / math.sqrt(k)
    check_against_definition(
        impl, query, doc, scale, dtype, offset=offset, normalize=normalize, **ids
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_underflowing_rows_are_recomputed_exactly(impl) -> None:
    # Queries clustered together, each document the opposite of its query: every negative has
    # cosine near -0.9, so at t = 100 exp(Z - (t - 64)) underflows to 0 in fp32 for every entry.
    # The fixed-shift sums are then 0 and the online recomputation must take over.
    generator = torch.Generator().manual_seed(0)
    center = torch.randn(1, 24, generator=generator, dtype=torch.float64)
    query = center + 0.2 * torch.randn(20, 24, generator=generator, dtype=torch.float64)
    doc = -query
    check_against_definition(impl, query, doc, 100.0, torch.float32)
    loss = gcl_ops.gcl_loss(
        query.float().to(DEVICE), doc.float().to(DEVICE), logit_scale=100.0, impl=impl
    )
    assert loss.item() > 5.0  # a model this wrong has a large loss, not 0


@pytest.mark.parametrize("impl", IMPLS)
def test_raw_dot_products_far_beyond_the_shift(impl) -> None:
    # normalize=False with norms ~30: |Z| up to ~10^4, so the fixed shift leaves most sums at 0.
    query, doc, ids = make_problem(24, 24, 16, 0, with_ids=True, seed=1)
    check_against_definition(impl, 8 * query, 8 * doc, 10.0, torch.float32, normalize=False, **ids)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_negatives(impl) -> None:
    # One pair, or a batch where every pair shares a query id: no negatives anywhere.
    for n in (1, 6):
        query, doc, _ = make_problem(n, n, 8, 0, with_ids=False, seed=n)
        same = torch.zeros(n, dtype=torch.int64)
        neg_row, neg_col, pos = gcl_stats(query.float().to(DEVICE), doc.float().to(DEVICE), 10.0,
                                          query_ids=same.to(DEVICE), impl=impl)  # fmt: skip
        assert torch.isneginf(neg_row).all() and torch.isneginf(neg_col).all()
        query_leaf = query.float().to(DEVICE).requires_grad_()
        loss = gcl_ops.gcl_loss(
            query_leaf, doc.float().to(DEVICE), query_ids=same.to(DEVICE), impl=impl
        )
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(query_leaf.grad, torch.zeros_like(query_leaf))


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl) -> None:
    query, doc, ids = make_problem(30, 30, 40, 0, with_ids=True, seed=4)
    wide = torch.randn(30, 80, dtype=torch.float64)
    wide[:, ::2] = query  # a non-contiguous view with row stride 80 and column stride 2

    def direct(q, d, t, **kw):
        return gcl_stats(q, d, t, impl=impl, **kw)

    ones = [torch.ones(30)] * 3
    contiguous = stats_and_grads(direct, query, doc, 12.0, ones, torch.float32, **ids)

    def on_view(q, d, t, **kw):
        view = torch.zeros(30, 80, dtype=q.dtype, device=q.device)
        view = view + torch.nn.functional.pad(q, (0, 40)).view(30, 2, 40).transpose(1, 2).reshape(
            30, 80
        )
        return gcl_stats(view[:, ::2], d, t, impl=impl, **kw)

    strided = stats_and_grads(on_view, query, doc, 12.0, ones, torch.float32, **ids)
    for name, a, b in zip(NAMES, strided, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gradcheck_torch_path(monkeypatch) -> None:
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 40)
    query, doc, _ = make_problem(9, 14, 5, 3, with_ids=False, seed=5)
    # Duplicates, but every row and column keeps a negative (a -inf statistic has no Jacobian).
    ids = {"query_ids": torch.arange(14) // 2, "doc_ids": torch.arange(14) % 7}
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    for normalize in (True, False):
        stats = functools.partial(gcl_stats, offset=3, normalize=normalize, impl="torch", **ids)
        assert torch.autograd.gradcheck(
            stats, (query.requires_grad_(), doc.requires_grad_(), scale)
        )


# ------------------------------------------------------------------------------------------
# The logits form: one read of a materialised matrix.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 17, 64, 95])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_form_triton(n, with_ids, dtype) -> None:
    generator = torch.Generator().manual_seed(n)
    logits = 20 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    logits.diagonal().add_(15.0)
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    ids = (
        {"query_ids": torch.randint(0, max(1, n // 3), (n,), generator=generator)}
        if with_ids
        else {}
    )
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)

    def run(impl, run_dtype):
        z = logits.to(device=DEVICE, dtype=run_dtype).requires_grad_()
        w = weights.to(DEVICE)
        ids_here = {name: value.to(DEVICE) for name, value in ids.items()}
        loss = gcl_ops.gcl_loss_from_logits(z, w, reduction="none", impl=impl, **ids_here)
        (grad,) = torch.autograd.grad(loss, z, upstream.to(DEVICE, loss.dtype))
        return loss.detach().double().cpu(), grad.double().cpu()

    truth = run("torch", torch.float64)
    baseline = run("torch", dtype)  # PyTorch on the same low-precision matrix, in fp32 inside
    got = run("triton", dtype)
    for g, b, t in zip(got, baseline, truth):
        allowed = 2 * float((b - t).abs().max()) + MARGINS[dtype] * max(1.0, float(t.abs().max()))
        assert float((g - t).abs().max()) <= allowed


# ------------------------------------------------------------------------------------------
# Switches and refusals.
# ------------------------------------------------------------------------------------------


def test_fp32_dots_follow_the_pytorch_matmul_precision() -> None:
    x = torch.zeros(2, 2)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert contrastive._kernel_flags(x)["INPUT_PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert contrastive._kernel_flags(x)["INPUT_PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_auto_picks_the_backend() -> None:
    cpu = torch.zeros(4, 8)
    assert contrastive.resolve_backend("auto", cpu) == "torch"
    assert contrastive.resolve_backend("torch", cpu) == "torch"
    if torch.cuda.is_available():
        assert contrastive.resolve_backend("auto", cpu.cuda()) == "triton"
        assert contrastive.resolve_backend("auto", cpu.cuda().double()) == "torch"


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(4, 8, dtype=torch.float64), "fp32, fp16 or bf16"),
        (torch.zeros(4, contrastive.MAX_TRITON_K + 1), "k <= 1024"),
    ],
)
def test_triton_refuses_what_it_cannot_run(x, message) -> None:
    with pytest.raises(ValueError, match=message):
        contrastive.resolve_backend("triton", x.to(DEVICE))


def test_triton_on_cpu_without_the_interpreter_explains_how() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = (
        "import torch, gcl_ops\n"
        "try:\n"
        "    gcl_ops.gcl_loss(torch.randn(4, 8), torch.randn(4, 8), impl='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr
