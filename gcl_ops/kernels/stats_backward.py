"""Backward kernel of the embedding form: the gradient of one block of rows, recomputing ``Z``
tile by tile (launched twice by ``gcl_ops.ops``, the second time with rows and columns swapped).
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import (
    LOG2E,
    MAX_FP16_EXPONENT,
    _load_rows,
    _power_of_two,
    _row_offsets,
    _similarity_tile,
)


@triton.jit
def _stats_bwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, neg_row_ptr, neg_col_ptr,  # t (fp16: and 2 bounds); (2, n) lse / t, hi and lo
    grad_neg_row_ptr, grad_neg_col_ptr, grad_pos_ptr,  # upstream gradients
    grad_rows_ptr, scale_partials_ptr,  # outputs
    stride_rn, stride_rk, stride_cn, stride_ck, stride_gn, stride_gk,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    SCALE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Gradient of one block of rows: ``dR_i = through_norm(t * sum_j dZ_ij c^_j)``, recomputing
    ``Z`` tile by tile; with ``SCALE_GRAD`` also the block's ``sum_ij dZ_ij S_ij``.

    The statistics come as log-sum-exps in cosine units, ``lse / t = hi + lo`` (two fp32 parts:
    ``neg_row_ptr[i]``, ``neg_row_ptr[n_rows + i]``; 0 where there is no negative)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
    scale = tl.load(scale_ptr).to(tl.float32)
    neg_row = tl.load(neg_row_ptr + rows, mask=rows_ok, other=0.0)
    neg_row_lo = tl.load(neg_row_ptr + n_rows + rows, mask=rows_ok, other=0.0)
    grad_neg_row = tl.load(grad_neg_row_ptr + rows, mask=rows_ok, other=0.0)
    grad_pos = tl.load(grad_pos_ptr + rows, mask=rows_ok, other=0.0)

    grad_rows_hat = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)  # dL/dr^ (fp16: times 2^e)
    # fp16 operands of dS @ C: dS_ij ~ t w / N^2 is far below fp16's smallest normal (6e-5) at
    # large N, and would flush to 0 in the cast. The block's dS is scaled by a power of two 2^e
    # fixed before the loop, folded into the upstream gradients (dS is linear in them; no extra
    # work per entry), and undone in fp32 at the end. (bf16 has fp32's exponent range and fp32
    # casts nothing: no scaling.) On negatives P <= 1 (clamped below), so with
    # a = max_j 1/|c_j| and b = max_j |g_col_j| / |c_j| (1/|c_j| = 1 without normalisation),
    # from the launcher in scale_ptr[1:3]:
    #     |dS_ij| <= bound = t (a max_i (|g_row_i| + |g_pos_i|) + b),
    # and e = 13 - floor(log2 bound) puts bound 2^e in [2^13, 2^14): nothing passes fp16's
    # 65504. An entry f times below the bound keeps fp16's full 11 bits down to f = 2^-27 (then
    # subnormals); e is clamped to [-100, 100]. One e per block, not per row: per-row factors
    # cost registers that the K_PAD = 1024 tiles do not have (benchmarks/static_tile_check.py).
    RESCALE: tl.constexpr = rows_ptr.dtype.element_ty == tl.float16
    if RESCALE:
        bound = scale * (
            tl.load(scale_ptr + 1) * tl.max(tl.abs(grad_neg_row) + tl.abs(grad_pos), axis=0)
            + tl.load(scale_ptr + 2)
        )
        # floor(log2 x) = (biased exponent) - 127 for a normal x > 0: bits >> 23.
        bound_bits = tl.maximum(bound, 1e-30).to(tl.int32, bitcast=True)
        exponent = tl.minimum(tl.maximum(140 - (bound_bits >> 23), -MAX_FP16_EXPONENT),
                              MAX_FP16_EXPONENT)  # fmt: skip
        up = _power_of_two(exponent)
        grad_neg_row = grad_neg_row * up
        grad_pos = grad_pos * up
    scale_grad = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(0, tl.cdiv(n_cols, BLOCK_N)):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < n_cols
        cosines, negative, positive, inv_cols = _similarity_tile(
            rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
            rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
            n_rows, n_cols, k, diag_offset,
            BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, HAS_QID, HAS_DID, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        neg_col = tl.load(neg_col_ptr + cols, mask=cols_ok, other=0.0)
        neg_col_lo = tl.load(neg_col_ptr + n_cols + cols, mask=cols_ok, other=0.0)
        grad_neg_col = tl.load(grad_neg_col_ptr + cols, mask=cols_ok, other=0.0)
        if RESCALE:
            grad_neg_col = grad_neg_col * up
        # dZ = g_row_i P_row + g_col_j P_col on negatives, g_pos_i on the positive, else 0, with
        # P = exp(Z - lse) = exp2((S - hi - lo) t log2(e)). In cosine units S - hi is exact
        # where it matters (P not negligible: S near hi, Sterbenz) and every later rounding is
        # relative to the small difference; Z = S t and an fp32 lse would each be off by up to
        # ulp(|Z|) / 2 (1.5e-5 at |Z| ~ 300), relative errors in P that d t = sum dZ S sums up.
        # On negatives Z <= lse, so P <= 1; the clamp only keeps the discarded entries finite.
        row_gap = (cosines - neg_row[:, None]) - neg_row_lo[:, None]
        col_gap = (cosines - neg_col[None, :]) - neg_col_lo[None, :]
        p_row = tl.exp2(tl.minimum(row_gap * scale, 0.0) * LOG2E)
        p_col = tl.exp2(tl.minimum(col_gap * scale, 0.0) * LOG2E)
        grad_logits = tl.where(
            negative, grad_neg_row[:, None] * p_row + grad_neg_col[None, :] * p_col, 0.0
        )
        grad_logits = tl.where(positive, grad_pos[:, None], grad_logits)
        if SCALE_GRAD:
            scale_grad += tl.sum(grad_logits * cosines, axis=1)
        # dS = t dZ; dr^_i += sum_j dS_ij c_j / |c_j|, in the inputs' precision like P @ V.
        grad_cosines = grad_logits * scale
        if NORMALIZE:
            grad_cosines = grad_cosines * inv_cols[None, :]
        grad_cosines = grad_cosines.to(rows_ptr.dtype.element_ty)
        if UPCAST:
            grad_cosines = grad_cosines.to(tl.float32)
        col_tile = _load_rows(cols_ptr, cols, stride_cn, stride_ck, n_cols, k, K_PAD, UPCAST)
        grad_rows_hat += tl.dot(grad_cosines, col_tile, input_precision=INPUT_PRECISION)

    if RESCALE:
        down = _power_of_two(-exponent)  # exact: powers of two
        grad_rows_hat = grad_rows_hat * down
        scale_grad = scale_grad * down
    grad_rows = grad_rows_hat
    if NORMALIZE:
        # dr_i = (dr^_i - r_i <r_i, dr^_i> / |r_i|^2) / |r_i|
        row_values = _load_rows(rows_ptr, rows, stride_rn, stride_rk, n_rows, k, K_PAD, UPCAST)
        row_values = row_values.to(tl.float32)
        radial = tl.sum(row_values * grad_rows_hat, axis=1) * inv_rows * inv_rows
        grad_rows = (grad_rows_hat - row_values * radial[:, None]) * inv_rows[:, None]
    offs_k = tl.arange(0, K_PAD)
    tl.store(
        grad_rows_ptr + _row_offsets(rows, offs_k, stride_gn, stride_gk),
        grad_rows.to(grad_rows_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & (offs_k < k)[None, :],
    )
    if SCALE_GRAD:
        tl.store(scale_partials_ptr + pid, tl.sum(scale_grad, axis=0))
