"""Plain-PyTorch definitions of the GCL loss: the test oracle, the CPU path, the benchmark baseline.

Notation (``docs/CONTRACT.md``): rows are queries ``Q (N, k)``, columns documents ``D (M, k)``,
``Z = t * normalize(Q) @ normalize(D).T``; row ``i``'s positive is column ``offset + i`` (the
square problem has ``M = N`` and ``offset = 0``). With ids, an off-diagonal pair ``(i, j)`` whose
query id or document id matches is *excluded*: it leaves both softmax denominators, because it is
another positive, not a negative.

Two things live here:

* the **naive oracle** (``naive_*``): materialises ``Z`` and follows the definition literally,
  ``L = -(1/2N) sum_i w_i (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])``;
* the **memory-efficient CPU path** (``blockwise_stats_forward`` / ``_backward``): the
  *statistics* of ``Z`` that the loss needs, computed one block of rows at a time and recomputed
  in backward, never holding more than ``block_rows x M`` entries of ``Z``.

The statistics are the positive logits ``pos_i = Z_{i, offset+i}`` and the log-sum-exp over each
row's and each column's *negatives* (every entry but the positive and the excluded duplicates),
``neg_row_i = logsumexp_{j neg} Z_ij`` and ``neg_col_j = logsumexp_{i neg} Z_ij``. The loss is O(N)
arithmetic on them (``gcl_ops.contrastive``)::

    -log P_row[i, i] = log(1 + exp(neg_row_i - pos_i)) = softplus(neg_row_i - pos_i)

which stays exact to relative precision when the pair is confidently right (a loss of 1e-20 is
1e-20, where ``row_lse_i - pos_i`` would round to 0 or to noise of size eps * t). Backward then
needs ``dZ_ij = g_row_i exp(Z_ij - neg_row_i) + g_col_j exp(Z_ij - neg_col_j)`` on the negatives
and ``dZ = g_pos_i`` on the positives, then ``dQ^ = t dZ D^``, ``dD^ = t dZ^T Q^``,
``dt = sum(dZ * S)`` (``S = Q^ D^T``, ``Z = t S``) and, through the normalisation
``q^ = q / |q|``, ``dq = (dq^ - q^ <q^, dq^>) / |q|``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]

#: Elements of one block of the similarity matrix the blocked CPU path holds at a time (1 MiB in
#: fp32); a block is ``block_rows x M`` with ``block_rows = max(1, BLOCK_ELEMENTS // M)``.
BLOCK_ELEMENTS = 1 << 18
#: The same on a GPU (256 MiB in fp32), where the PyTorch path runs for fp64 or very wide ``k``:
#: fewer, larger blocks keep the Python loop short.
CUDA_BLOCK_ELEMENTS = 1 << 26


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
    same = torch.zeros(len(row_index), num_cols, dtype=torch.bool, device=row_index.device)
    for ids in (query_ids, doc_ids):
        if ids is not None:
            same |= ids[offset + row_index][:, None] == ids[None, :]
    return same & (col_index[None, :] != (offset + row_index)[:, None])


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)


def reduce_loss(per_pair: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """``"mean"`` (the paper's 1/2N), ``"sum"`` or ``"none"`` over the ``(N,)`` per-pair losses."""
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


# --------------------------------------------------------------------------------------------
# The naive oracle: the definition, with the N x N matrix materialised.
# --------------------------------------------------------------------------------------------


def naive_gcl_loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The GCL loss (paper Eq. 4) from a materialised ``(N, N)`` similarity matrix.

    ``logits[i, j]`` scores query ``i`` against document ``j``; pair ``i`` is ``(i, i)``.
    Returns a scalar, or ``(N,)`` per-pair losses ``-w_i / 2 * (log P_row[i, i] + log P_col[i, i])``
    for ``reduction="none"``. No input checks: this is the oracle, not the API.
    """
    n = logits.shape[0]
    z = logits
    excluded = excluded_pairs(query_ids, doc_ids, slice(0, n), 0, n)
    if excluded is not None:
        z = z.masked_fill(excluded, float("-inf"))
    log_p_row = torch.log_softmax(z, dim=1).diagonal()
    log_p_col = torch.log_softmax(z, dim=0).diagonal()
    w = torch.ones_like(log_p_row) if weights is None else weights.to(log_p_row.dtype)
    return reduce_loss(-0.5 * w * (log_p_row + log_p_col), reduction)


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
) -> torch.Tensor:
    """The GCL loss with ``Z = logit_scale * normalize(query) @ normalize(doc).T`` materialised.

    Shapes: ``query``, ``doc`` ``(N, k)``; ``weights`` ``(N,)``. Computes everything in the
    inputs' dtype, as a plain PyTorch user would: the naive baseline, with several ``N x N``
    temporaries, and the "same low precision" yardstick of the tests.
    """
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


# --------------------------------------------------------------------------------------------
# The memory-efficient CPU path: blocked statistics with recomputation in backward.
# --------------------------------------------------------------------------------------------


def _block_rows(num_cols: int, block_elements: int) -> int:
    return max(1, block_elements // max(num_cols, 1))


def inverse_norms(
    x: torch.Tensor, normalize: bool, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """``1 / |x_i|`` per row ``(N,)`` (computed in ``dtype``), or None when not normalising."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=dtype).reciprocal() if normalize else None


def _block_cosines(
    query: torch.Tensor,
    doc: torch.Tensor,
    inv_query: torch.Tensor | None,
    inv_doc: torch.Tensor | None,
    rows: slice,
) -> torch.Tensor:
    """``S[rows] = Q^[rows] @ D^.T``, normalising on the fly: ``(q_i . d_j) / (|q_i| |d_j|)``."""
    cosines = query[rows] @ doc.T
    if inv_query is not None:
        cosines *= inv_query[rows, None]
        cosines *= inv_doc[None, :]
    return cosines


def _block_logits(
    cosines: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    rows: slice,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Z = scale * S`` for a block of rows with every non-negative entry (the positive and the
    excluded duplicates) set to -inf, and the duplicate mask."""
    logits = cosines * scale
    logits.diagonal(offset + rows.start).fill_(float("-inf"))
    excluded = excluded_pairs(query_ids, doc_ids, rows, offset, cosines.shape[1])
    if excluded is not None:
        logits.masked_fill_(excluded, float("-inf"))
    return logits, excluded


def blockwise_stats_forward(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row (N,), neg_col (M,), pos (N,))`` of ``Z = scale * Q^ @ D^.T``, one block of rows
    at a time; see ``blockwise_stats_backward`` for the gradient.

    Args:
        query: ``(N, k)`` row embeddings (queries), fp32 or fp64.
        doc: ``(M, k)`` column embeddings (documents), same dtype, ``M >= offset + N``.
        scale: 0-dim tensor, the logit scale ``t``.
        query_ids, doc_ids: ``(M,)`` integer ids of the columns, or None (``excluded_pairs``);
            row ``i`` has the ids of column ``offset + i``.
        offset: the column of row 0's positive (``0`` for the square problem).
        normalize: L2-normalise rows and columns on the fly (``Q^ = Q / |Q|``); else ``Q^ = Q``.
        block_elements: at most this many entries of ``Z`` (a block of rows) exist at a time.

    Returns:
        ``neg_row`` and ``neg_col``, the log-sum-exp of ``Z`` over each row's and column's
        negatives (``-inf`` where there is none), and ``pos = Z[i, offset + i]``. Extra memory:
        a few blocks and O(N + M) statistics.

    Equivalent PyTorch: ``naive_gcl_stats(query, doc, scale, ...)``.
    """
    n, m = query.shape[0], doc.shape[0]
    inv_query, inv_doc = inverse_norms(query, normalize), inverse_norms(doc, normalize)
    step = _block_rows(m, block_elements)
    neg_row = query.new_empty(n)
    neg_col = query.new_full((m,), float("-inf"))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        cosines = _block_cosines(query, doc, inv_query, inv_doc, rows)
        logits, _ = _block_logits(cosines, scale, query_ids, doc_ids, rows, offset)
        neg_row[rows] = torch.logsumexp(logits, dim=1)
        # Running column statistics: lse(a ∪ b) = logaddexp(lse(a), lse(b)).
        neg_col = torch.logaddexp(neg_col, torch.logsumexp(logits, dim=0))
    pos = torch.linalg.vecdot(query, doc[offset : offset + n]) * scale
    if normalize:
        pos *= inv_query * inv_doc[offset : offset + n]
    return neg_row, neg_col, pos


def blockwise_stats_backward(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    grad_neg_row: torch.Tensor,
    grad_neg_col: torch.Tensor,
    grad_pos: torch.Tensor,
    offset: int = 0,
    normalize: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d query, d doc, d scale)`` of ``blockwise_stats_forward``, recomputing each
    block of ``Z`` from the saved statistics; the arguments are the forward's plus its outputs
    and their gradients (all ``(N,)`` or ``(M,)``)."""
    n = query.shape[0]
    inv_query, inv_doc = inverse_norms(query, normalize), inverse_norms(doc, normalize)
    step = _block_rows(doc.shape[0], block_elements)
    grad_query = torch.empty_like(query)
    grad_doc = torch.zeros_like(doc)  # dL/dD^ until the projection at the end
    grad_scale = torch.zeros((), dtype=query.dtype, device=query.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        cosines = _block_cosines(query, doc, inv_query, inv_doc, rows)
        logits, excluded = _block_logits(cosines, scale, query_ids, doc_ids, rows, offset)
        # Negatives: dZ_ij = g_row_i exp(Z_ij - neg_row_i) + g_col_j exp(Z_ij - neg_col_j).
        grad_logits = torch.sub(logits, neg_row[rows, None]).exp_().mul_(grad_neg_row[rows, None])
        grad_logits += torch.sub(logits, neg_col[None, :]).exp_().mul_(grad_neg_col[None, :])
        # exp(-inf - lse) is 0 unless lse is -inf too (a row or column with no negative).
        if excluded is not None:
            grad_logits.masked_fill_(excluded, 0.0)
        # Positives: dZ_{i, offset+i} = g_pos_i.
        grad_logits.diagonal(offset + start).copy_(grad_pos[rows])
        # Z = scale * S: d scale = sum(dZ * S) and dS = scale * dZ.
        grad_scale += torch.dot(grad_logits.reshape(-1), cosines.reshape(-1))
        grad_cosines = grad_logits.mul_(scale)
        if inv_query is None:
            grad_query[rows] = grad_cosines @ doc
            grad_doc.addmm_(grad_cosines.T, query[rows])
            continue
        # S = diag(1/|q|) Q D^T diag(1/|d|): dQ^ = dS D^, dD^ += dS^T Q^.
        grad_query_hat = (grad_cosines * inv_doc[None, :]) @ doc
        grad_doc.addmm_(grad_cosines.T, query[rows] * inv_query[rows, None])
        grad_query[rows] = _through_normalisation(grad_query_hat, query[rows], inv_query[rows])
    if inv_doc is not None:
        _through_normalisation(grad_doc, doc, inv_doc, out=grad_doc)
    return grad_query, grad_doc, grad_scale


def _through_normalisation(
    grad_hat: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Chain rule through ``x^ = x / |x|`` row-wise: ``dx = (dx^ - x^ <x^, dx^>) / |x|``.

    Written as ``(dx^ - x * (<x, dx^> / |x|^2)) / |x|`` so that no copy of ``x^`` is made;
    ``out`` may be ``grad_hat`` itself (in place).
    """
    radial = torch.linalg.vecdot(x, grad_hat) * inv_norm.square()
    out = grad_hat.clone() if out is None else out
    out.addcmul_(x, radial[:, None], value=-1.0)
    return out.mul_(inv_norm[:, None])
