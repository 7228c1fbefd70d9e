"""The tests' ground truth: the GCL loss in float64, written from the formula.

Independent of ``gcl_ops`` by construction: this module imports nothing from the package and
shares no helper with it (``gcl_ops.reference`` is the CPU path under test, not an oracle).
Everything is computed in float64 on materialised matrices, differentiably (the tests take the
true gradients by autograd through these functions).

Notation: rows are queries ``Q (N, k)``, columns documents ``D (M, k)``, ``M >= offset + N``;
``Z = t * normalize(Q) @ normalize(D).T`` and row ``i``'s positive is column ``offset + i``.
Ids are per column, ``(M,)``; row ``i`` has the ids of column ``offset + i``. An entry ``(i, j)``
off the positive whose query id or document id equals row ``i``'s is a duplicate: it is in
neither softmax denominator. The loss (square case, ``M = N``, ``offset = 0``)::

    L = -(1 / 2N) sum_i w_i (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])

with the softmaxes taken over the entries that are not duplicates.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _as64(x: torch.Tensor | float) -> torch.Tensor:
    return x.to(F64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=F64)


def similarities(
    query: torch.Tensor, doc: torch.Tensor, scale: torch.Tensor | float, normalize: bool = True
) -> torch.Tensor:
    """``Z = t * Q^ @ D^.T`` in float64, ``Q^ = Q / |Q|`` row by row (or ``Q`` itself)."""
    q, d = query.to(F64), doc.to(F64)
    if normalize:
        q = q / q.square().sum(dim=1, keepdim=True).sqrt()
        d = d / d.square().sum(dim=1, keepdim=True).sqrt()
    return _as64(scale) * (q @ d.T)


def duplicates(
    n: int,
    m: int,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``(N, M)`` bool: True at the duplicates (off the positive, a query or document id equal)."""
    dup = torch.zeros(n, m, dtype=torch.bool)
    for ids in (query_ids, doc_ids):
        if ids is None:
            continue
        ids = ids.cpu()
        for i in range(n):
            dup[i] |= ids == ids[offset + i]
    for i in range(n):
        dup[i, offset + i] = False
    return dup


def stats(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row (N,), neg_col (M,), pos (N,))``: the log-sum-exp of ``Z`` over each row's and
    each column's negatives (every entry but the positives and the duplicates; ``-inf`` where
    there is none) and the positive logits ``Z[i, offset + i]``."""
    z = similarities(query, doc, scale, normalize).cpu()
    n, m = z.shape
    negative = ~duplicates(n, m, query_ids, doc_ids, offset)
    rows = torch.arange(n)
    negative[rows, offset + rows] = False
    masked = torch.where(negative, z, torch.tensor(float("-inf"), dtype=F64))
    return torch.logsumexp(masked, dim=1), torch.logsumexp(masked, dim=0), z[rows, offset + rows]


def loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss of a square ``(N, N)`` matrix ``Z``, literally: log-softmax over each row and each
    column (duplicates set to ``-inf``), the diagonal, weighted, averaged with ``1/2N``.

    ``reduction``: ``"mean"`` (the formula), ``"sum"`` (``N`` times it), ``"weighted_mean"`` (the
    weighted sum over the sum of the weights) or ``"none"`` (the ``(N,)`` per-pair terms
    ``-w_i / 2 (log P_row[i, i] + log P_col[i, i])``).
    """
    z = logits.to(F64).cpu()
    n = z.shape[0]
    z = torch.where(duplicates(n, n, query_ids, doc_ids), float("-inf"), z)
    diagonal = torch.arange(n)
    log_p_row = torch.log_softmax(z, dim=1)[diagonal, diagonal]
    log_p_col = torch.log_softmax(z, dim=0)[diagonal, diagonal]
    w = torch.ones(n, dtype=F64) if weights is None else weights.to(F64).cpu()
    per_pair = -0.5 * w * (log_p_row + log_p_col)
    if reduction == "mean":
        return per_pair.sum() / n
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "weighted_mean":
        return per_pair.sum() / w.sum()
    if reduction == "none":
        return per_pair
    raise ValueError(f"unknown reduction {reduction!r}")


def loss(
    query: torch.Tensor,
    doc: torch.Tensor,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | float = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """The GCL loss of ``(N, k)`` queries and documents (pair ``i`` is ``(query[i], doc[i])``)."""
    return loss_from_logits(
        similarities(query, doc, scale, normalize),
        weights,
        query_ids=query_ids,
        doc_ids=doc_ids,
        reduction=reduction,
    )


def multi_field_loss(
    lhs: list[torch.Tensor],
    rhs: list[torch.Tensor],
    weights: torch.Tensor | None,
    scale: torch.Tensor | float,
    lhs_gamma: list[float],
    rhs_gamma: list[float],
    renormalize: bool,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper Eq. 5: the loss of the gamma-weighted field averages of the unit-normalised fields
    (re-normalised or not), plus the loss of every (lhs field, rhs field) pair."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.to(F64)
        return x / x.square().sum(dim=1, keepdim=True).sqrt()

    ids = dict(query_ids=query_ids, doc_ids=doc_ids)
    lhs_hat, rhs_hat = [unit(x) for x in lhs], [unit(y) for y in rhs]
    lhs_avg = sum(g * x for g, x in zip(lhs_gamma, lhs_hat))
    rhs_avg = sum(g * y for g, y in zip(rhs_gamma, rhs_hat))
    total = loss(lhs_avg, rhs_avg, weights, scale, normalize=renormalize, **ids)
    for x in lhs_hat:
        for y in rhs_hat:
            total = total + loss(x, y, weights, scale, normalize=False, **ids)
    return total


def loss_with_negatives(
    query: torch.Tensor,
    doc: torch.Tensor,
    negatives: torch.Tensor,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | float = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """The loss with hard negatives ``(H, k)``, literally: each query's row runs over the ``N``
    documents and the ``H`` negatives, each document's column over the ``N`` queries; in-batch
    duplicates as above, and negative ``j`` leaves row ``i`` when ``negative_ids[j] ==
    doc_ids[i]``. ``"weighted_mean"`` divides the weighted sum by the sum of the weights."""
    return loss_with_negatives_from_logits(
        similarities(query, doc, scale, normalize),
        similarities(query, negatives, scale, normalize),
        weights,
        query_ids=query_ids,
        doc_ids=doc_ids,
        negative_ids=negative_ids,
        reduction=reduction,
    )


def loss_with_negatives_from_logits(
    z_docs: torch.Tensor,
    z_negatives: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``loss_with_negatives`` from the ``(N, N)`` and ``(N, H)`` logits."""
    z_docs, z_negatives = z_docs.to(F64).cpu(), z_negatives.to(F64).cpu()
    n = z_docs.shape[0]
    minus_inf = torch.tensor(float("-inf"), dtype=F64)
    z_docs = torch.where(duplicates(n, n, query_ids, doc_ids), minus_inf, z_docs)
    if negative_ids is not None:
        false_negative = doc_ids.cpu()[:, None] == negative_ids.cpu()[None, :]
        z_negatives = torch.where(false_negative, minus_inf, z_negatives)
    diagonal = torch.arange(n)
    log_p_row = torch.log_softmax(torch.cat([z_docs, z_negatives], dim=1), dim=1)[
        diagonal, diagonal
    ]
    log_p_col = torch.log_softmax(z_docs, dim=0)[diagonal, diagonal]
    w = torch.ones(n, dtype=F64) if weights is None else weights.to(F64).cpu()
    per_pair = -0.5 * w * (log_p_row + log_p_col)
    reductions = {
        "mean": lambda: per_pair.sum() / n,
        "sum": lambda: per_pair.sum(),
        "weighted_mean": lambda: per_pair.sum() / w.sum(),
        "none": lambda: per_pair,
    }
    return reductions[reduction]()
