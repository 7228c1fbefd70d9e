"""Hard negatives (docs/CONTRACT.md section 1.1) and the weighted mean, against the float64
definition (``definition.loss_with_negatives``, independent of the package), on every backend.

A batch here is a ``GCLBatch`` (pairs, weights, ids) plus ``H`` negatives: a mix of a random
query and noise (so that some are hard), with ids drawn from the documents' id range (so that
some are false negatives of a row). Gradients are compared for the queries, documents,
negatives and the logit scale under a random upstream gradient, with the tolerances of
tests/test_loss.py: fp64 to 1e-9; fp32 within twice naive fp32 PyTorch's error plus fp32
rounding (and, for the scale, the cosine-error bounds of docs/CONTRACT.md section 9); half
inputs within one rounding to their dtype.
"""

from __future__ import annotations

import dataclasses

import definition
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from params import DEVICE
from test_loss import MIN_LOSS, TOLERANCES, ulp32

import gcl_ops
from gcl_ops.reference import naive_gcl_loss
from gcl_ops.testing import GCLBatch, gcl_batches

NAMES = ("loss", "d query", "d doc", "d negatives", "d logit_scale")


@dataclasses.dataclass(frozen=True)
class NegativesBatch:
    pairs: GCLBatch
    negatives: torch.Tensor
    negative_ids: torch.Tensor | None

    def to(self, dtype: torch.dtype, device: str = "cpu") -> NegativesBatch:
        return NegativesBatch(
            self.pairs.to(dtype=dtype, device=device),
            self.negatives.to(dtype=dtype, device=device),
            None if self.negative_ids is None else self.negative_ids.to(device),
        )

    def keywords(self) -> dict:
        keywords = dict(self.pairs.ids(), negatives=self.negatives)
        if self.negative_ids is not None:
            keywords["negative_ids"] = self.negative_ids
        return keywords


@st.composite
def negatives_batches(
    draw: st.DrawFn, *, max_n: int = 48, max_h: int = 40, min_k: int = 2, max_k: int = 32,
    ids: bool | None = None,
) -> NegativesBatch:  # fmt: skip
    pairs = draw(gcl_batches(max_n=max_n, min_k=min_k, max_k=max_k, ids=ids, min_loss=MIN_LOSS))
    n, k = pairs.query.shape
    h = draw(st.integers(1, max_h), label="H")
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    hardness = draw(st.floats(0.0, 0.9), label="hardness")
    anchors = pairs.query[torch.randint(0, n, (h,), generator=generator)]
    noise = torch.randn(h, k, generator=generator, dtype=torch.float64)
    negatives = hardness * anchors + (1 - hardness) * noise
    negative_ids = None
    if pairs.doc_ids is not None and draw(st.booleans(), label="negative ids"):
        top = int(pairs.doc_ids.max()) + 2
        negative_ids = torch.randint(0, top, (h,), generator=generator)
    return NegativesBatch(pairs, negatives, negative_ids)


def loss_and_grads(loss_fn, batch: NegativesBatch, upstream: torch.Tensor, scale_dtype) -> list:
    """``[loss, d query, d doc, d negatives, d t]`` of ``loss_fn`` (float64, on the CPU)."""
    pairs = batch.pairs
    leaves = [x.detach().clone().requires_grad_() for x in (pairs.query, pairs.doc)]
    negatives = batch.negatives.detach().clone().requires_grad_()
    scale = torch.tensor(pairs.logit_scale, dtype=scale_dtype, device=negatives.device)
    scale.requires_grad_()
    keywords = dict(batch.keywords(), negatives=negatives)
    loss = loss_fn(*leaves, pairs.weights, scale, **keywords)
    grads = torch.autograd.grad(loss, (*leaves, negatives, scale), upstream.to(loss))
    return [t.detach().double().cpu() for t in (loss, *grads)]


def truth_fn(reduction: str, normalize: bool):
    def loss(query, doc, weights, scale, *, negatives, **ids):
        return definition.loss_with_negatives(
            query, doc, negatives, weights, scale, reduction=reduction, normalize=normalize, **ids
        )

    return loss


def largest_similarity(batch: NegativesBatch, normalize: bool) -> float:
    """A bound on ``|S|``: 1 for unit vectors, else the largest norms' product."""
    if normalize:
        return 1.0
    columns = torch.cat([batch.pairs.doc, batch.negatives])
    return float(batch.pairs.query.norm(dim=-1).max() * columns.norm(dim=-1).max())


def scale_bounds(batch: NegativesBatch, upstream, reduction: str, normalize: bool) -> float:
    """How far any fp32 ``dL/dt`` may land from the truth (docs/CONTRACT.md section 9): the
    cosines off by two ulps, and the backward's cosines off from the forward's by two ulps."""
    pairs = batch.pairs
    cos_docs = definition.similarities(pairs.query, pairs.doc, 1.0, normalize).requires_grad_()
    cos_negatives = definition.similarities(pairs.query, batch.negatives, 1.0, normalize)
    cos_negatives.requires_grad_()
    t = pairs.logit_scale
    ids = {key: value for key, value in batch.keywords().items() if key != "negatives"}
    per_pair = definition.loss_with_negatives_from_logits(
        t * cos_docs, t * cos_negatives, pairs.weights, reduction=reduction, **ids
    )
    cosines = (cos_docs, cos_negatives)
    grads = torch.autograd.grad((per_pair * upstream).sum(), cosines, create_graph=True)
    terms = [g * c for g, c in zip(grads, cosines)]
    sensitivity = torch.autograd.grad(sum(x.sum() for x in terms) / t, cosines)
    largest = largest_similarity(batch, normalize)
    total_sensitivity = sum(float(s.abs().sum()) for s in sensitivity) * largest
    total_terms = sum(float(x.detach().abs().sum()) for x in terms)
    return 2 * 2.0**-23 * total_sensitivity + 2 * ulp32(largest) * total_terms


def check(loss_fn, batch: NegativesBatch, reduction: str, normalize: bool = True) -> None:
    dtype = batch.negatives.dtype
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    pairs = dataclasses.replace(
        batch.pairs, logit_scale=float(torch.tensor(batch.pairs.logit_scale, dtype=scale_dtype))
    )
    batch = dataclasses.replace(batch, pairs=pairs)
    upstream = torch.randn(
        (pairs.n,) if reduction == "none" else (),
        generator=torch.Generator().manual_seed(1), dtype=torch.float64,
    )  # fmt: skip
    batch64 = batch.to(torch.float64)
    got = loss_and_grads(loss_fn, batch, upstream, scale_dtype)
    truth = loss_and_grads(truth_fn(reduction, normalize), batch64, upstream, torch.float64)
    sizes = [max(1.0, float(t.abs().max())) for t in truth]
    if normalize:  # noise scales with the unprojected gradient (tests/test_loss.py)
        smallest = min(
            float(x.norm(dim=-1).min())
            for x in (batch64.pairs.query, batch64.pairs.doc, batch64.negatives)
        )
        sizes = [sizes[0]] + [s * max(1.0, 1.0 / smallest) for s in sizes[1:]]
    yardstick = [torch.zeros_like(t) for t in truth]
    if dtype == torch.float32:
        naive = loss_and_grads(
            lambda *a, **kw: naive_gcl_loss(*a, reduction=reduction, normalize=normalize, **kw),
            batch, upstream, scale_dtype,
        )  # fmt: skip
        yardstick = [2 * (x - t).abs() for x, t in zip(naive, truth)]
        yardstick[4] = yardstick[4] + scale_bounds(batch64, upstream, reduction, normalize)
        # The backward's recomputed S may differ from the forward's by two ulps of max |S|,
        # scaling each probability by up to exp(t * delta) (docs/CONTRACT.md section 9).
        recomputation = pairs.logit_scale * 2 * ulp32(largest_similarity(batch64, normalize))
        for index in (1, 2, 3):
            yardstick[index] = yardstick[index] + recomputation * sizes[index]
    value_rtol, value_margin, grad_rtol, grad_margin = TOLERANCES[dtype]
    for index, (name, g, t) in enumerate(zip(NAMES, got, truth)):
        rtol, margin = (value_rtol, value_margin) if index == 0 else (grad_rtol, grad_margin)
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        excess = (g - t).abs() - rtol * t.abs() - margin * sizes[index] - yardstick[index]
        worst = int(excess.reshape(-1).argmax())
        assert float(excess.reshape(-1)[worst]) <= 0, (
            f"{name} ({dtype}, {reduction}): {float(g.reshape(-1)[worst]):.9g} vs truth "
            f"{float(t.reshape(-1)[worst]):.9g}"
        )


def gcl(impl: str, reduction: str, normalize: bool = True):
    def loss(*args, **keywords):
        return gcl_ops.gcl_loss(
            *args, reduction=reduction, normalize=normalize, impl=impl, **keywords
        )

    return loss


REDUCTIONS = ("mean", "sum", "weighted_mean", "none")


# ----------------------------------------------------------------------------------------------
# Against the definition
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@settings(max_examples=25)
@given(batch=negatives_batches())
def test_torch_path_matches_definition_float64(
    reduction: str, normalize: bool, batch: NegativesBatch
) -> None:
    check(gcl("torch", reduction, normalize), batch, reduction, normalize)


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "none"])
@settings(max_examples=15)
@given(batch=negatives_batches())
def test_torch_path_float32_matches_definition(reduction: str, batch: NegativesBatch) -> None:
    check(gcl("torch", reduction), batch.to(torch.float32), reduction)


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "none"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@settings(max_examples=8)
@given(batch=negatives_batches(max_n=40, max_h=56, max_k=40))
def test_triton_kernels_match_definition(
    reduction: str, normalize: bool, batch: NegativesBatch
) -> None:
    check(
        gcl("triton", reduction, normalize), batch.to(torch.float32, DEVICE), reduction, normalize
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@settings(max_examples=6)
@given(batch=negatives_batches(max_n=40, max_h=56))
def test_triton_half_precision_matches_definition(
    dtype: torch.dtype, batch: NegativesBatch
) -> None:
    check(gcl("triton", "mean"), batch.to(dtype, DEVICE), "mean")


@settings(max_examples=20)
@given(batch=gcl_batches(max_n=40, min_k=2, min_loss=MIN_LOSS))
def test_weighted_mean_without_negatives_matches_definition(batch: GCLBatch) -> None:
    got = gcl_ops.gcl_loss(
        batch.query, batch.doc, batch.weights, batch.logit_scale, reduction="weighted_mean",
        **batch.ids(),
    )  # fmt: skip
    truth = definition.loss(
        batch.query, batch.doc, batch.weights, batch.logit_scale, reduction="weighted_mean",
        **batch.ids(),
    )  # fmt: skip
    torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


def _batch(n: int = 6, h: int = 4, k: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query, doc = (torch.randn(n, k, generator=generator, dtype=torch.float64) for _ in range(2))
    negatives = torch.randn(h, k, generator=generator, dtype=torch.float64)
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * 10
    return query, doc, negatives, weights


def test_a_masked_negative_equals_a_removed_one() -> None:
    query, doc, negatives, weights = _batch()
    doc_ids = torch.arange(6)
    negative_ids = torch.tensor([2, 10, 11, 4])  # negatives 0 and 3 are rows 2 and 4's positives
    masked = gcl_ops.gcl_loss(
        query, doc, weights, 3.0, doc_ids=doc_ids, negatives=negatives, negative_ids=negative_ids,
        reduction="none",
    )  # fmt: skip
    unmasked = gcl_ops.gcl_loss(query, doc, weights, 3.0, negatives=negatives, reduction="none")
    for row in range(6):
        keep = negative_ids != row
        alone = gcl_ops.gcl_loss(
            query, doc, weights, 3.0, negatives=negatives[keep], reduction="none"
        )
        torch.testing.assert_close(masked[row], alone[row], rtol=1e-12, atol=0)
    changed = (masked != unmasked).nonzero().flatten().tolist()
    assert changed == [2, 4]


def test_negatives_of_shape_n_h_k_are_flattened_row_by_row() -> None:
    # (N, h, k) negatives with (N, h) ids: the same as (N h, k) and (N h,) in row-major order.
    query, doc, negatives, weights = _batch(n=4, h=8)
    doc_ids, negative_ids = torch.arange(4), torch.tensor([0, 7, 1, 1, 9, 2, 3, 3])
    flat = gcl_ops.gcl_loss(
        query, doc, weights, 2.0, doc_ids=doc_ids, negatives=negatives, negative_ids=negative_ids
    )
    per_row = gcl_ops.gcl_loss(
        query, doc, weights, 2.0, doc_ids=doc_ids, negatives=negatives.reshape(4, 2, 5),
        negative_ids=negative_ids.reshape(4, 2),
    )  # fmt: skip
    torch.testing.assert_close(per_row, flat, rtol=0, atol=0)


def test_weighted_mean_is_mean_rescaled_and_zero_without_weight() -> None:
    query, doc, negatives, weights = _batch()
    mean = gcl_ops.gcl_loss(query, doc, weights, 2.0, negatives=negatives)
    weighted = gcl_ops.gcl_loss(
        query, doc, weights, 2.0, negatives=negatives, reduction="weighted_mean"
    )
    torch.testing.assert_close(weighted, mean * 6 / weights.sum(), rtol=1e-12, atol=0)
    unweighted = gcl_ops.gcl_loss(query, doc, None, 2.0, reduction="weighted_mean")
    torch.testing.assert_close(unweighted, gcl_ops.gcl_loss(query, doc, None, 2.0))
    zero = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    off = gcl_ops.gcl_loss(query, doc, zero, 2.0, reduction="weighted_mean")
    (grad,) = torch.autograd.grad(off, zero)
    assert float(off.detach()) == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_negatives_and_frozen_documents(impl: str) -> None:
    # A frozen side gets no gradient; the other sides' gradients are unchanged.
    dtype = torch.float64 if impl == "torch" else torch.float32
    query, doc, negatives, weights = (x.to(dtype) for x in _batch(n=19, h=23))
    query, doc, negatives = (x.to(DEVICE) for x in (query, doc, negatives))
    weights = weights.to(DEVICE)

    def loss_of(q, d, e):
        return gcl_ops.gcl_loss(q, d, weights, 4.0, negatives=e, impl=impl)

    leaves = [x.clone().requires_grad_() for x in (query, doc, negatives)]
    full = torch.autograd.grad(loss_of(*leaves), leaves)
    for frozen in (0, 1, 2):
        inputs = [x.detach().clone().requires_grad_(i != frozen) for i, x in enumerate(leaves)]
        loss = loss_of(*inputs)
        trainable = [x for x in inputs if x.requires_grad]
        grads = torch.autograd.grad(loss, trainable)
        expected = [g for i, g in enumerate(full) if i != frozen]
        # The same computation, less of it: bitwise on a CPU (GPU atomics may reorder sums).
        rtol = 0.0 if DEVICE == "cpu" else 1e-5
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(negatives=torch.randn(4, 3, dtype=torch.float64)), ValueError, "width 3, expected 5"),
        (dict(negatives=torch.randn(4, 5)), TypeError, "documents' dtype torch.float64"),
        (dict(negatives=torch.randn(5, 2, 5, dtype=torch.float64)), ValueError, "N = 6 rows"),
        (dict(negatives=torch.randn(0, 5, dtype=torch.float64)), ValueError, r"\(H = 0\)"),
        (dict(negatives=torch.randn(4, dtype=torch.float64)), ValueError, r"\(H, k\) or"),
        (dict(negatives=[[0.0] * 5]), TypeError, "negatives must be a torch.Tensor"),
        (dict(negative_ids=torch.arange(3)), ValueError, r"negative_ids must have shape"),
        (dict(negative_ids=torch.zeros(4)), TypeError, "negative_ids must be an integer"),
        (dict(doc_ids=None), ValueError, "pass doc_ids too"),
        (dict(negatives=None), ValueError, "negative_ids were given without negatives"),
        (
            dict(negatives=torch.full((4, 5), float("nan"), dtype=torch.float64)),
            ValueError,
            "negatives has non-finite values",
        ),
        (
            dict(negatives=torch.zeros(4, 5, dtype=torch.float64)),
            ValueError,
            "negatives row 0 is all zeros",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_malformed_negatives_raise_a_clear_error(change, error, message) -> None:
    query, doc, negatives, weights = _batch()
    arguments = dict(negatives=negatives, negative_ids=torch.arange(4), doc_ids=torch.arange(6))
    arguments.update(change)
    with pytest.raises(error, match=message):
        gcl_ops.gcl_loss(query, doc, weights, 2.0, **arguments)


def test_negatives_on_another_device_raise() -> None:
    query, doc, _, weights = _batch()
    elsewhere = torch.empty(4, 5, dtype=torch.float64, device="meta")  # any other device
    with pytest.raises(ValueError, match="documents' device cpu, got meta"):
        gcl_ops.gcl_loss(query, doc, weights, 2.0, negatives=elsewhere)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logits_form_with_negative_columns(reduction: str) -> None:
    # (N, N + H) logits: the last H columns are hard negatives, as gcl_loss's negatives.
    query, doc, negatives, weights = _batch(n=7, h=5)
    doc_ids, negative_ids = torch.arange(7), torch.tensor([3, 8, 0, 9, 9])
    logits = 3.0 * F.normalize(query) @ F.normalize(torch.cat([doc, negatives])).T
    logits.requires_grad_()
    got = gcl_ops.gcl_loss_from_logits(
        logits, weights, num_negatives=5, doc_ids=doc_ids, negative_ids=negative_ids,
        reduction=reduction,
    )  # fmt: skip
    scaled_cosines = logits.detach().requires_grad_()
    truth = definition.loss_with_negatives_from_logits(
        scaled_cosines[:, :7], scaled_cosines[:, 7:], weights, doc_ids=doc_ids,
        negative_ids=negative_ids, reduction=reduction,
    )  # fmt: skip
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-14)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=got.dtype)
    (grad,) = torch.autograd.grad(got, logits, upstream)
    (want,) = torch.autograd.grad(truth, scaled_cosines, upstream)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="takes square logits"):
        gcl_ops.gcl_loss_from_logits(logits.float(), num_negatives=5, impl="triton")
    # Extra columns are hard negatives only when asked for: (N, M) logits of one rank against
    # a gathered batch have their positives elsewhere.
    with pytest.raises(ValueError, match=r"num_negatives = 0, got \(7, 12\)"):
        gcl_ops.gcl_loss_from_logits(logits)
    with pytest.raises(ValueError, match="num_negatives must be an integer"):
        gcl_ops.gcl_loss_from_logits(logits, num_negatives=-5)
    with pytest.raises(ValueError, match="no negative columns"):
        gcl_ops.gcl_loss_from_logits(logits[:, :7], doc_ids=doc_ids, negative_ids=negative_ids)
