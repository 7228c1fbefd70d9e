"""The autograd layer: ``torch.autograd.Function`` s over the custom ops of ``gcl_ops.ops``, and
the statistics layer (``gcl_stats``, ``per_pair_loss``, ``resolve_backend``) that the public loss
(``gcl_ops.contrastive``) and the distributed loss (``gcl_ops.distributed``) build on.
"""

from typing import Literal

import torch

from gcl_ops import _checks, ops  # noqa: F401 (importing gcl_ops.ops registers torch.ops.gcl_ops.*)
from gcl_ops._triton import HAS_TRITON
from gcl_ops.launchers import MAX_TRITON_K, allow_tf32, warn_if_slow
from gcl_ops.tiling import INTERPRETING

Impl = Literal["auto", "triton", "torch"]


class _GCLStatsFunction(torch.autograd.Function):
    """``(neg_row, neg_col, pos)`` of ``Z = t * Q^ D^T``; saves only O(N) statistics."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, query, doc, scale, query_ids, doc_ids, offset, normalize, backend):
        # Under autocast the Triton path's fp32 GEMMs use TF32 (ops._allow_tf32); the custom
        # ops run with autocast off, so its state is read here and handed to both passes.
        autocast = torch.is_autocast_enabled(query.device.type)
        neg_row, neg_col, pos, row_parts, col_parts = torch.ops.gcl_ops.gcl_stats(
            query, doc, scale, query_ids, doc_ids, offset, normalize, backend, autocast
        )
        ctx.save_for_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col, row_parts, col_parts
        )
        ctx.offset, ctx.normalize, ctx.backend, ctx.autocast = offset, normalize, backend, autocast
        return neg_row, neg_col, pos

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_neg_row, grad_neg_col, grad_pos):
        query, doc, scale, query_ids, doc_ids, neg_row, neg_col, row_parts, col_parts = (
            ctx.saved_tensors
        )
        # A frozen side (say, a fixed document tower) gets no gradient pass at all.
        needs_query, needs_doc, needs_scale = ctx.needs_input_grad[:3]
        grad_query, grad_doc, grad_scale = torch.ops.gcl_ops.gcl_stats_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col,
            grad_neg_row, grad_neg_col, grad_pos, ctx.offset, ctx.normalize, ctx.backend,
            needs_query, needs_doc, needs_scale, row_parts, col_parts, ctx.autocast,
        )  # fmt: skip
        return (
            grad_query if needs_query else None,
            grad_doc if needs_doc else None,
            grad_scale if needs_scale else None,
            None, None, None, None, None,
        )  # fmt: skip


class _LogitsStatsFunction(torch.autograd.Function):
    """``(neg_row, neg_col, pos)`` of a materialised square logits matrix (Triton path)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, logits, query_ids, doc_ids):
        neg_row, neg_col, pos = torch.ops.gcl_ops.logits_stats(logits, query_ids, doc_ids)
        ctx.save_for_backward(logits, query_ids, doc_ids, neg_row, neg_col)
        return neg_row, neg_col, pos

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_neg_row, grad_neg_col, grad_pos):
        logits, query_ids, doc_ids, neg_row, neg_col = ctx.saved_tensors
        grad = torch.ops.gcl_ops.logits_stats_backward(
            logits, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col, grad_pos
        )
        return grad, None, None


# ==============================================================================================
# Statistics layer
# ==============================================================================================


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (statistics and losses are never half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scale_tensor(
    logit_scale: float | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``logit_scale`` as a 0-dim tensor, keeping its autograd graph."""
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(float(logit_scale), dtype=dtype, device=device)


def resolve_backend(impl: str, x: torch.Tensor, *others: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` and the ``(N, k)`` input ``x`` (with ``others``,
    the inputs it is computed with, whose dtype joins ``x``'s by type promotion); raises with the
    reason when ``impl="triton"`` cannot run. ``"auto"`` takes Triton for CUDA tensors except
    fp32 with IEEE GEMMs (``torch.backends.cuda.matmul.fp32_precision``): the kernels would run
    those on the FMA units, the PyTorch path runs them on cuBLAS."""
    _checks.check_choice(impl, _checks.IMPLS, "impl")
    if impl == "torch":
        return "torch"
    dtype = x.dtype
    for other in others:
        dtype = torch.promote_types(dtype, other.dtype)
    problem = None
    if not HAS_TRITON:
        problem = "triton is not installed"
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problem = f"the Triton kernels take fp32, fp16 or bf16, not {dtype}"
    elif x.shape[-1] > MAX_TRITON_K:
        problem = f"the Triton kernels take k <= {MAX_TRITON_K}, got k = {x.shape[-1]}"
    elif x.device.type == "cpu" and not INTERPRETING:
        problem = (
            "CPU tensors run the Triton kernels only under the interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    elif x.device.type not in ("cpu", "cuda"):
        problem = f"no Triton kernels for device {x.device.type}"
    if impl == "triton" and problem is not None:
        raise ValueError(f"impl='triton' cannot run here: {problem}")
    if impl == "auto" and (problem is not None or x.device.type != "cuda"):
        return "torch"
    if x.device.type == "cuda" and dtype == torch.float32:
        tf32 = allow_tf32(torch.is_autocast_enabled(x.device.type))
        if impl == "auto" and not tf32:
            return "torch"
        warn_if_slow(x, tf32)
    return "triton"


def gcl_stats(
    query: torch.Tensor,
    doc: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics of ``Z = t * Q^ @ D^.T`` that the loss needs, without materialising ``Z``.

    No input checks (``gcl_loss`` makes them); this is the layer the loss, the distributed loss
    and the tests build on.

    Args:
        query: ``(N, k)`` row embeddings.
        doc: ``(M, k)`` column embeddings, ``M >= offset + N``.
        logit_scale: ``t``, a float or a 0-dim tensor (differentiable).
        query_ids, doc_ids: ``(M,)`` integer ids of the columns, or None; row ``i`` has the ids
            of column ``offset + i``, and an entry whose query or document id matches is not a
            negative.
        offset: the column of row 0's positive.
        normalize: L2-normalise rows and columns on the fly.
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``neg_row (N,)``, ``neg_col (M,)``: log-sum-exp over each row's and column's negatives
        (``-inf`` if none); ``pos (N,) = Z[i, offset + i]``. All differentiable; fp32 (fp64 for
        fp64 inputs on the PyTorch path).

    Equivalent PyTorch: ``gcl_ops.reference.naive_gcl_stats(query, doc, t, ...)``.
    """
    backend = resolve_backend(impl, query, doc)
    query, doc, dtype = _prepare_embeddings(query, doc, backend)
    scale = _scale_tensor(logit_scale, dtype, query.device)
    return _GCLStatsFunction.apply(
        query, doc, scale, query_ids, doc_ids, offset, normalize, backend
    )


def per_pair_loss(
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    positive_logits: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of each pair, all ``(N,)``:
    ``w_i / 2 * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))``
    (``= -w_i / 2 * (log P_row[i, i] + log P_col[i, i])``)."""
    loss = 0.5 * (_softplus(neg_row - positive_logits) + _softplus(neg_col - positive_logits))
    return loss if weights is None else weights.to(loss.dtype) * loss


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` to full precision everywhere (``F.softplus`` returns ``x`` above 20,
    off by ``exp(-20) = 2e-9``)."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _prepare_embeddings(
    query: torch.Tensor, doc: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Both inputs in one dtype the backend takes, and the dtype of the statistics."""
    if backend == "torch":
        dtype = _compute_dtype(query, doc)
        return query.to(dtype), doc.to(dtype), dtype
    common = torch.promote_types(query.dtype, doc.dtype)
    return query.to(common), doc.to(common), torch.float32


def _check_loss_inputs(
    query, doc, weights, logit_scale, query_ids, doc_ids, reduction, normalize, validate,
    negatives=None, negative_ids=None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Every check of the loss's inputs; returns the negatives as ``(H, k)`` and their ids as
    ``(H,)`` (or None)."""
    _checks.check_embeddings(query, "query")
    n, k = query.shape
    _checks.check_embeddings(doc, "doc", rows=n, width=k)
    _checks.check_weights(weights, n, validate=False)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_logit_scale(logit_scale, validate=False)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    _checks.check_same_device(
        query=query, doc=doc, weights=weights, query_ids=query_ids, doc_ids=doc_ids,
        logit_scale=logit_scale if isinstance(logit_scale, torch.Tensor) else None,
    )  # fmt: skip
    negatives, negative_ids = _checks.check_negatives(negatives, negative_ids, doc, doc_ids)
    if _checks.should_validate(validate):  # one device synchronisation for all of them
        named = [("query", query, normalize), ("doc", doc, normalize)]
        if negatives is not None:
            named.append(("negatives", negatives, normalize))
        _checks.check_all_values(named, weights, logit_scale)
    return negatives, negative_ids
