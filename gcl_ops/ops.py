"""The custom ops ``gcl_ops::*`` of the loss's statistics: each dispatches to the Triton
launchers (``gcl_ops.launchers``) or to the blocked PyTorch path (``gcl_ops.blockwise``). They are
opaque to ``torch.compile`` (no graph break); importing this module registers them.
"""

from typing import Optional

import torch

from gcl_ops import blockwise, launchers
from gcl_ops.launchers import on_device


def _block_elements(x: torch.Tensor) -> int:
    """Block size of the PyTorch path for ``x``'s device (read at call time: tests shrink it)."""
    return blockwise.CUDA_BLOCK_ELEMENTS if x.is_cuda else blockwise.BLOCK_ELEMENTS


@torch.library.custom_op("gcl_ops::gcl_stats", mutates_args=())
def _gcl_stats_op(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045 (custom_op parses typing.Optional)
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
    offset: int,
    normalize: bool,
    backend: str,
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos, row_parts, col_parts)``: the last two only for the backward:
    the Triton path's ``lse / t`` of the rows with the positive cosines ``(2, N)`` and of the
    columns ``(M,)``, in fp32; the PyTorch path's log-sum-exps in float64, ``(N,)`` and
    ``(M,)`` (near |Z| = 64 an fp32 one is rounded by up to 4e-6).
    ``autocast``: the caller ran under autocast (the Triton path's fp32 GEMMs then use TF32)."""
    # Autocast stays outside: the statistics are computed in fp32 from the inputs as they are.
    with torch.autocast(query.device.type, enabled=False), on_device(query):
        if backend == "triton":
            return launchers.stats_forward(
                query, doc, scale, query_ids, doc_ids, offset, normalize, autocast
            )[:5]
        return blockwise.blockwise_stats_forward(
            query, doc, scale, query_ids, doc_ids, offset, normalize, _block_elements(query)
        )


@_gcl_stats_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, offset, normalize, backend, autocast=False):
    dtype = torch.float32 if backend == "triton" else query.dtype
    n, m = query.shape[0], doc.shape[0]
    triton_path = backend == "triton"
    parts_dtype = torch.float32 if triton_path else torch.float64
    return (
        query.new_empty(n, dtype=dtype),
        query.new_empty(m, dtype=dtype),
        query.new_empty(n, dtype=dtype),
        query.new_empty((2, n) if triton_path else (n,), dtype=parts_dtype),
        query.new_empty((m,), dtype=parts_dtype),
    )


@torch.library.custom_op("gcl_ops::gcl_stats_backward", mutates_args=())
def _gcl_stats_backward_op(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    grad_neg_row: torch.Tensor,
    grad_neg_col: torch.Tensor,
    grad_pos: torch.Tensor,
    offset: int,
    normalize: bool,
    backend: str,
    needs_query_grad: bool = True,
    needs_doc_grad: bool = True,
    needs_scale_grad: bool = True,
    row_parts: Optional[torch.Tensor] = None,  # noqa: UP045
    col_parts: Optional[torch.Tensor] = None,  # noqa: UP045
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)``; a gradient not needed comes back empty (``(0,)``) and is
    not computed (the Triton path skips its pass, the PyTorch path its GEMM).
    ``row_parts``, ``col_parts``: the forward's precise log-sum-exps (``gcl_stats``);
    ``autocast``: the forward's, for the Triton path."""
    args = (query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
            grad_pos, offset, normalize)  # fmt: skip
    needs_grad = (needs_query_grad, needs_doc_grad, needs_scale_grad)
    with torch.autocast(query.device.type, enabled=False), on_device(query):
        if backend == "triton":
            grad_query, grad_doc, grad_scale = launchers.stats_backward(
                *args, needs_grad, row_parts, col_parts, autocast
            )
        else:
            grad_query, grad_doc, grad_scale = blockwise.blockwise_stats_backward(
                *args, _block_elements(query), need_query=needs_query_grad,
                need_doc=needs_doc_grad, need_scale=needs_scale_grad, lse_row=row_parts,
                lse_col=col_parts,
            )  # fmt: skip
    if not needs_query_grad:
        grad_query = query.new_empty(0)
    if not needs_doc_grad:
        grad_doc = doc.new_empty(0)
    return grad_query, grad_doc, grad_scale.to(scale.dtype)


@_gcl_stats_backward_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
      grad_pos, offset, normalize, backend, needs_query_grad=True, needs_doc_grad=True,
      needs_scale_grad=True, row_parts=None, col_parts=None, autocast=False):  # fmt: skip
    return (
        torch.empty_like(query) if needs_query_grad else query.new_empty(0),
        torch.empty_like(doc) if needs_doc_grad else doc.new_empty(0),
        torch.empty_like(scale),
    )


@torch.library.custom_op("gcl_ops::logits_stats", mutates_args=())
def _logits_stats_op(
    logits: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(logits.device.type, enabled=False), on_device(logits):
        return launchers.logits_forward(logits, query_ids, doc_ids)


@_logits_stats_op.register_fake
def _(logits, query_ids, doc_ids):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("gcl_ops::logits_stats_backward", mutates_args=())
def _logits_stats_backward_op(
    logits: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    grad_neg_row: torch.Tensor,
    grad_neg_col: torch.Tensor,
    grad_pos: torch.Tensor,
) -> torch.Tensor:
    with torch.autocast(logits.device.type, enabled=False), on_device(logits):
        return launchers.logits_backward(
            logits, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col, grad_pos
        )


@_logits_stats_backward_op.register_fake
def _(logits, *args):
    return torch.empty_like(logits)
