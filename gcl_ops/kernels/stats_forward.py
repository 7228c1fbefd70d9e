"""Forward kernels of the embedding form: the statistics ``(neg_row, neg_col, pos)`` of
``Z = t * Q^ D^T`` in one pass over the tiles, and the exact recomputation of the rows (or
columns) whose fixed-shift sum underflowed. Launched by ``gcl_ops.ops``.
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import FUSED_FMA, LN2, LOG2E, _similarity_tile


@triton.jit(do_not_specialize=["size_bucket"])
def _stats_fwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    shift_ptr,  # device scalars: the fixed shift in cosine units (shift / t), t log2(e) as hi + lo
    row_sum_ptr, col_sum_ptr, pos_ptr,  # outputs, zero-initialised, accumulated atomically
    # (pos_ptr: the positive cosines S_{i, i + diag_offset}; the launcher scales them by t)
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    size_bucket,  # log2 of n_rows * n_cols, rounded: only a key for the autotuner
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program ``(m, s)``: rows block ``m`` against column tiles ``s, s + S, ...`` (``S =
    num_programs(1)``, the column splits).

    row_sum_i += sum_j exp(t (S_ij - sigma)), col_sum_j += sum_i exp(t (S_ij - sigma)) over
    negatives, with ``sigma = shift / t``; pos_i = S_{i, i + diag_offset} (the cosine: the launcher
    forms Z = t S in float64, and the backward's d t takes the positives' part from it).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
    shift_cosine = tl.load(shift_ptr).to(tl.float32)
    # t log2(e) as two fp32 parts (from the launcher, in float64): one fp32 product would be off
    # by up to 6e-8 relative, 5e-6 absolute at exponents near the headroom (92 in base 2).
    exp_scale = tl.load(shift_ptr + 1).to(tl.float32)
    exp_scale_lo = tl.load(shift_ptr + 2).to(tl.float32)

    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_cosine = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(pid_s, tl.cdiv(n_cols, BLOCK_N), tl.num_programs(1)):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < n_cols
        cosines, negative, positive, inv_cols = _similarity_tile(
            rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
            rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
            n_rows, n_cols, k, diag_offset,
            BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, HAS_QID, HAS_DID, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        # One exp per entry feeds both sums: exp(Z - shift) = exp2((S - sigma) t log2(e)). The
        # difference is taken in cosine units, where it rounds relative to itself: Z = S t would
        # round at |Z| (ulp(316) = 3e-5) first, noise that every P of the backward carries.
        # The dominant terms have exponents near the headroom (up to 92 in base 2), where one
        # rounding of the exponent is up to ulp(92) / 2 = 4e-6, a relative error of the term
        # that the backward (differences from the lse, small there) does not share: its P then
        # sum to 1 + 4e-6, which d t = sum dZ S picks up as g t 4e-6. So both roundings of the
        # exponent are carried to first order: that of S - sigma (TwoSum) and that of the
        # product (fma), and exp2(e + de) = exp2(e) (1 + de ln 2).
        gap = cosines - shift_cosine
        gap_cos = gap + shift_cosine
        gap_err = (cosines - gap_cos) + (gap_cos - gap - shift_cosine)
        exponent = gap * exp_scale
        if FUSED_FMA:
            product_err = tl.fma(gap, exp_scale, -exponent)
        else:  # the interpreter's fma rounds the product: Dekker's exact product instead
            split = gap * 4097.0
            gap_hi = split - (split - gap)
            gap_lo = gap - gap_hi
            split = exp_scale * 4097.0
            scale_hi = split - (split - exp_scale)
            scale_lo = exp_scale - scale_hi
            product_err = (((gap_hi * scale_hi - exponent) + gap_hi * scale_lo) + gap_lo * scale_hi
                           + gap_lo * scale_lo)  # fmt: skip
        exponent_err = product_err + (gap * exp_scale_lo + gap_err * exp_scale)
        shifted = tl.where(negative, tl.exp2(exponent) * (1.0 + exponent_err * LN2), 0.0)
        row_sum += tl.sum(shifted, axis=1)
        tl.atomic_add(col_sum_ptr + cols, tl.sum(shifted, axis=0), mask=cols_ok, sem="relaxed")
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
    in ``redo``, in two parts that the launcher adds up in float64: ``lse_ptr[i] = max_j S_ij``
    (cosine units) and ``lse_ptr[n_rows + i] = sum_j exp(t (S_ij - max))`` (0 without
    negatives), so ``lse_i = t max + log(sum)``. A block without a flagged row returns at once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    redo = tl.load(redo_ptr + rows, mask=rows_ok, other=0)
    if tl.max(redo, axis=0) > 0:
        inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
        scale = tl.load(scale_ptr).to(tl.float32)
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
            # Differences in cosine units first (as in _stats_fwd_kernel), then times t log2(e).
            cosines = tl.where(negative, cosines, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(cosines, axis=1))
            # A row with no negative yet keeps max -inf: shift by 0 there to avoid inf - inf.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp2((running_max - safe_max) * scale * LOG2E) + tl.sum(
                tl.exp2((cosines - safe_max[:, None]) * scale * LOG2E), axis=1
            )
            running_max = new_max
        flagged = rows_ok & (redo != 0)
        tl.store(lse_ptr + rows, running_max, mask=flagged)
        tl.store(lse_ptr + n_rows + rows, running_sum, mask=flagged)
