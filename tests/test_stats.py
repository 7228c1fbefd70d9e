"""The fused statistics (Triton kernels and the blocked PyTorch path) against the definition.

Without a GPU, ``impl="triton"`` runs the kernels under the Triton interpreter (conftest.py).
Every comparison is against ``definition.stats`` (float64, written from the formula, independent
of the package) on the inputs *as the tested dtype holds them* (rounded to it and back), with a
random upstream gradient. fp32 and fp64 follow Cut Cross-Entropy's rule: no worse than a naive
PyTorch computation in the same dtype, plus a margin. Half precision is held to what the kernels
promise instead (fp32 arithmetic on the half inputs, gradients rounded once to the half dtype):
a naive bf16 computation is several percent off, which would hide errors of that size.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import definition
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from params import DEVICE, IMPLS, SHAPES

import gcl_ops
from gcl_ops import blockwise, contrastive, launchers, tiling
from gcl_ops.contrastive import gcl_stats

MARGINS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
#: Half precision, against the truth of the rounded inputs: statistics (fp32 out of fp32
#: arithmetic) within ``STAT_MARGIN * max(1, max|truth|)``; gradients (returned in the half dtype)
#: within ``rtol * |truth| + margin * max(1, max|truth|)`` elementwise.
HALF_STAT_MARGIN = 1e-5
HALF_GRAD_TOLERANCES = {torch.float16: (2**-10, 5e-4), torch.bfloat16: (2**-7, 4e-3)}
HALF = (torch.float16, torch.bfloat16)


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``dtype`` holds it, back in float64: the inputs the kernels actually see."""
    return x.to(dtype).to(torch.float64)


def naive_stats(query, doc, scale, *, query_ids=None, doc_ids=None, offset=0, normalize=True):
    """The yardstick of the CCE rule: plain PyTorch in the inputs' own dtype, ``Z`` materialised
    (not a truth; only its error against the truth is used)."""
    if normalize:
        query, doc = F.normalize(query, dim=-1), F.normalize(doc, dim=-1)
    z = (scale * query) @ doc.T
    n, m = z.shape
    keep = ~definition.duplicates(n, m, query_ids, doc_ids, offset).to(z.device)
    keep.diagonal(offset).fill_(False)
    masked = z.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(masked, dim=1), torch.logsumexp(masked, dim=0), z.diagonal(offset)


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


def recomputation_error(query, doc, scale, normalize) -> float:
    """The relative error of the Triton backward's gradients that ``S`` recomputed in another tile
    order may add (docs/CONTRACT.md): each ``P = exp(Z - lse)`` off by up to ``t delta``, with
    ``delta`` two ulps of the largest ``|S|`` (1 for unit vectors)."""
    largest = (
        1.0
        if normalize
        else float(query.detach().norm(dim=1).max() * doc.detach().norm(dim=1).max())
    )
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(max(largest, 2**-126)))
    return scale * 2 * ulp


def check_against_definition(impl, query, doc, scale, dtype, seed=0, **kwargs) -> None:
    """Every statistic and gradient of ``gcl_stats`` in ``dtype`` against ``definition.stats`` on
    the rounded inputs. fp32/fp64, the CCE rule: error at most twice the naive same-dtype error
    plus ``margin * max(1, max|truth|)``; the Triton path also its documented recomputation
    error (``recomputation_error``). Half: the fixed tolerances above."""
    generator = torch.Generator().manual_seed(seed)
    upstream = [
        torch.randn(n, generator=generator, dtype=torch.float64)
        for n in (query.shape[0], doc.shape[0], query.shape[0])
    ]
    query, doc = rounded(query, dtype), rounded(doc, dtype)
    # The scale as the kernels get it (fp32 unless fp64).
    scale = float(
        torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    )
    truth = stats_and_grads(definition.stats, query, doc, scale, upstream, torch.float64, **kwargs)
    got = stats_and_grads(
        lambda q, d, t, **kw: gcl_stats(q, d, t, impl=impl, **kw),
        query,
        doc,
        scale,
        upstream,
        dtype,
        **kwargs,
    )
    if dtype in HALF:
        baseline = [None] * len(NAMES)
    else:
        baseline = stats_and_grads(naive_stats, query, doc, scale, upstream, dtype, **kwargs)
    for index, (name, g, b, t) in enumerate(zip(NAMES, got, baseline, truth)):
        infinite = torch.isinf(t)
        assert torch.equal(torch.isinf(g), infinite), f"{name}: infinities differ"
        finite = ~infinite
        g, t = g[finite], t[finite]
        if t.numel() == 0:
            continue
        size = max(1.0, float(t.abs().max()))
        if dtype in HALF:
            rtol, margin = (0.0, HALF_STAT_MARGIN) if index < 3 else HALF_GRAD_TOLERANCES[dtype]
            excess = (g - t).abs() - rtol * t.abs() - margin * size
            worst = int(excess.argmax())
            assert float(excess[worst]) <= 0, (
                f"{name}: error {float((g - t).abs()[worst]):.3e} at |truth| "
                f"{float(t.abs()[worst]):.3e} > rtol {rtol:.1e}, margin {margin:.1e} x {size:.3e}"
                f" ({impl}, {dtype})"
            )
            continue
        b = b[finite]
        baseline_error = float(torch.nan_to_num((b - t).abs(), nan=0.0, posinf=0.0).max())
        allowed = 2 * baseline_error + MARGINS[dtype] * size
        if impl == "triton" and index >= 3:
            allowed += recomputation_error(query, doc, scale, kwargs.get("normalize", True)) * size
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
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 40)
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
# |Z| up to ~590: every exponent is a difference taken before the scaling to base 2.
@example(problem=(30, 54, 1, 0, False, 0), scale=87.0, normalize=False)
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
@settings(max_examples=15)
@given(problem=problems(), max_logit=st.floats(100.0, 1000.0), normalize=st.booleans())
def test_large_logits(impl, problem, max_logit, normalize) -> None:
    # |Z| up to ~1000: every exp in every kernel takes a difference in natural units first
    # (Z - lse, Z - shift, Z - running max), so rounding at |Z| log2(e) does not enter.
    n, m, k, offset, with_ids, seed = problem
    query, doc, ids = make_problem(n, m, k, offset, with_ids=with_ids, seed=seed)
    normalize = normalize and k > 1  # as in test_random_problems
    scale = max_logit
    if not normalize:  # raw rows scaled so that max |Z| = max_logit
        scale = max_logit / float(query.norm(dim=1).max() * doc.norm(dim=1).max())
    dtype = torch.float64 if impl == "torch" else torch.float32
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
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 40)
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


def logits_loss_and_grad(impl, logits, upstream, dtype, weights=None, **ids):
    """``(per-pair loss, d logits)`` of ``gcl_loss_from_logits`` on ``logits`` in ``dtype``."""
    z = logits.to(device=DEVICE, dtype=dtype).requires_grad_()
    w = None if weights is None else weights.to(DEVICE)
    ids = {name: value.to(DEVICE) for name, value in ids.items()}
    loss = gcl_ops.gcl_loss_from_logits(z, w, reduction="none", impl=impl, **ids)
    (grad,) = torch.autograd.grad(loss, z, upstream.to(DEVICE, loss.dtype))
    return loss.detach().double().cpu(), grad.double().cpu()


def logits_truth(logits, upstream, weights=None, **ids):
    """The same from ``definition.loss_from_logits`` in float64."""
    z = logits.to(torch.float64).requires_grad_()
    loss = definition.loss_from_logits(z, weights, reduction="none", **ids)
    (grad,) = torch.autograd.grad(loss, z, upstream)
    return loss.detach(), grad


@pytest.mark.parametrize("n", [1, 17, 64, 95])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_form_triton(n, with_ids, dtype) -> None:
    generator = torch.Generator().manual_seed(n)
    logits = 20 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    logits.diagonal().add_(15.0)
    logits = rounded(logits, dtype)  # the truth of the matrix the kernel reads
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    ids = (
        {"query_ids": torch.randint(0, max(1, n // 3), (n,), generator=generator)}
        if with_ids
        else {}
    )
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)
    truth = logits_truth(logits, upstream, weights, **ids)
    got = logits_loss_and_grad("triton", logits, upstream, dtype, weights, **ids)
    # The loss is fp32 arithmetic on the matrix's values; the gradient is rounded to its dtype.
    grad_rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
    for name, g, t, rtol in zip(("loss", "grad"), got, truth, (0.0, grad_rtol)):
        size = max(1.0, float(t.abs().max()))
        excess = (g - t).abs() - rtol * t.abs() - MARGINS[torch.float32] * size
        assert float(excess.max()) <= 0, f"{name}: {float((g - t).abs().max()):.3e} off"


@settings(max_examples=15)
@given(
    n=st.integers(1, 70),
    max_logit=st.floats(100.0, 1000.0),
    with_ids=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_logits_form_large_logits(n, max_logit, with_ids, seed) -> None:
    # |Z| up to max_logit (~1000) in the logits kernels, ragged N, against float64.
    generator = torch.Generator().manual_seed(seed)
    logits = max_logit * (2 * torch.rand(n, n, generator=generator, dtype=torch.float64) - 1)
    logits = rounded(logits, torch.float32)
    ids = (
        {"doc_ids": torch.randint(0, max(1, n // 3), (n,), generator=generator)} if with_ids else {}
    )
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)
    truth = logits_truth(logits, upstream, **ids)
    baseline = logits_loss_and_grad("torch", logits, upstream, torch.float32, **ids)
    got = logits_loss_and_grad("triton", logits, upstream, torch.float32, **ids)
    for g, b, t in zip(got, baseline, truth):
        allowed = 2 * float((b - t).abs().max()) + MARGINS[torch.float32] * max(
            1.0, float(t.abs().max())
        )
        assert float((g - t).abs().max()) <= allowed


# ------------------------------------------------------------------------------------------
# The tiles a GPU launches. Under the interpreter the launchers pick 32 x 32 tiles; these tests
# make them pick a GPU's (``tiling.architecture`` answers for it; bf16 dots keep the
# interpreter's fp32 upcast) and run ragged problems through every kernel and both backwards.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_tiles(monkeypatch):
    """``use(arch)``: the launchers take ``arch``'s default tiles from now on."""

    def use(arch: str) -> None:
        monkeypatch.setattr(tiling, "architecture", lambda device: arch)

    return use


@pytest.fixture
def strategy(request, monkeypatch):
    monkeypatch.setenv("GCL_OPS_BACKWARD", request.param)
    return request.param


#: (n, m, k, offset, dtype, tf32): widths whose padded k needs a tail accumulator (300: 256 + 64,
#: 520: 512 + 16) or two slices (600), ragged everywhere.
GPU_PROBLEMS = (
    (70, 150, 40, 41, torch.float32, False),
    (45, 45, 300, 0, torch.float32, True),
    (70, 70, 300, 0, torch.bfloat16, False),
    (66, 66, 520, 0, torch.float16, False),
    (40, 70, 600, 17, torch.bfloat16, False),
)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("strategy", tiling.STRATEGIES, indirect=True)
@pytest.mark.parametrize(("n", "m", "k", "offset", "dtype", "tf32"), GPU_PROBLEMS,
                         ids=lambda value: str(value).replace("torch.", ""))  # fmt: skip
def test_gpu_tiles_on_ragged_problems(
    gpu_tiles, restore_matmul_precision, arch, strategy, n, m, k, offset, dtype, tf32
) -> None:
    gpu_tiles(arch)
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    precision = tiling.precision_class(dtype, tf32)
    tiles = tiling.backward_tiles(arch, precision, tiling.padded_width(k), strategy)
    assert (tiles["K_MAIN"] + tiles["K_TAIL"]) * tiles["slices"] >= k
    query, doc, ids = make_problem(n, m, k, offset, with_ids=True, seed=n + k)
    if tf32:
        check_tf32_against_definition(query, doc, 25.0, offset=offset, **ids)
    else:
        check_against_definition("triton", query, doc, 25.0, dtype, offset=offset, **ids)


def check_tf32_against_definition(query, doc, scale, **kwargs) -> None:
    """TF32 GEMMs: operands rounded to 10 mantissa bits, so each cosine is off by up to about
    2^-10 (unit vectors); statistics within ``t 2^-9``, gradients within 5% of their size."""
    generator = torch.Generator().manual_seed(0)
    upstream = [torch.randn(n, generator=generator, dtype=torch.float64)
                for n in (query.shape[0], doc.shape[0], query.shape[0])]  # fmt: skip
    query, doc = rounded(query, torch.float32), rounded(doc, torch.float32)
    truth = stats_and_grads(definition.stats, query, doc, scale, upstream, torch.float64, **kwargs)
    got = stats_and_grads(lambda q, d, t, **kw: gcl_stats(q, d, t, impl="triton", **kw),
                          query, doc, scale, upstream, torch.float32, **kwargs)  # fmt: skip
    for index, (name, g, t) in enumerate(zip(NAMES, got, truth)):
        finite = torch.isfinite(t)
        assert torch.equal(torch.isfinite(g), finite), name
        error = float((g[finite] - t[finite]).abs().max())
        allowed = scale * 2**-9 if index < 3 else 0.05 * max(1.0, float(t[finite].abs().max()))
        assert error <= allowed, f"{name}: {error:.2e} > {allowed:.2e}"


@pytest.mark.parametrize("frozen", ["doc", "query"])
@pytest.mark.parametrize("strategy", tiling.STRATEGIES, indirect=True)
def test_backward_of_a_frozen_tower(gpu_tiles, strategy, frozen) -> None:
    # A frozen side gets no gradient launch: the trained side's gradient and d t are those of a
    # run that trains both, bitwise under the interpreter (on a GPU split blocks add atomically).
    gpu_tiles("sm90")
    query, doc, ids = make_problem(70, 70, 100, 0, with_ids=True, seed=3)
    ids = {name: value.to(DEVICE) for name, value in ids.items()}
    weights = torch.rand(70, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def gradients(train_query: bool, train_doc: bool) -> tuple:
        q = query.to(DEVICE, torch.bfloat16).requires_grad_(train_query)
        d = doc.to(DEVICE, torch.bfloat16).requires_grad_(train_doc)
        scale = torch.tensor(25.0, device=DEVICE, requires_grad=True)
        gcl_ops.gcl_loss(q, d, weights, scale, impl="triton", **ids).backward()
        return q.grad, d.grad, scale.grad

    both = gradients(True, True)
    one = gradients(frozen == "doc", frozen == "query")
    trained = 0 if frozen == "doc" else 1
    assert one[1 - trained] is None
    exact = tiling.INTERPRETING and strategy == "split"
    tolerance = dict(rtol=0, atol=0) if exact else {}
    torch.testing.assert_close(one[trained], both[trained], **tolerance)
    torch.testing.assert_close(one[2], both[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_strategies_agree(dtype) -> None:
    # The atomic backward (one launch, the queries' gradient added atomically) and the split
    # one (two atomic-free launches) compute the same gradients, up to the order of additions.
    query, doc, ids = make_problem(50, 90, 40, 13, with_ids=True, seed=8)
    upstream = [torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
                for n in (50, 90, 50)]  # fmt: skip
    results = {}
    for strategy in tiling.STRATEGIES:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GCL_OPS_BACKWARD", strategy)
            results[strategy] = stats_and_grads(
                lambda q, d, t, **kw: gcl_stats(q, d, t, impl="triton", **kw),
                query, doc, 20.0, upstream, dtype, offset=13, **ids,
            )  # fmt: skip
    for name, split, atomic in zip(NAMES, results["split"], results["atomic"]):
        torch.testing.assert_close(split, atomic, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6, msg=name)  # fmt: skip


def test_unknown_backward_strategy_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("GCL_OPS_BACKWARD", "fused")
    with pytest.raises(ValueError, match="GCL_OPS_BACKWARD must be one of"):
        tiling.backward_strategy()


@pytest.mark.parametrize("ulps", [-4, 4])
def test_a_few_ulps_of_the_cosines_do_not_matter(ulps) -> None:
    # The backward recomputes S in its own tile order (and on a GPU with other instructions),
    # so S may differ from the forward's by a few ulps. Shifting every log-sum-exp the backward
    # gets by ``ulps`` ulps of a cosine (the same as shifting S the other way) may change each
    # gradient term by at most a factor exp(t |delta|), and the clamp keeps P <= 1 where a
    # negative is alone in its row or column (here: every row and column of the first pairs).
    n, k, scale = 40, 24, 100.0
    query, doc, _ = make_problem(n, n, k, 0, with_ids=False, seed=2)
    ids = {"query_ids": torch.cat([torch.zeros(n - 2, dtype=torch.int64), torch.tensor([1, 2])])}
    q, d = query.float().to(DEVICE), doc.float().to(DEVICE)
    ids = {name: value.to(DEVICE) for name, value in ids.items()}
    t = torch.tensor(scale, device=DEVICE)
    forward = launchers.stats_forward(q, d, t, ids["query_ids"], None, 0, True)
    generator = torch.Generator().manual_seed(ulps)
    upstream = [torch.randn(n, generator=generator).to(DEVICE) for _ in range(3)]
    delta = ulps * 2.0**-23  # ulps of a cosine near 1
    shifted_row, shifted_col = forward.row_parts.clone(), forward.col_parts.clone()
    shifted_row[0] += delta  # (lse / t of the rows; row 1 holds the positive cosines)
    shifted_col += delta

    def backward(row_parts, col_parts):
        return launchers.stats_backward(
            q, d, t, ids["query_ids"], None, forward.neg_row, forward.neg_col, *upstream, 0,
            True, row_parts=row_parts, col_parts=col_parts,
        )  # fmt: skip

    exact, shifted = (
        backward(forward.row_parts, forward.col_parts),
        backward(shifted_row, shifted_col),
    )
    factor = math.expm1(scale * abs(delta)) * 1.01
    for name, a, b in zip(("query", "doc"), exact[:2], shifted[:2]):
        assert torch.isfinite(b).all(), name
        # |d grad| <= factor * (t * sum |dZ| * |x^|) <= factor * t * (|g| sums), row by row
        bound = factor * scale * (sum(u.abs().sum() for u in upstream) + 1.0) * 2 / math.sqrt(k)
        assert float((a - b).abs().max()) <= max(bound, 1e-6), name
    assert abs(float(exact[2] - shifted[2])) <= factor * float(sum(u.abs().sum() for u in upstream))


# ------------------------------------------------------------------------------------------
# The forward's sums: well-conditioned inputs go through the one pass alone.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["interpreter", "sm90"])
@pytest.mark.parametrize(("n", "m", "offset"), [(37, 37, 0), (40, 95, 29)])
def test_forward_sums_match_a_plain_computation(gpu_tiles, arch, n, m, offset) -> None:
    # Every row and column has well-conditioned negatives (cosines between -0.5 and 1 at
    # t = 20, no shift): nothing goes to the exact recomputation, and the kernel's raw sums of
    # exp(Z - shift) over the negatives equal a plain float64 computation. A mask that drops
    # the last column would still be repaired by the recomputation (a slow path on every call,
    # invisible to the values): the sums and the recomputation flags show it.
    gpu_tiles(arch)
    query, doc, ids = make_problem(n, m, 48, offset, with_ids=True, seed=m)
    scale = 20.0
    q, d = query.float().to(DEVICE), doc.float().to(DEVICE)
    ids_here = {name: value.to(DEVICE) for name, value in ids.items()}
    stats = launchers.stats_forward(q, d, torch.tensor(scale, device=DEVICE),
                                    ids_here["query_ids"], ids_here["doc_ids"], offset, True)  # fmt: skip
    assert not stats.redo_rows.any() and not stats.redo_cols.any()
    q64, d64 = (F.normalize(x.double(), dim=-1) for x in (rounded(query, torch.float32),
                                                           rounded(doc, torch.float32)))  # fmt: skip
    z = scale * q64 @ d64.T
    negative = ~definition.duplicates(n, m, ids["query_ids"], ids["doc_ids"], offset)
    negative.diagonal(offset).fill_(False)
    terms = torch.where(negative, z.exp(), 0.0)  # shift 0: t = 20 < 64
    for got, want in ((stats.row_sum, terms.sum(1)), (stats.col_sum, terms.sum(0))):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=0)


def test_gpu_tile_sizes_online_recomputation(gpu_tiles) -> None:
    # Raw dot products far beyond the fixed shift: the online log-sum-exp kernel recomputes.
    gpu_tiles("sm90")
    query, doc, ids = make_problem(70, 150, 16, 41, with_ids=True, seed=1)
    check_against_definition("triton", 8 * query, 8 * doc, 10.0, torch.float32, offset=41,
                             normalize=False, **ids)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_tile_sizes_logits_form(gpu_tiles, dtype) -> None:
    # 130 rows: three 64 x 64 tiles per side, ragged.
    gpu_tiles("sm90")
    n = 130
    generator = torch.Generator().manual_seed(7)
    logits = rounded(20 * torch.randn(n, n, generator=generator, dtype=torch.float64), dtype)
    logits.diagonal().add_(15.0)
    logits = rounded(logits, dtype)
    ids = {"doc_ids": torch.randint(0, 40, (n,), generator=generator)}
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)
    truth = logits_truth(logits, upstream, **ids)
    got = logits_loss_and_grad("triton", logits, upstream, dtype, **ids)
    grad_rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
    for name, g, t, rtol in zip(("loss", "grad"), got, truth, (0.0, grad_rtol)):
        size = max(1.0, float(t.abs().max()))
        excess = (g - t).abs() - rtol * t.abs() - MARGINS[torch.float32] * size
        assert float(excess.max()) <= 0, f"{name}: {float((g - t).abs().max()):.3e} off"


# ------------------------------------------------------------------------------------------
# Switches and refusals.
# ------------------------------------------------------------------------------------------


def test_fp32_dots_follow_the_pytorch_matmul_precision() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not launchers.allow_tf32()
        torch.set_float32_matmul_precision("high")
        assert launchers.allow_tf32()
    finally:
        torch.set_float32_matmul_precision(previous)


def test_auto_picks_the_backend() -> None:
    cpu = torch.zeros(4, 8)
    assert contrastive.resolve_backend("auto", cpu) == "torch"
    assert contrastive.resolve_backend("torch", cpu) == "torch"
    if torch.cuda.is_available():
        assert contrastive.resolve_backend("auto", cpu.cuda().half()) == "triton"
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
