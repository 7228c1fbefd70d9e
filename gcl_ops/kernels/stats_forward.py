"""Forward kernels of the embedding form: the statistics of ``Z = t * Q^ D^T`` in one pass over
the tiles, and the exact recomputation of the rows (or columns) whose fixed-shift sum underflowed.

    row_sum_i = sum_{j neg} exp(Z_ij - shift),   col_sum_j = sum_{i neg} exp(Z_ij - shift),
    pos_i = S_{i, i + diag_offset}

with one ``exp`` per entry feeding both sums (``shift`` fixed, so the partial sums of the tiles
simply add); ``lse = shift + log(sum)`` is finished by the launcher in float64.
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import (
    LOG2E,
    _resident_cosines,
    _resident_operands,
    _similarity_tile,
    _tile_masks,
)


@triton.jit
def _stats_fwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    shift_ptr,  # device scalars: the shift in cosine units (shift / t), t log2(e)
    row_sum_ptr, col_sum_ptr, pos_ptr,  # outputs, zero-initialised, accumulated atomically
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_MAIN: tl.constexpr, K_TAIL: tl.constexpr, RESIDENT: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program ``(m, s)``: row block ``m`` against column tiles ``s, s + S, ...`` (``S`` the
    column splits). ``RESIDENT``: the row block stays on chip for the whole loop (``K_MAIN +
    K_TAIL`` columns of it) and each column tile is loaded once, whole (per entry ``k e /
    BLOCK_M`` bytes from L2); otherwise both stream over ``k`` in ``BLOCK_K`` slices.
    ``pos_ptr`` gets the positive cosines ``S_ii``; the launcher forms ``Z_ii = t S_ii`` in
    float64."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0)
    if RESIDENT:
        row_main, row_tail = _resident_operands(
            rows_ptr, rows, inv_rows, stride_rn, stride_rk, n_rows, k,
            K_MAIN, K_TAIL, NORMALIZE, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
    shift_cosine = tl.load(shift_ptr)
    exp_scale = tl.load(shift_ptr + 1)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_cosine = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tl.program_id(1), tl.cdiv(n_cols, BLOCK_N), tl.num_programs(1)):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if RESIDENT:
            inv_cols = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
            if NORMALIZE:
                inv_cols = tl.load(inv_cols_ptr + cols, mask=cols < n_cols, other=1.0)
            col_main, col_tail = _resident_operands(
                cols_ptr, cols, inv_cols, stride_cn, stride_ck, n_cols, k,
                K_MAIN, K_TAIL, NORMALIZE, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
            cosines = _resident_cosines(row_main, row_tail, col_main, col_tail, inv_rows, inv_cols,
                                        K_TAIL, NORMALIZE, rows_ptr.dtype.element_ty != tl.float32,
                                        INPUT_PRECISION)  # fmt: skip
            negative, positive = _tile_masks(
                rows, cols, n_rows, n_cols, diag_offset,
                row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr, HAS_QID, HAS_DID,
            )  # fmt: skip
        else:
            cosines, negative, positive, _ = _similarity_tile(
                rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr,
                col_did_ptr, rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
                n_rows, n_cols, k, diag_offset,
                BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, HAS_QID, HAS_DID, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
        # exp(Z - shift) = exp2((S - shift / t) t log2(e)): the difference in cosine units, where
        # it rounds relative to itself (Z = S t would round at |Z| first: ulp(316) = 3e-5).
        shifted = tl.where(negative, tl.exp2((cosines - shift_cosine) * exp_scale), 0.0)
        row_sum += tl.sum(shifted, axis=1)
        tl.atomic_add(col_sum_ptr + cols, tl.sum(shifted, axis=0), mask=cols < n_cols,
                      sem="relaxed")  # fmt: skip
        positive_cosine += tl.sum(tl.where(positive, cosines, 0.0), axis=1)
    tl.atomic_add(row_sum_ptr + rows, row_sum, mask=rows_ok, sem="relaxed")
    tl.atomic_add(pos_ptr + rows, positive_cosine, mask=rows_ok, sem="relaxed")


@triton.jit
def _online_lse_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, redo_ptr, lse_ptr,  # t, which rows to recompute, (2, n_rows) output (where redo)
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Exact ``lse_i = logsumexp_{j negative} Z_ij`` with a running maximum, for the rows flagged
    in ``redo``, as two parts the launcher adds in float64: ``lse_ptr[i] = max_j S_ij`` (cosine
    units) and ``lse_ptr[n_rows + i] = sum_j exp(t (S_ij - max))`` (0 without negatives). A
    block without a flagged row returns at once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    redo = tl.load(redo_ptr + rows, mask=rows_ok, other=0)
    if tl.max(redo, axis=0) > 0:
        inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
        exp_scale = tl.load(scale_ptr) * LOG2E
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for tile in range(0, tl.cdiv(n_cols, BLOCK_N)):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            cosines, negative, _, _ = _similarity_tile(
                rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
                rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
                n_rows, n_cols, k, diag_offset,
                BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, HAS_QID, HAS_DID, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
            cosines = tl.where(negative, cosines, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(cosines, axis=1))
            # A row with no negative yet keeps max -inf: shift by 0 there to avoid inf - inf.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp2((running_max - safe_max) * exp_scale) + tl.sum(
                tl.exp2((cosines - safe_max[:, None]) * exp_scale), axis=1
            )
            running_max = new_max
        flagged = rows_ok & (redo != 0)
        tl.store(lse_ptr + rows, running_max, mask=flagged)
        tl.store(lse_ptr + n_rows + rows, running_sum, mask=flagged)
