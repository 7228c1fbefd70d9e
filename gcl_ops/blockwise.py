"""The memory-efficient PyTorch path of the GCL statistics: the CPU backend, and the GPU's for
float64, IEEE fp32 and ``k > 1024``.

Notation as in ``gcl_ops.reference`` (whose ``naive_gcl_stats`` this equals). The statistics are the
positive logits ``pos_i = Z_{i, offset+i}`` and the log-sum-exp over each row's and each column's
*negatives* (every entry but the positive and the excluded duplicates),
``neg_row_i = logsumexp_{j neg} Z_ij`` and ``neg_col_j = logsumexp_{i neg} Z_ij``, computed one
tile at a time and recomputed in backward, never holding more than ``BLOCK_ELEMENTS`` entries of
``Z``. The loss is O(N) arithmetic on them (``gcl_ops.autograd.per_pair_loss``)::

    -log P_row[i, i] = log(1 + exp(neg_row_i - pos_i)) = softplus(neg_row_i - pos_i)

which stays exact to relative precision when the pair is confidently right (a loss of 1e-20 is
1e-20, where ``row_lse_i - pos_i`` would round to 0 or to noise of size eps * t). Backward then
needs ``dZ_ij = g_row_i exp(Z_ij - neg_row_i) + g_col_j exp(Z_ij - neg_col_j)`` on the negatives
and ``dZ = g_pos_i`` on the positives, then ``dQ^ = t dZ D^``, ``dD^ = t dZ^T Q^``,
``dt = sum(dZ * S) = sum(dZ D^ * Q^)`` (``S = Q^ D^T``, ``Z = t S``) and, through the
normalisation ``q^ = q / |q|``, ``dq = (dq^ - q^ <q^, dq^>) / |q|``.

The blocked path uses a *fixed shift* in place of a running maximum, as the Triton path does:
with ``bound >= |Z|`` (``|t|`` for unit vectors, else ``|t| max|q| max|d|``) and
``shift = max(0, bound - 64)``, ``E = exp(Z - shift) <= e^64``. One exponential per entry then
feeds both sums, ``neg_row_i = shift + log sum_j E_ij`` and ``neg_col_j = shift + log sum_i E_ij``,
and the tiles' partial sums simply add. A sum below ``TINY_SUM`` (all of a row's negatives far
below the shift, or none at all) may have lost precision to underflow: that row (column) is
recomputed exactly with ``logsumexp``. Backward factors the same ``E``:
``dZ_ij = E_ij (a_i + b_j)`` with ``a_i = g_row_i exp(shift - neg_row_i)`` and
``b_j = g_col_j exp(shift - neg_col_j)``, finite wherever ``neg >= shift + log(TINY_SUM)``; the
rows (columns) below that get ``a_i = 0`` (``b_j = 0``) and their term in an exact pass.
Per tile that is one GEMM and one ``exp`` forward, three GEMMs and one ``exp`` backward. With
unnormalised inputs the Cauchy-Schwarz bound can sit far above the largest ``Z``; then most
sums underflow and the exact passes do the work (correct, slower).
"""

from __future__ import annotations

import math

import torch

from gcl_ops.reference import same_ids

#: Entries of ``Z`` in one tile of the blocked path (4 MiB in fp32): tiles are about square,
#: ``rows x cols`` with ``cols = min(M, isqrt(BLOCK_ELEMENTS))`` (1024 x 1024). Forward holds one
#: tile, backward two. Large square tiles keep the three GEMMs per tile efficient; row blocks of
#: a few rows against all of ``D`` run several times slower on a CPU.
BLOCK_ELEMENTS = 1 << 20
#: The same on a GPU (256 MiB in fp32), where the PyTorch path runs for fp64 or very wide ``k``:
#: fewer, larger tiles keep the Python loop short.
CUDA_BLOCK_ELEMENTS = 1 << 26
#: Both paths (this one and the Triton kernels) sum ``exp(Z - shift)``, ``shift = max(0, bound -
#: 64)``, ``bound >= |Z|``: every term is at most e^64, so up to fp32max / e^64 = 3.4e38 / 6.2e27 = 5.5e10 (about 2^35.7)
#: of them stay finite in fp32.
SHIFT_HEADROOM = 64.0
#: A row or column sum below this (about e^-46) may have lost precision to underflow, or has no
#: negative at all: its log-sum-exp is recomputed exactly with an online maximum. On the GPU
#: ``tl.exp2`` is ``ex2.approx.ftz``: each term below the smallest normal fp32, 2^-126 = 1.2e-38,
#: may be flushed to 0, so a sum of M terms may lose up to M * 1.2e-38 (the interpreter keeps
#: denormals and does not show it). For a relative loss below 1e-6 at the largest M that the
#: shift allows (5.5e10, above), a kept sum must be at least 5.5e10 * 1.2e-38 / 1e-6 = 6.5e-22.
TINY_SUM = 1e-20


def _tile_shape(num_cols: int, block_elements: int) -> tuple[int, int]:
    """``(rows, cols)`` of a tile of ``Z``: about square, at most ``block_elements`` entries.

    Square tiles keep both dimensions of every product large (``rows x k`` by ``k x cols`` and
    back), where row blocks of a wide ``Z`` starve the GEMMs (a few rows against all of ``D``).
    """
    cols = max(1, min(num_cols, math.isqrt(block_elements)))
    return max(1, block_elements // cols), cols


def inverse_norms(
    x: torch.Tensor, normalize: bool, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """``1 / |x_i|`` per row ``(N,)`` (computed in ``dtype``), or None when not normalising."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=dtype).reciprocal() if normalize else None


def _normalised(x: torch.Tensor, inv_norm: torch.Tensor | None) -> torch.Tensor:
    """``x^ = x / |x|`` row-wise (an ``(N, k)`` copy), or ``x`` itself when not normalising."""
    return x if inv_norm is None else x * inv_norm[:, None]


def _exp_shift(scale: float, query: torch.Tensor, doc: torch.Tensor, normalize: bool) -> float:
    """``max(0, bound - SHIFT_HEADROOM)`` for a ``bound >= |Z|``: ``|t|`` for unit vectors, else
    ``|t| max_i |q_i| max_j |d_j|`` (Cauchy-Schwarz)."""
    bound = abs(scale)
    if not normalize:
        for x in (query, doc):
            bound *= torch.linalg.vector_norm(x, dim=-1).max().item() if x.shape[0] else 0.0
    return max(0.0, bound - SHIFT_HEADROOM)


def _non_negatives(
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_index: torch.Tensor,
    doc_index: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """``_same_ids`` or the positive: every entry that is not a negative."""
    positive = doc_index[None, :] == (offset + query_index)[:, None]
    same = same_ids(query_ids, doc_ids, query_index, doc_index, offset)
    return positive if same is None else same.logical_or_(positive)


class _Tiles:
    """The shared machinery of forward and backward: normalised inputs, the fixed shift and
    ``exp(Z - shift)`` one tile at a time into a reused buffer."""

    def __init__(self, query, doc, scale, query_ids, doc_ids, offset, normalize, block_elements):
        self.n, self.m = query.shape[0], doc.shape[0]
        self.inv_query = inverse_norms(query, normalize)
        self.inv_doc = inverse_norms(doc, normalize)
        self.query_hat = _normalised(query, self.inv_query)
        self.doc_hat = _normalised(doc, self.inv_doc)
        self.scale = float(scale)
        self.shift = _exp_shift(self.scale, query, doc, normalize)
        self.query_ids, self.doc_ids, self.offset = query_ids, doc_ids, offset
        self.block_elements = block_elements
        self.tile_rows, self.tile_cols = _tile_shape(self.m, block_elements)
        self.buffer = query.new_empty(min(self.n, self.tile_rows) * min(self.m, self.tile_cols))
        self.device = query.device

    def tiles(self):
        """``(rows, cols)`` slices covering ``[0, N) x [0, M)``, row blocks outermost."""
        for r in range(0, self.n, self.tile_rows):
            for c in range(0, self.m, self.tile_cols):
                yield (
                    slice(r, min(r + self.tile_rows, self.n)),
                    slice(c, min(c + self.tile_cols, self.m)),
                )

    def shifted_exp(self, rows: slice, cols: slice) -> torch.Tensor:
        """``exp(Z - shift)`` on a tile (a view of the reused buffer), excluded duplicates 0.

        ``Z - shift`` comes out of one GEMM: ``t * Q^ D^T`` (``alpha = t``) added to a buffer
        filled with ``-shift`` (``beta = 0`` when there is no shift). The positives are left in:
        ``positive_diagonal`` finds them.
        """
        tile = self.buffer[: (rows.stop - rows.start) * (cols.stop - cols.start)]
        tile = tile.view(rows.stop - rows.start, cols.stop - cols.start)
        query_hat, doc_hat = self.query_hat[rows], self.doc_hat[cols]
        if self.shift:
            tile.fill_(-self.shift).addmm_(query_hat, doc_hat.T, alpha=self.scale)
        else:
            tile.addmm_(query_hat, doc_hat.T, beta=0.0, alpha=self.scale)
        tile.exp_()
        if self.query_ids is not None or self.doc_ids is not None:
            same = same_ids(
                self.query_ids, self.doc_ids, self._arange(rows), self._arange(cols), self.offset
            )
            tile.masked_fill_(same, 0.0)
        return tile

    def positive_diagonal(self, tile: torch.Tensor, rows: slice, cols: slice):
        """``(diagonal view of tile, slice of rows it covers)``: the tile's positives
        ``(i, offset + i)``, possibly none."""
        shift = self.offset + rows.start - cols.start  # column of row 0's positive, in the tile
        diagonal = tile.diagonal(shift)
        first = rows.start + max(0, -shift)
        return diagonal, slice(first, first + diagonal.shape[0])

    def _arange(self, index: slice) -> torch.Tensor:
        return torch.arange(index.start, index.stop, device=self.device)

    def exact_logits(self, index: torch.Tensor, by_columns: bool):
        """Chunks ``(chunk, Z)`` of the rows ``index`` of ``Z`` (of ``Z^T`` when ``by_columns``)
        computed exactly, not shifted, with every non-negative entry masked to -inf; the rare
        path for statistics whose shifted sum underflowed."""
        rows, cols = (
            (self.doc_hat, self.query_hat) if by_columns else (self.query_hat, self.doc_hat)
        )
        step = max(1, self.block_elements // max(cols.shape[0], 1))
        for start in range(0, index.shape[0], step):
            chunk = index[start : start + step]
            logits = torch.mm(rows[chunk], cols.T).mul_(self.scale)
            if by_columns:
                mask = _non_negatives(
                    self.query_ids, self.doc_ids, self._arange(slice(0, self.n)), chunk, self.offset
                ).T
            else:
                mask = _non_negatives(
                    self.query_ids, self.doc_ids, chunk, self._arange(slice(0, self.m)), self.offset
                )
            yield chunk, logits.masked_fill_(mask, float("-inf"))


def _needs_exact(sums: torch.Tensor) -> torch.Tensor:
    """Indices of shifted sums that may have lost precision to underflow (or are empty, or not
    finite): their log-sum-exp is recomputed exactly."""
    return (~((sums >= TINY_SUM) & torch.isfinite(sums))).nonzero().flatten()


def blockwise_stats_forward(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row (N,), neg_col (M,), pos (N,), lse_row (N,), lse_col (M,))`` of
    ``Z = scale * Q^ @ D^.T``, one tile at a time; see ``blockwise_stats_backward`` for the
    gradient.

    Args:
        query: ``(N, k)`` row embeddings (queries), fp32 or fp64.
        doc: ``(M, k)`` column embeddings (documents), same dtype, ``M >= offset + N``.
        scale: 0-dim tensor, the logit scale ``t``.
        query_ids, doc_ids: ``(M,)`` integer ids of the columns, or None (``excluded_pairs``);
            row ``i`` has the ids of column ``offset + i``.
        offset: the column of row 0's positive (``0`` for the square problem).
        normalize: L2-normalise rows and columns (``Q^ = Q / |Q|``); else ``Q^ = Q``.
        block_elements: at most this many entries of ``Z`` (a tile) exist at a time.

    Returns:
        ``neg_row`` and ``neg_col``, the log-sum-exp of ``Z`` over each row's and column's
        negatives (``-inf`` where there is none), ``pos = Z[i, offset + i]``, and ``lse_row``,
        ``lse_col``: ``neg_row``, ``neg_col`` in float64, for the backward. Extra memory: one
        tile (backward: two), the normalised ``Q^`` and ``D^`` and O(N + M) statistics.

    One ``exp(Z - shift)`` per entry feeds both the row and the column sums (``shift`` fixed, see
    the module docstring); a sum below ``TINY_SUM`` is recomputed exactly from ``Z``.

    Equivalent PyTorch: ``naive_gcl_stats(query, doc, scale, ...)``.
    """
    z = _Tiles(query, doc, scale, query_ids, doc_ids, offset, normalize, block_elements)
    row_sum, col_sum = query.new_zeros(z.n), query.new_zeros(z.m)
    for rows, cols in z.tiles():
        tile = z.shifted_exp(rows, cols)
        z.positive_diagonal(tile, rows, cols)[0].zero_()
        row_sum[rows] += tile.sum(dim=1)
        col_sum[cols] += tile.sum(dim=0)
    redo_rows, redo_cols = _needs_exact(row_sum), _needs_exact(col_sum)
    # The log-sum-exps in float64 as well: near |Z| = 64 an fp32 one is rounded by up to 4e-6,
    # and the backward's exp(Z - lse) would carry that error into every entry of its row
    # (column) alike, so that the row's probabilities no longer sum to 1 - P_ii (d t, which
    # sums them against the positive's term, came out 1.1e-5 off at t = 65 where naive fp32,
    # subtracting its maximum first, is 3e-7 off).
    lse_row = row_sum.double().log_().add_(z.shift)
    lse_col = col_sum.double().log_().add_(z.shift)
    # Sums that underflowed (every negative far below the shift) or are empty: exact, with the
    # maximum of each row (column) subtracted by logsumexp.
    for by_columns, redo, lse in ((False, redo_rows, lse_row), (True, redo_cols, lse_col)):
        for chunk, logits in z.exact_logits(redo, by_columns):
            lse[chunk] = torch.logsumexp(logits.double(), dim=1)
    pos = torch.linalg.vecdot(z.query_hat, z.doc_hat[offset : offset + z.n]) * scale
    neg_row, neg_col = lse_row.to(query.dtype, copy=True), lse_col.to(query.dtype, copy=True)
    return neg_row, neg_col, pos, lse_row, lse_col


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
    *,
    need_query: bool = True,
    need_doc: bool = True,
    need_scale: bool = True,
    lse_row: torch.Tensor | None = None,
    lse_col: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d query, d doc, d scale)`` of ``blockwise_stats_forward``, recomputing each
    tile of ``Z`` from the saved statistics; the arguments are the forward's plus its outputs
    and their gradients (all ``(N,)`` or ``(M,)``). ``lse_row``, ``lse_col``: the forward's
    float64 log-sum-exps, used in place of ``neg_row``, ``neg_col`` where given (fp32 ones
    leave each row's probabilities off by up to 4e-6 near |Z| = 64).

    ``need_query`` / ``need_doc`` False skip that side's GEMM (one of the three per tile) and
    return an empty ``(0,)`` tensor in its place. ``d scale`` costs O((N + M) k) given either
    side and is then always returned; ``need_scale`` matters only when neither side is needed:
    with it False as well, nothing is computed and ``d scale`` is a 0-dim zero placeholder.
    """
    empty_query, empty_doc = query.new_empty(0), doc.new_empty(0)
    if not (need_query or need_doc or need_scale):
        return empty_query, empty_doc, query.new_zeros(())
    z = _Tiles(query, doc, scale, query_ids, doc_ids, offset, normalize, block_elements)
    neg_row = neg_row if lse_row is None else lse_row
    neg_col = neg_col if lse_col is None else lse_col
    # dZ_ij = E_ij (a_i + b_j) on the negatives, E = exp(Z - shift), with the per-row and
    # per-column factors a_i = g_row_i exp(shift - neg_row_i), b_j = g_col_j exp(shift - neg_col_j).
    # They are at most g * e^46 where neg >= shift + log(TINY_SUM); a row (column) below that
    # gets factor 0 here and its exact term exp(Z - neg) g in a separate pass ("exact" below).
    floor = z.shift + math.log(TINY_SUM)
    row_ok, col_ok = neg_row >= floor, neg_col >= floor
    row_factor = torch.where(row_ok, grad_neg_row * torch.exp(z.shift - neg_row), 0.0)
    col_factor = torch.where(col_ok, grad_neg_col * torch.exp(z.shift - neg_col), 0.0)
    row_factor, col_factor = row_factor.to(query.dtype), col_factor.to(query.dtype)
    # GQ = dZ D^ and GD = dZ^T Q^ (dQ^ = t GQ, dD^ = t GD); d scale = sum(dZ * S) is
    # sum(GQ * Q^) = sum(GD * D^), so it needs one of them.
    grad_rows = z.query_hat.new_zeros(z.query_hat.shape) if need_query or not need_doc else None
    grad_cols = z.doc_hat.new_zeros(z.doc_hat.shape) if need_doc else None
    factors = torch.empty_like(z.buffer)
    for rows, cols in z.tiles():
        grad_logits = z.shifted_exp(rows, cols)  # excluded entries already 0
        tile_factors = factors[: grad_logits.numel()].view(grad_logits.shape)
        torch.add(row_factor[rows, None], col_factor[None, cols], out=tile_factors)
        grad_logits.mul_(tile_factors)
        diagonal, positive_rows = z.positive_diagonal(grad_logits, rows, cols)
        diagonal.copy_(grad_pos[positive_rows])  # dZ_{i, offset+i} = g_pos_i
        _accumulate(grad_logits, z, rows, cols, grad_rows, grad_cols)
    # The exact terms of the rows and columns left out above (a -inf statistic has no negative,
    # so no term): dZ_ij = g_row_i exp(Z_ij - neg_row_i), resp. g_col_j exp(Z_ij - neg_col_j).
    for by_columns, ok, lse, grad in ((False, row_ok, neg_row, grad_neg_row),
                                      (True, col_ok, neg_col, grad_neg_col)):  # fmt: skip
        exact = (~ok & (lse != float("-inf")) & (grad != 0)).nonzero().flatten()
        for chunk, logits in z.exact_logits(exact, by_columns):
            # (Z - lse in the statistics' precision, as the forward took the lse)
            terms = (logits.to(lse.dtype) - lse[chunk, None]).exp_().mul_(grad[chunk, None])
            grad_logits = terms.to(logits.dtype)
            if by_columns:  # the rows of dZ^T: columns ``chunk`` of dZ
                _accumulate(grad_logits.T, z, slice(None), chunk, grad_rows, grad_cols)
            else:
                _accumulate(grad_logits, z, chunk, slice(None), grad_rows, grad_cols)

    grad_scale = (
        torch.linalg.vecdot(grad_cols, z.doc_hat).sum()
        if grad_cols is not None
        else torch.linalg.vecdot(grad_rows, z.query_hat).sum()
    )
    return (
        _finish(grad_rows, query, z.inv_query, z.scale) if need_query else empty_query,
        _finish(grad_cols, doc, z.inv_doc, z.scale) if need_doc else empty_doc,
        grad_scale,
    )


def _accumulate(
    grad_logits: torch.Tensor,
    z: _Tiles,
    rows: slice | torch.Tensor,
    cols: slice | torch.Tensor,
    grad_rows: torch.Tensor | None,
    grad_cols: torch.Tensor | None,
) -> None:
    """``GQ[rows] += dZ D^[cols]`` and ``GD[cols] += dZ^T Q^[rows]`` for a tile ``dZ`` of ``Z``
    (``rows`` or ``cols`` an index tensor on the exact path)."""
    if grad_rows is not None:
        if isinstance(rows, slice):
            grad_rows[rows].addmm_(grad_logits, z.doc_hat[cols])
        else:
            grad_rows.index_add_(0, rows, grad_logits @ z.doc_hat[cols])
    if grad_cols is not None:
        if isinstance(cols, slice):
            grad_cols[cols].addmm_(grad_logits.T, z.query_hat[rows])
        else:
            grad_cols.index_add_(0, cols, grad_logits.T @ z.query_hat[rows])


def _finish(
    grad_hat: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``dx`` from ``G = dL/dx^ / t`` in place: ``dx^ = t G``, then through the normalisation."""
    grad_hat.mul_(scale)
    return grad_hat if inv_norm is None else _through_normalisation(grad_hat, x, inv_norm, grad_hat)


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
