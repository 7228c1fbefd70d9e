"""The naive definitions of the GCL loss: ``Z`` materialised, the definition followed literally.

Notation (``docs/CONTRACT.md``): rows are queries ``Q (N, k)``, columns documents ``D (M, k)``,
``Z = t * normalize(Q) @ normalize(D).T``; row ``i``'s positive is column ``offset + i`` (the
square problem has ``M = N`` and ``offset = 0``). With ids, an off-diagonal pair ``(i, j)`` whose
query id or document id matches is *excluded*: it leaves both softmax denominators, because it is
another positive, not a negative::

    L = -(1/2N) sum_i w_i (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])

These are the naive baseline of the benchmarks and the "same low precision" yardstick of the
tests; the fused paths (``gcl_ops.blockwise`` on the CPU, the Triton kernels on the GPU) compute
the same statistics without the ``N x N`` matrix. The tests' ground truth is one step further
away: ``tests/definition.py``, float64, sharing no helper with the package.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "weighted_mean", "none"]


def excluded_pairs(
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    rows: slice,
    offset: int,
    num_cols: int,
) -> torch.Tensor | None:
    """Which entries of rows ``rows`` of the ``(N, M)`` similarity matrix leave the softmaxes.

    Args:
        query_ids, doc_ids: ``(M,)`` ids of the column pairs, or None; row ``i``'s ids are those of
            column ``offset + i``.
        rows: the block of rows (indices into ``[0, N)``).
        offset: the column of row 0's positive.
        num_cols: ``M``.

    Returns:
        ``(len(rows), M)`` bool, True where ``j != offset + i`` and the query ids or the document
        ids of row ``i`` and column ``j`` are equal; None when both id tensors are None.

    Equivalent PyTorch (square case): ``(q[:, None] == q) | (d[:, None] == d)`` with the diagonal
    cleared.
    """
    if query_ids is None and doc_ids is None:
        return None
    row_index = torch.arange(rows.start, rows.stop, device=_device_of(query_ids, doc_ids))
    col_index = torch.arange(num_cols, device=row_index.device)
    same = same_ids(query_ids, doc_ids, row_index, col_index, offset)
    return same & (col_index[None, :] != (offset + row_index)[:, None])


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)


def reduce_loss(
    per_pair: torch.Tensor,
    reduction: Reduction,
    weights: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``"mean"`` (the paper's 1/2N), ``"sum"``, ``"weighted_mean"`` or ``"none"`` over the
    ``(N,)`` per-pair losses (already weighted). ``"weighted_mean"`` divides the sum by
    ``weight_sum`` (default ``weights.sum()``; the batch size without weights), and gives 0 when
    every weight is 0."""
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "weighted_mean":
        if weight_sum is None:
            weight_sum = total_weight(weights, per_pair)
        weight_sum = weight_sum.to(per_pair.dtype)
        # A zero sum means every term is 0: the loss is 0, and so is every gradient (the inner
        # where keeps 0/0 out of the backward).
        positive = weight_sum > 0
        safe = torch.where(positive, weight_sum, torch.ones_like(weight_sum))
        return torch.where(positive, per_pair.sum() / safe, torch.zeros_like(safe))
    return per_pair


def total_weight(weights: torch.Tensor | None, per_pair: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i`` in ``per_pair``'s dtype and device (``N`` without weights)."""
    if weights is None:
        return torch.tensor(float(per_pair.numel()), dtype=per_pair.dtype, device=per_pair.device)
    return weights.to(per_pair.dtype).sum()


def append_negatives(
    doc: torch.Tensor,
    negatives: torch.Tensor | None,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The columns of a batch with hard negatives (``docs/CONTRACT.md`` section 1.1).

    Args:
        doc: ``(N, k)`` the pairs' documents (column ``i`` is row ``i``'s positive).
        negatives: ``(H, k)`` or None (then everything is returned as it is).
        query_ids, doc_ids: ``(N,)`` the pairs' ids, or None.
        negative_ids: ``(H,)`` document ids of the negatives (``doc_ids`` must be given), or None.

    Returns:
        ``columns (N + H, k)`` = ``[doc; negatives]`` and their ``(N + H,)`` query and document
        ids: a negative's query id is one no pair has (it has no query), and without
        ``negative_ids`` its document id is one no pair has either. ``None`` stays None.

    Equivalent PyTorch: ``torch.cat([doc, negatives])``, ``torch.cat([query_ids, absent])``,
    ``torch.cat([doc_ids, negative_ids])``.
    """
    if negatives is None:
        return doc, query_ids, doc_ids
    columns = torch.cat([doc, negatives])
    return (columns, *column_ids(query_ids, doc_ids, negative_ids, negatives.shape[0]))


def column_ids(
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    count: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``(N + count,)`` query and document ids of the columns ``[documents; negatives]``
    (``append_negatives``): a negative's query id is one no pair has, and so is its document id
    without ``negative_ids``. ``None`` stays None."""
    if query_ids is not None:
        query_ids = torch.cat([query_ids.long(), _absent_id(query_ids).expand(count)])
    if doc_ids is not None:
        extra = _absent_id(doc_ids).expand(count) if negative_ids is None else negative_ids.long()
        doc_ids = torch.cat([doc_ids.long(), extra])
    return query_ids, doc_ids


def _absent_id(ids: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 id that is not in ``ids``, computed on the device without a sync: one below
    the smallest, else one above the largest, else (both ends of int64 taken) one above the
    start of the first gap between the sorted ids."""
    limits = torch.iinfo(torch.int64)
    ordered = ids.long().reshape(-1).sort().values
    smallest, largest = ordered[0], ordered[-1]
    if ordered.numel() > 1:
        starts = ordered[:-1]  # never int64's maximum, so + 1 cannot wrap
        gap_start = starts[(ordered[1:] > starts + 1).to(torch.uint8).argmax()] + 1
    else:
        gap_start = smallest + 1
    inner = torch.where(largest < limits.max, largest + 1, gap_start)
    return torch.where(smallest > limits.min, smallest - 1, inner)


def same_ids(
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_index: torch.Tensor,
    doc_index: torch.Tensor,
    offset: int,
) -> torch.Tensor | None:
    """``(len(query_index), len(doc_index))`` bool: True where row ``i``'s and column ``j``'s query
    ids or document ids are equal (the positive ``j = offset + i`` included), None without ids."""
    same = None
    for ids in (query_ids, doc_ids):
        if ids is not None:
            equal = ids[offset + query_index][:, None] == ids[doc_index][None, :]
            same = equal if same is None else same.logical_or_(equal)
    return same


def naive_gcl_loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The GCL loss (paper Eq. 4) from a materialised ``(N, M)`` similarity matrix.

    ``logits[i, j]`` scores query ``i`` against column ``j``; pair ``i`` is ``(i, i)``; columns
    ``N ..`` are hard negatives (in the row softmax only), with ids ``(M,)`` as
    ``append_negatives`` gives them. Returns a scalar, or ``(N,)`` per-pair losses
    ``-w_i / 2 * (log P_row[i, i] + log P_col[i, i])`` for ``reduction="none"``. No input checks:
    this is the oracle, not the API.
    """
    n, m = logits.shape
    z = logits
    excluded = excluded_pairs(query_ids, doc_ids, slice(0, n), 0, m)
    if excluded is not None:
        z = z.masked_fill(excluded, float("-inf"))
    log_p_row = torch.log_softmax(z, dim=1).diagonal()
    log_p_col = torch.log_softmax(z[:, :n], dim=0).diagonal()
    w = torch.ones_like(log_p_row) if weights is None else weights.to(log_p_row.dtype)
    return reduce_loss(-0.5 * w * (log_p_row + log_p_col), reduction, weights)


def naive_gcl_loss(
    query: torch.Tensor,
    doc: torch.Tensor,
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    normalize: bool = True,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GCL loss with ``Z = logit_scale * normalize(query) @ normalize(doc).T`` materialised.

    Shapes: ``query``, ``doc`` ``(N, k)``; ``weights`` ``(N,)``; ``negatives`` ``(H, k)`` with
    ``negative_ids`` ``(H,)``. Computes everything in the inputs' dtype, as a plain PyTorch user
    would: the naive baseline, with several ``N x N`` temporaries, and the "same low precision"
    yardstick of the tests.
    """
    doc, query_ids, doc_ids = append_negatives(doc, negatives, query_ids, doc_ids, negative_ids)
    if normalize:
        query, doc = F.normalize(query, dim=-1), F.normalize(doc, dim=-1)
    logits = (logit_scale * query) @ doc.T
    return naive_gcl_loss_from_logits(
        logits, weights, query_ids=query_ids, doc_ids=doc_ids, reduction=reduction
    )


def naive_masked_lse(
    logits: torch.Tensor,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp over the negatives of each row and column of a materialised ``(N, M)`` matrix.

    The positives ``(i, offset + i)`` and the excluded duplicates are left out. Returns
    ``(neg_row (N,), neg_col (M,))``; a row or column with no negative gets ``-inf``.
    """
    n, m = logits.shape
    not_negative = torch.zeros(n, m, dtype=torch.bool, device=logits.device)
    not_negative.diagonal(offset).fill_(True)
    excluded = excluded_pairs(query_ids, doc_ids, slice(0, n), offset, m)
    if excluded is not None:
        not_negative |= excluded
    z = logits.masked_fill(not_negative, float("-inf"))
    return torch.logsumexp(z, dim=1), torch.logsumexp(z, dim=0)


def naive_gcl_stats(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``blockwise_stats_forward`` with ``Z`` materialised: ``(neg_row, neg_col, pos)``."""
    if normalize:
        query, doc = F.normalize(query, dim=-1), F.normalize(doc, dim=-1)
    logits = (scale * query) @ doc.T
    neg_row, neg_col = naive_masked_lse(logits, query_ids, doc_ids, offset)
    return neg_row, neg_col, logits.diagonal(offset)
