"""The GCL loss over a batch split across ranks (torch.distributed: torchrun, DDP, NCCL or gloo).

Each of ``W`` ranks holds ``N_local`` pairs (the same number on every rank) of a global batch of
``N = W * N_local``; rank ``r`` holds global rows ``r * N_local ... (r + 1) * N_local - 1``. The
loss is the single-process loss of the global batch:

* the documents are all-gathered *with gradient* (``torch.distributed.nn.functional.all_gather``,
  whose backward sums every rank's contribution into the owner's gradient), the ids without;
* hard negatives, if any, are all-gathered with gradient too and appended to the columns;
* each rank computes its local query rows against all ``N`` documents with the rectangular fused
  kernel (``offset = r * N_local``): the row statistics of its queries are exact, and each
  document column gets a *partial* log-sum-exp over this rank's rows;
* the partial column statistics are all-gathered (with gradient) and merged,
  ``neg_col_j = logsumexp_r partial_r,j``, so the column statistics are exact too.

Per rank this costs one forward and two backward passes over ``N_local x N`` tiles, and moves
the documents (``N x k``) and ``N`` statistics.

Scale. DDP *averages* gradients over ranks. So that this average is the gradient of the
single-process loss, each rank returns its share of the global reduction times ``W``: for
``"mean"`` that is the mean over the local pairs, for ``"sum"`` ``W`` times the local sum, for
``"weighted_mean"`` ``W`` times the local weighted sum over the global weight sum. The
mean of the returned values over ranks is the single-process loss, and the gradients a rank
computes for its own embeddings (and ``logit_scale``) are ``W`` times the single-process ones
until DDP divides by ``W``. Without DDP (a hand-written all-reduce of gradients), divide by ``W``
yourself or all-reduce with ``ReduceOp.AVG``. ``"none"`` returns the local per-pair losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gcl_ops import _checks
from gcl_ops.autograd import Impl, _check_loss_inputs, gcl_stats, per_pair_loss
from gcl_ops.reference import Reduction, append_negatives, reduce_loss, total_weight


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: each rank's slice of the gradient summed over
    ranks (a reduce-scatter on NCCL, an all-reduce elsewhere: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        size, index = world_size(ctx.group), rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size)[index], None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 (rank order), differentiable: the gradient of
    the result flows back to every rank's ``x``, summed over ranks. Every rank's ``x`` must have
    the same shape.

    Equivalent PyTorch: ``torch.cat(torch.distributed.nn.functional.all_gather(x, group))``.
    """
    if world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, without gradient (ids, weights)."""
    if world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _MergeLSE(torch.autograd.Function):
    """``logsumexp`` over dim 0 whose gradient is 0 (not NaN) where everything is -inf."""

    @staticmethod
    def forward(ctx, partials: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        merged = torch.logsumexp(partials, dim=0)
        ctx.save_for_backward(partials, merged)
        return merged

    @staticmethod
    def backward(ctx, grad_merged: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        partials, merged = ctx.saved_tensors
        weights = torch.exp(partials - merged)
        weights = torch.where(torch.isneginf(partials), torch.zeros_like(weights), weights)
        return grad_merged * weights


def check_equal_sizes(pairs: int, negatives: int, device: torch.device, group) -> None:
    """Raise ``ValueError`` unless every rank holds ``pairs`` pairs and ``negatives`` hard
    negatives (0 for none); one all-gather, a no-op on one process."""
    if world_size(group) == 1:
        return
    sizes = gather_no_grad(torch.tensor([[pairs, negatives]], device=device), group)
    for column, what in enumerate(("pairs", "hard negatives")):
        counts = sizes[:, column]
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every rank must hold the same number of {what}, got {counts.tolist()} across "
                "ranks"
            )


def distributed_gcl_loss(
    query: torch.Tensor,
    doc: torch.Tensor,
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    normalize: bool = True,
    impl: Impl = "auto",
    validate: bool = True,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The GCL loss of the global batch, called on every rank with that rank's pairs.

    Args:
        query, doc: ``(N_local, k)`` this rank's pairs (the same ``N_local`` on every rank).
        weights: ``(N_local,)`` this rank's pair weights, or None.
        logit_scale: ``t``, the same on every rank (a replicated parameter).
        query_ids, doc_ids: ``(N_local,)`` this rank's ids; duplicates are masked across the
            whole global batch.
        reduction, normalize, impl, validate: as in ``gcl_loss``.
        negatives, negative_ids: this rank's hard negatives ``(H_local, k)`` (or
            ``(N_local, h, k)``) and their ids, as in ``gcl_loss``, the same ``H_local`` on every
            rank; every rank's are gathered with gradient and join every query's row softmax.
        group: the process group (default: the world).

    Returns:
        ``"mean"``: the mean of the local pairs' losses (computed with global statistics);
        ``"sum"``: ``W`` times their sum; ``"weighted_mean"``: ``W`` times the local pairs'
        weighted sum over the global sum of the weights; ``"none"``: the ``(N_local,)``
        per-pair losses. The
        mean over ranks equals the single-process loss, and DDP's gradient averaging then gives
        exactly the single-process gradients (module docstring). Without an initialised process
        group this is ``gcl_loss``.

    Equivalent PyTorch: ``gcl_loss`` on the concatenation of every rank's batch.
    """
    negatives, negative_ids = _check_loss_inputs(
        query, doc, weights, logit_scale, query_ids, doc_ids, reduction, normalize, validate,
        negatives, negative_ids,
    )  # fmt: skip
    n_local, size = query.shape[0], world_size(group)
    if size > 1 and _checks.should_validate(validate):
        check_equal_sizes(n_local, 0 if negatives is None else len(negatives), query.device, group)
    offset = rank(group) * n_local
    all_docs = gather_with_grad(doc, group)
    n_global = all_docs.shape[0]
    columns, column_query_ids, column_doc_ids = append_negatives(
        all_docs,
        None if negatives is None else gather_with_grad(negatives, group),
        None if query_ids is None else gather_no_grad(query_ids, group),
        None if doc_ids is None else gather_no_grad(doc_ids, group),
        None if negative_ids is None else gather_no_grad(negative_ids, group),
    )
    neg_row, partial_neg_col, positive_logits = gcl_stats(
        query, columns, logit_scale, query_ids=column_query_ids, doc_ids=column_doc_ids,
        offset=offset, normalize=normalize, impl=impl,
    )  # fmt: skip
    # Only the documents' columns have a softmax; negatives' column statistics are unused.
    partials = gather_with_grad(partial_neg_col[:n_global].unsqueeze(0), group)  # (W, N)
    neg_col = _MergeLSE.apply(partials)[offset : offset + n_local]
    per_pair = per_pair_loss(neg_row, neg_col, positive_logits, weights)
    if reduction == "none":
        return per_pair
    weight_sum = None
    if reduction == "weighted_mean":
        local_sum = total_weight(weights, per_pair)
        # Without weights the global sum is the global batch size: no collective needed.
        weight_sum = (
            local_sum * size
            if weights is None
            else gather_with_grad(local_sum.reshape(1), group).sum()
        )
    return reduce_loss(per_pair, reduction, weights, weight_sum) * (
        1 if reduction == "mean" else size
    )
