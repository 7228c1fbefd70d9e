"""The GCL loss (paper Eq. 4) against its materialised definition, open_clip and its properties."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from params import DEVICE

import gcl_ops
from gcl_ops.reference import naive_gcl_loss, naive_gcl_loss_from_logits
from gcl_ops.testing import GCLBatch, assert_matches_reference, gcl_batches

REDUCTIONS = ("mean", "sum", "none")


def torch_loss(reduction: str, normalize: bool = True):
    return functools.partial(
        gcl_ops.gcl_loss, reduction=reduction, normalize=normalize, impl="torch"
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(batch=gcl_batches(max_n=64))
def test_blocked_path_matches_definition_float64(reduction: str, batch: GCLBatch) -> None:
    # Value and gradients w.r.t. query, doc and logit_scale to 1e-6 relative.
    assert_matches_reference(
        torch_loss(reduction), batch, reduction=reduction, rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@settings(max_examples=20)
@given(batch=gcl_batches(max_n=96, min_k=2, max_k=64, dtype=torch.float32))
def test_triton_kernels_match_definition(reduction: str, batch: GCLBatch) -> None:
    # Under the interpreter without a GPU; weights, duplicate ids and ragged N, k drawn.
    loss_fn = functools.partial(gcl_ops.gcl_loss, reduction=reduction, impl="triton")
    assert_matches_reference(loss_fn, batch.to(device=DEVICE), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@settings(max_examples=15)
@given(batch=gcl_batches(max_n=64, min_k=2, max_k=64, dtype=torch.float32))
def test_triton_half_precision_no_worse_than_pytorch(dtype: torch.dtype, batch: GCLBatch) -> None:
    loss_fn = functools.partial(gcl_ops.gcl_loss, impl="triton")
    assert_matches_reference(loss_fn, batch.to(dtype=dtype, device=DEVICE))


@given(batch=gcl_batches(max_n=40))
def test_without_normalisation_matches_definition(batch: GCLBatch) -> None:
    assert_matches_reference(
        torch_loss("sum", normalize=False), batch, reduction="sum", normalize=False
    )


@given(batch=gcl_batches(max_n=48, min_k=2, dtype=torch.float32))
def test_float32_matches_float64_definition(batch: GCLBatch) -> None:
    # k = 1 is left out: every gradient is then exactly 0 and fp32 leaves cancellation noise.
    assert_matches_reference(torch_loss("mean"), batch)


@given(batch=gcl_batches(max_n=40))
def test_logits_form_matches_definition(batch: GCLBatch) -> None:
    logits = batch.logit_scale * F.normalize(batch.query) @ F.normalize(batch.doc).T
    for reduction in REDUCTIONS:
        got = gcl_ops.gcl_loss_from_logits(
            logits, batch.weights, reduction=reduction, **batch.ids()
        )
        want = naive_gcl_loss_from_logits(logits, batch.weights, reduction=reduction, **batch.ids())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_logits_form_gradient() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (5 * torch.randn(23, 23, generator=generator, dtype=torch.float64)).requires_grad_()
    weights = torch.rand(23, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 6, (23,), generator=generator)
    assert torch.autograd.gradcheck(
        lambda z: gcl_ops.gcl_loss_from_logits(z, weights, query_ids=ids, reduction="none"),
        (logits,),
    )


@given(batch=gcl_batches(max_n=32), data=st.data())
def test_permuting_the_batch_leaves_the_loss_unchanged(
    batch: GCLBatch, data: st.DataObject
) -> None:
    permutation = torch.tensor(data.draw(st.permutations(range(batch.n))), dtype=torch.int64)
    moved = batch.permuted(permutation)

    def per_pair(b: GCLBatch) -> torch.Tensor:
        return gcl_ops.gcl_loss(
            b.query, b.doc, b.weights, b.logit_scale, reduction="none", **b.ids()
        )

    torch.testing.assert_close(per_pair(moved), per_pair(batch)[permutation], rtol=1e-10, atol=1e-9)


@given(batch=gcl_batches(min_n=2, max_n=24, ids=True))
def test_masking_a_duplicate_equals_removing_it(batch: GCLBatch) -> None:
    # Exclusion is symmetric, so pair i's masked loss equals its plain loss on the sub-batch
    # without the pairs that share its query or document id.
    masked = gcl_ops.gcl_loss(
        batch.query, batch.doc, batch.weights, batch.logit_scale, reduction="none", **batch.ids()
    )
    for i in range(batch.n):
        shares_id = (batch.query_ids == batch.query_ids[i]) | (batch.doc_ids == batch.doc_ids[i])
        keep = ~shares_id
        keep[i] = True
        sub = GCLBatch(
            batch.query[keep],
            batch.doc[keep],
            None if batch.weights is None else batch.weights[keep],
            batch.logit_scale,
        )
        plain = gcl_ops.gcl_loss(sub.query, sub.doc, sub.weights, sub.logit_scale, reduction="none")
        position = int(keep[:i].sum())
        torch.testing.assert_close(masked[i], plain[position], rtol=1e-10, atol=1e-9)


@given(batch=gcl_batches(max_n=32, weights=False))
def test_unit_weights_equal_no_weights_and_weights_scale_linearly(batch: GCLBatch) -> None:
    args = (batch.query, batch.doc)
    plain = gcl_ops.gcl_loss(*args, None, batch.logit_scale, **batch.ids())
    ones = gcl_ops.gcl_loss(
        *args, torch.ones(batch.n, dtype=torch.float64), batch.logit_scale, **batch.ids()
    )
    threes = gcl_ops.gcl_loss(
        *args, torch.full((batch.n,), 3.0, dtype=torch.float64), batch.logit_scale, **batch.ids()
    )
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(threes, 3 * plain)


def test_gradcheck_whole_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(9, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    doc = torch.randn(9, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    assert torch.autograd.gradcheck(
        lambda q, d, w, t: gcl_ops.gcl_loss(q, d, w, t, query_ids=ids, reduction="none"),
        (query, doc, weights, scale),
    )


def test_half_precision_inputs_compute_in_float32() -> None:
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(30, 16, generator=generator)
    doc = torch.randn(30, 16, generator=generator)
    for dtype in (torch.float16, torch.bfloat16):
        loss = gcl_ops.gcl_loss(query.to(dtype), doc.to(dtype), logit_scale=10.0)
        assert loss.dtype == torch.float32
        want = naive_gcl_loss(query.to(dtype).double(), doc.to(dtype).double(), logit_scale=10.0)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# open_clip's ClipLoss is the w = 1 special case.
# ------------------------------------------------------------------------------------------


def _clip_features(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, k, generator=generator), dim=-1)
    text = F.normalize(torch.randn(n, k, generator=generator), dim=-1)
    return image, text


@given(
    n=st.integers(1, 48),
    k=st.integers(2, 32),
    seed=st.integers(0, 1000),
    scale=st.floats(1.0, 100.0),
)
def test_unit_weights_equal_open_clip_clip_loss(n: int, k: int, seed: int, scale: float) -> None:
    from open_clip.loss import ClipLoss

    image, text = _clip_features(n, k, seed)
    want = ClipLoss()(image, text, torch.tensor(scale))
    got = gcl_ops.gcl_loss(image, text, None, torch.tensor(scale))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gcl_loss_module_is_a_drop_in_for_clip_loss() -> None:
    from open_clip.loss import ClipLoss

    image, text = _clip_features(37, 24, seed=5)
    results = {}
    for name, module in (("clip", ClipLoss()), ("gcl", gcl_ops.GCLLoss(normalize=False))):
        image_leaf, text_leaf = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(14.0, requires_grad=True)
        out = module(image_leaf, text_leaf, scale, output_dict=True)
        assert list(out) == ["contrastive_loss"]
        out["contrastive_loss"].backward()
        results[name] = (out["contrastive_loss"], image_leaf.grad, text_leaf.grad, scale.grad)
    for got, want in zip(results["gcl"], results["clip"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_normalisation_keeps_model_parameter_gradients_of_clip_loss() -> None:
    # open_clip normalises features inside the model, so re-normalising in the loss changes only
    # the radial part of the feature gradient, which the model's own normalisation removes.
    from open_clip.loss import ClipLoss

    generator = torch.Generator().manual_seed(7)
    inputs_a = torch.randn(21, 10, generator=generator)
    inputs_b = torch.randn(21, 12, generator=generator)
    tower_a, tower_b = torch.nn.Linear(10, 8), torch.nn.Linear(12, 8)
    grads = {}
    for name, loss_fn in (("clip", ClipLoss()), ("gcl", gcl_ops.GCLLoss())):
        tower_a.zero_grad(), tower_b.zero_grad()
        image = F.normalize(tower_a(inputs_a), dim=-1)
        text = F.normalize(tower_b(inputs_b), dim=-1)
        loss_fn(image, text, torch.tensor(20.0)).backward()
        grads[name] = [p.grad.clone() for p in (*tower_a.parameters(), *tower_b.parameters())]
    for got, want in zip(grads["gcl"], grads["clip"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input: each error names the argument.
# ------------------------------------------------------------------------------------------


def _good_args() -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        query=torch.randn(6, 4, generator=generator),
        doc=torch.randn(6, 4, generator=generator),
        weights=torch.rand(6, generator=generator),
        logit_scale=10.0,
    )


def _with(**changes) -> dict:
    args = _good_args()
    args.update(changes)
    return args


def _nan_at(tensor: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = float("nan")
    return tensor


BAD_INPUTS = [
    (lambda: _with(doc=torch.randn(5, 4)), ValueError, "doc has 5 rows, expected 6"),
    (lambda: _with(doc=torch.randn(6, 3)), ValueError, "doc has width 3, expected 4"),
    (lambda: _with(query=torch.randn(6)), ValueError, r"query must have shape \(N, k\)"),
    (
        lambda: _with(query=torch.randn(0, 4), doc=torch.randn(0, 4), weights=None),
        ValueError,
        "empty batch",
    ),
    (
        lambda: _with(query=torch.ones(6, 4, dtype=torch.int64)),
        TypeError,
        "query must be a floating-point",
    ),
    (
        lambda: _with(query=_nan_at(torch.randn(6, 4), (2, 1))),
        ValueError,
        r"query has non-finite values .* \[2, 1\]",
    ),
    (lambda: _with(doc=torch.full((6, 4), float("inf"))), ValueError, "doc has non-finite"),
    (lambda: _with(weights=_nan_at(torch.rand(6), (3,))), ValueError, "weights has non-finite"),
    (
        lambda: _with(weights=torch.tensor([1.0, 1, -0.5, 1, 1, 1])),
        ValueError,
        r"weights must be >= 0, weights\[2\]",
    ),
    (lambda: _with(weights=torch.rand(5)), ValueError, r"weights must have shape \(N,\) = \(6,\)"),
    (
        lambda: _with(query=torch.randn(6, 4).index_fill(0, torch.tensor([4]), 0.0)),
        ValueError,
        "query row 4 is all zeros",
    ),
    (lambda: _with(logit_scale=0.0), ValueError, "logit_scale must be positive"),
    (lambda: _with(logit_scale=torch.tensor(-1.0)), ValueError, "logit_scale must be positive"),
    (lambda: _with(logit_scale=torch.ones(2)), ValueError, "logit_scale must be a scalar"),
    (lambda: _with(logit_scale="10"), TypeError, "logit_scale must be a float or a tensor"),
    (lambda: _with(query_ids=torch.arange(5)), ValueError, r"query_ids must have shape \(N,\)"),
    (lambda: _with(doc_ids=torch.rand(6)), TypeError, "doc_ids must be an integer tensor"),
    (lambda: _with(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: _with(impl="cuda"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize(("make_args", "error", "message"), BAD_INPUTS)
def test_bad_input_raises_a_clear_error(make_args, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        gcl_ops.gcl_loss(**make_args())


def test_zero_rows_are_fine_without_normalisation() -> None:
    args = _with(query=torch.randn(6, 4).index_fill(0, torch.tensor([4]), 0.0))
    assert torch.isfinite(gcl_ops.gcl_loss(**args, normalize=False))


def test_validate_false_skips_value_checks_but_not_shape_checks() -> None:
    args = _with(weights=torch.tensor([1.0, 1, -0.5, 1, 1, 1]))
    gcl_ops.gcl_loss(**args, validate=False)
    with pytest.raises(ValueError, match="doc has 5 rows"):
        gcl_ops.gcl_loss(**_with(doc=torch.randn(5, 4)), validate=False)


def test_logits_form_bad_input() -> None:
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        gcl_ops.gcl_loss_from_logits(torch.randn(3, 4))
    with pytest.raises(ValueError, match="empty batch"):
        gcl_ops.gcl_loss_from_logits(torch.randn(0, 0))
    with pytest.raises(ValueError, match="logits has non-finite"):
        gcl_ops.gcl_loss_from_logits(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_autocast_leaves_the_statistics_in_fp32(impl: str) -> None:
    # Under autocast the similarity matmuls must not drop to bf16 inside the loss: the result
    # equals the loss of the same (fp32) inputs without autocast.
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(40, 32, generator=generator).to(DEVICE).requires_grad_()
    doc = torch.randn(40, 32, generator=generator).to(DEVICE)
    plain = gcl_ops.gcl_loss(query, doc, logit_scale=50.0, impl=impl)
    (plain_grad,) = torch.autograd.grad(plain, query)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed = gcl_ops.gcl_loss(query, doc, logit_scale=50.0, impl=impl)
        (mixed_grad,) = torch.autograd.grad(mixed, query)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_grad, plain_grad, rtol=1e-5, atol=1e-7)
