"""Kernels of the logits form (``gcl_loss_from_logits``): the row and column statistics of a
materialised square logits matrix in one read, and its gradient in one elementwise pass.
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import LOG2E, _tile_masks, _tile_pointers


@triton.jit
def _logits_stats_kernel(
    logits_ptr, qid_ptr, did_ptr,  # data
    row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,  # (splits, N), (row blocks, N) partials
    stride_n, stride_m,  # strides
    n, num_splits,  # size, column splits
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
):  # fmt: skip
    """One read of a square logits matrix. Program ``(m, s)`` takes row block ``m`` against
    column tiles ``s, s + num_splits, ...`` and writes partial log-sum-exps over negatives as
    ``(max, sum of exp(Z - max))``: its rows' at ``[s, rows]``, each tile's columns at ``[m,
    cols]``; the launcher merges them."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(pid_s, tl.cdiv(n, BLOCK_N), num_splits):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        negative, _ = _tile_masks(
            rows, cols, n, n, 0, qid_ptr, did_ptr, qid_ptr, did_ptr, HAS_QID, HAS_DID
        )
        logits = tl.load(
            _tile_pointers(
                logits_ptr, pid * BLOCK_M, tile * BLOCK_N, stride_n, stride_m, BLOCK_M, BLOCK_N
            ),  # fmt: skip
            mask=(rows < n)[:, None] & (cols < n)[None, :],
            other=0.0,
        ).to(tl.float32)
        logits = tl.where(negative, logits, float("-inf"))
        # Rows: running maximum, as in _online_lse_kernel (differences in natural units).
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2((running_max - safe_max) * LOG2E) + tl.sum(
            tl.exp2((logits - safe_max[:, None]) * LOG2E), axis=1
        )
        running_max = new_max
        # Columns: this block's partial statistics.
        col_max = tl.max(logits, axis=0)
        safe_col_max = tl.where(col_max == float("-inf"), 0.0, col_max)
        col_sum = tl.sum(tl.exp2((logits - safe_col_max[None, :]) * LOG2E), axis=0)
        partial = pid.to(tl.int64) * n + cols
        tl.store(col_max_ptr + partial, col_max, mask=cols < n)
        tl.store(col_sum_ptr + partial, col_sum, mask=cols < n)
    partial = pid_s.to(tl.int64) * n + rows
    tl.store(row_max_ptr + partial, running_max, mask=rows < n)
    tl.store(row_sum_ptr + partial, running_sum, mask=rows < n)


@triton.jit
def _logits_grad_kernel(
    logits_ptr, qid_ptr, did_ptr,  # data
    neg_row_ptr, neg_col_ptr, grad_neg_row_ptr, grad_neg_col_ptr, grad_pos_ptr,  # statistics
    grad_ptr,  # output
    stride_n, stride_m, stride_gn, stride_gm,  # strides
    n,  # size
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
):  # fmt: skip
    """``dZ`` of the logits form in one elementwise pass (same formula as ``_stats_bwd_kernel``)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < n
    cols_ok = cols < n
    negative, positive = _tile_masks(
        rows, cols, n, n, 0, qid_ptr, did_ptr, qid_ptr, did_ptr, HAS_QID, HAS_DID
    )
    in_bounds = rows_ok[:, None] & cols_ok[None, :]
    logits = tl.load(
        _tile_pointers(
            logits_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, stride_n, stride_m, BLOCK_M, BLOCK_N
        ),  # fmt: skip
        mask=in_bounds,
        other=0.0,
    ).to(tl.float32)
    neg_row = tl.load(neg_row_ptr + rows, mask=rows_ok, other=0.0)
    neg_col = tl.load(neg_col_ptr + cols, mask=cols_ok, other=0.0)
    neg_row = tl.where(neg_row == float("-inf"), 0.0, neg_row)  # no negative: nothing reads it
    neg_col = tl.where(neg_col == float("-inf"), 0.0, neg_col)
    grad_neg_row = tl.load(grad_neg_row_ptr + rows, mask=rows_ok, other=0.0)
    grad_neg_col = tl.load(grad_neg_col_ptr + cols, mask=cols_ok, other=0.0)
    grad_pos = tl.load(grad_pos_ptr + rows, mask=rows_ok, other=0.0)
    p_row = tl.exp2(tl.minimum(logits - neg_row[:, None], 0.0) * LOG2E)  # <= 1 on negatives
    p_col = tl.exp2(tl.minimum(logits - neg_col[None, :], 0.0) * LOG2E)
    grad = tl.where(negative, grad_neg_row[:, None] * p_row + grad_neg_col[None, :] * p_col, 0.0)
    grad = tl.where(positive, grad_pos[:, None], grad)
    tl.store(
        _tile_pointers(
            grad_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, stride_gn, stride_gm, BLOCK_M, BLOCK_N
        ),  # fmt: skip
        grad.to(grad_ptr.dtype.element_ty),
        mask=in_bounds,
    )
