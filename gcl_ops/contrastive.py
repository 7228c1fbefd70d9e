"""The GCL loss: weighted bidirectional softmax cross-entropy (paper Eq. 4), fused in Triton.

With ``Z = t * normalize(Q) @ normalize(D).T`` (``(N, N)``; row ``i`` = query ``i``, column ``j`` =
document ``j``), weights ``w >= 0`` and logit scale ``t > 0``::

    L = -(1 / 2N) * sum_i w_i * (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])
      =  (1 / 2N) * sum_i w_i * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))

where ``neg_row_i = logsumexp_{j != i} Z_ij`` and ``neg_col_j = logsumexp_{i != j} Z_ij`` run over
the negatives (in-batch duplicates excluded). The softplus form keeps a confidently right pair's
tiny loss exact in fp32. Only these *statistics* touch all N^2 entries; the rest (weights,
reduction) is O(N) PyTorch. Their gradient, what the backward kernel implements::

    dZ_ij = g_row_i exp(Z_ij - neg_row_i) + g_col_j exp(Z_ij - neg_col_j)   (i, j a negative)
    dZ_ii = g_pos_i                                                         (the positive)
    dQ^ = t dZ D^,   dD^ = t dZ^T Q^,   dt = sum_ij dZ_ij S_ij              (S = Q^ D^T)
    dq_i = (dq^_i - q^_i <q^_i, dq^_i>) / |q_i|                            (through q^ = q/|q|)

with ``g_row = dL/d neg_row`` etc. from autograd. This reproduces the design's
``dL/dZ = (w_i P_row + w_j P_col - (w_i + w_j) [i == j]) / 2N``.

The problem may be rectangular: ``N`` rows against ``M >= offset + N`` columns with row ``i``'s
positive at column ``offset + i`` (one rank's rows against the gathered batch).

Layers, top to bottom:

* Triton kernels: ``_stats_fwd_kernel`` (one pass over the tiles; one exp per entry feeds both
  the row and the column sums, shifted by a fixed bound instead of an online maximum, since
  ``|Z| <= t``; column sums are combined with atomic adds), ``_online_lse_kernel`` (exact
  recomputation with an online maximum for the rare row or column whose sum underflowed),
  ``_stats_bwd_kernel`` (one program per block of rows accumulates that block's gradient;
  run a second time with rows and columns swapped for the documents' gradient), and the
  logits-form kernels ``_logits_stats_kernel`` / ``_logits_grad_kernel``;
* launchers that check nothing but shapes and allocate;
* custom ops ``gcl_ops::gcl_stats`` / ``gcl_stats_backward`` (opaque to ``torch.compile``, so no
  graph break) dispatching to Triton or to the blocked PyTorch path in ``gcl_ops.reference``;
* ``torch.autograd.Function`` s with ``torch.amp.custom_fwd/custom_bwd``;
* ``gcl_loss``, ``gcl_loss_from_logits`` and the ``GCLLoss`` module.

``impl="auto"`` runs Triton on CUDA tensors (fp32, fp16, bf16; ``k <= 1024``) and the blocked
PyTorch path elsewhere. ``impl="triton"`` on CPU tensors needs the Triton interpreter: set
``TRITON_INTERPRET=1`` in the environment *before* anything imports triton.
"""

from typing import Literal, Optional

import torch
from torch import nn

from gcl_ops import _checks, reference
from gcl_ops._triton import HAS_TRITON, interpreting, tl, triton
from gcl_ops.reference import Reduction, naive_masked_lse, reduce_loss

Impl = Literal["auto", "triton", "torch"]

LOG2E = tl.constexpr(1.4426950408889634)  # kernels work in base 2: exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)
#: The Triton path keeps whole embedding rows on chip; wider embeddings take the PyTorch path.
MAX_TRITON_K = 1024
#: The forward pass sums ``exp(Z - shift)`` with ``shift = max(0, bound - 64)``, ``bound >= |Z|``:
#: every term is at most e^64, so even 2^40 of them stay finite in fp32.
SHIFT_HEADROOM = 64.0
#: A row or column sum below this (about e^-69) may have lost precision to underflow, or has no
#: negative at all: its log-sum-exp is recomputed exactly with an online maximum.
TINY_SUM = 1e-30


# ==============================================================================================
# Triton kernels
# ==============================================================================================


@triton.jit
def _load_rows(ptr, rows, stride_n, stride_k, n, k, K_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of an ``(n, k)`` matrix as a ``(len(rows), K_PAD)`` tile, zero-padded."""
    offs_k = tl.arange(0, K_PAD)
    mask = (rows < n)[:, None] & (offs_k < k)[None, :]
    tile = tl.load(
        ptr + rows.to(tl.int64)[:, None] * stride_n + offs_k[None, :] * stride_k,
        mask=mask,
        other=0.0,
    )
    if UPCAST:  # the interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584)
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _cosine_tile(
    rows_ptr, cols_ptr, rows, cols, inv_rows, inv_cols,
    stride_rn, stride_rk, stride_cn, stride_ck, n_rows, n_cols, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``S = R^ C^T`` for one tile: a tensor-core GEMM over ``k`` in ``BLOCK_K`` slices with an fp32
    accumulator, then ``* 1/|r_i| * 1/|c_j|``."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_rn
    col_offsets = cols.to(tl.int64)[:, None] * stride_cn
    rows_ok = (rows < n_rows)[:, None]
    cols_ok = (cols < n_cols)[:, None]
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < k)[None, :]
        row_slice = tl.load(rows_ptr + row_offsets + offs_k[None, :] * stride_rk,
                            mask=rows_ok & k_ok, other=0.0)  # fmt: skip
        col_slice = tl.load(cols_ptr + col_offsets + offs_k[None, :] * stride_ck,
                            mask=cols_ok & k_ok, other=0.0)  # fmt: skip
        if UPCAST:  # the interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584)
            row_slice = row_slice.to(tl.float32)
            col_slice = col_slice.to(tl.float32)
        accumulator = tl.dot(row_slice, tl.trans(col_slice), accumulator,
                             input_precision=INPUT_PRECISION)  # fmt: skip
    if NORMALIZE:
        accumulator = accumulator * inv_rows[:, None] * inv_cols[None, :]
    return accumulator


@triton.jit
def _tile_masks(
    rows, cols, n_rows, n_cols, diag_offset,
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
    HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
):  # fmt: skip
    """``(negative, positive)`` masks of a tile: the positive of row ``r`` is column
    ``r + diag_offset``; a negative is any other in-bounds entry whose ids differ."""
    rows_ok = rows < n_rows
    cols_ok = cols < n_cols
    valid = rows_ok[:, None] & cols_ok[None, :]
    is_positive = cols[None, :] == (rows + diag_offset)[:, None]
    negative = valid & (cols[None, :] != (rows + diag_offset)[:, None])
    if HAS_QID:
        row_qid = tl.load(row_qid_ptr + rows, mask=rows_ok, other=0)
        col_qid = tl.load(col_qid_ptr + cols, mask=cols_ok, other=0)
        negative = negative & (row_qid[:, None] != col_qid[None, :])
    if HAS_DID:
        row_did = tl.load(row_did_ptr + rows, mask=rows_ok, other=0)
        col_did = tl.load(col_did_ptr + cols, mask=cols_ok, other=0)
        negative = negative & (row_did[:, None] != col_did[None, :])
    return negative, valid & is_positive


@triton.jit
def _similarity_tile(
    rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
    rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
    n_rows, n_cols, k, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One tile as every kernel sees it: cosines ``S``, the negative and positive masks, and the
    columns' inverse norms (ones without normalisation)."""
    inv_cols = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv_cols = tl.load(inv_cols_ptr + cols, mask=cols < n_cols, other=1.0)
    cosines = _cosine_tile(
        rows_ptr, cols_ptr, rows, cols, inv_rows, inv_cols,
        stride_rn, stride_rk, stride_cn, stride_ck, n_rows, n_cols, k,
        BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, INPUT_PRECISION, UPCAST,
    )  # fmt: skip
    negative, positive = _tile_masks(
        rows, cols, n_rows, n_cols, diag_offset,
        row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr, HAS_QID, HAS_DID,
    )  # fmt: skip
    return cosines, negative, positive, inv_cols


@triton.jit
def _stats_fwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, shift_ptr,  # device scalars t and the fixed shift
    row_sum_ptr, col_sum_ptr, pos_ptr,  # outputs, zero-initialised, accumulated atomically
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset, num_splits,  # sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program ``(m, s)``: rows block ``m`` against column tiles ``s, s + num_splits, ...``.

    row_sum_i += sum_j exp(Z_ij - shift), col_sum_j += sum_i exp(Z_ij - shift) over negatives;
    pos_i = Z_{i, i + diag_offset}.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
    scale_log2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    shift_log2 = tl.load(shift_ptr).to(tl.float32) * LOG2E

    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_cosine = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(pid_s, tl.cdiv(n_cols, BLOCK_N), num_splits):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = cols < n_cols
        cosines, negative, positive, inv_cols = _similarity_tile(
            rows_ptr, cols_ptr, inv_cols_ptr, row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,
            rows, cols, inv_rows, stride_rn, stride_rk, stride_cn, stride_ck,
            n_rows, n_cols, k, diag_offset,
            BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, HAS_QID, HAS_DID, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        # One exp per entry feeds both sums: exp(Z - shift) = exp2((S t - shift) log2(e)).
        shifted = tl.where(negative, tl.exp2(cosines * scale_log2 - shift_log2), 0.0)
        row_sum += tl.sum(shifted, axis=1)
        tl.atomic_add(col_sum_ptr + cols, tl.sum(shifted, axis=0), mask=cols_ok)
        positive_cosine += tl.sum(tl.where(positive, cosines, 0.0), axis=1)
    tl.atomic_add(row_sum_ptr + rows, row_sum, mask=rows_ok)
    tl.atomic_add(pos_ptr + rows, positive_cosine * (scale_log2 * LN2), mask=rows_ok)


@triton.jit
def _finish_lse(running_max, running_sum):
    """Natural log-sum-exp from a base-2 running maximum and sum; -inf for an empty sum."""
    lse = (running_max + tl.log2(tl.maximum(running_sum, 1e-38))) * LN2
    return tl.where(running_sum == 0.0, float("-inf"), lse)


@triton.jit
def _online_lse_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, redo_ptr, lse_ptr,  # t, which rows to recompute, output (written where redo)
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Exact ``lse_i = logsumexp_{j negative} Z_ij`` with a running maximum, for the rows flagged
    in ``redo``; a block without a flagged row returns at once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    redo = tl.load(redo_ptr + rows, mask=rows_ok, other=0)
    if tl.max(redo, axis=0) > 0:
        inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
        scale_log2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
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
            logits_log2 = tl.where(negative, cosines * scale_log2, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits_log2, axis=1))
            # A row with no negative yet keeps max -inf: shift by 0 there to avoid inf - inf.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp2(running_max - safe_max) + tl.sum(
                tl.exp2(logits_log2 - safe_max[:, None]), axis=1
            )
            running_max = new_max
        tl.store(lse_ptr + rows, _finish_lse(running_max, running_sum), mask=rows_ok & (redo != 0))


@triton.jit
def _stats_bwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, neg_row_ptr, neg_col_ptr,  # t and the forward's statistics
    grad_neg_row_ptr, grad_neg_col_ptr, grad_pos_ptr,  # upstream gradients
    grad_rows_ptr, scale_partials_ptr,  # outputs
    stride_rn, stride_rk, stride_cn, stride_ck, stride_gn, stride_gk,  # strides
    n_rows, n_cols, k, diag_offset,  # sizes
    K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    SCALE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Gradient of one block of rows: ``dR_i = through_norm(t * sum_j dZ_ij c^_j)``, recomputing
    ``Z`` tile by tile; with ``SCALE_GRAD`` also the block's ``sum_ij dZ_ij S_ij``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
    scale = tl.load(scale_ptr).to(tl.float32)
    scale_log2 = scale * LOG2E
    # A row or column without negatives has statistic -inf and nothing that reads it: use 0.
    neg_row = tl.load(neg_row_ptr + rows, mask=rows_ok, other=0.0)
    neg_row_log2 = tl.where(neg_row == float("-inf"), 0.0, neg_row) * LOG2E
    grad_neg_row = tl.load(grad_neg_row_ptr + rows, mask=rows_ok, other=0.0)
    grad_pos = tl.load(grad_pos_ptr + rows, mask=rows_ok, other=0.0)

    grad_rows_hat = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)  # dL/dr^
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
        neg_col_log2 = tl.where(neg_col == float("-inf"), 0.0, neg_col) * LOG2E
        grad_neg_col = tl.load(grad_neg_col_ptr + cols, mask=cols_ok, other=0.0)
        logits_log2 = cosines * scale_log2
        # dZ = g_row_i P_row + g_col_j P_col on negatives, g_pos_i on the positive, else 0.
        # On negatives Z <= lse, so P <= 1; the clamp only keeps the discarded entries finite.
        p_row = tl.exp2(tl.minimum(logits_log2 - neg_row_log2[:, None], 0.0))
        p_col = tl.exp2(tl.minimum(logits_log2 - neg_col_log2[None, :], 0.0))
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

    grad_rows = grad_rows_hat
    if NORMALIZE:
        # dr_i = (dr^_i - r_i <r_i, dr^_i> / |r_i|^2) / |r_i|
        row_values = _load_rows(rows_ptr, rows, stride_rn, stride_rk, n_rows, k, K_PAD, UPCAST)
        row_values = row_values.to(tl.float32)
        radial = tl.sum(row_values * grad_rows_hat, axis=1) * inv_rows * inv_rows
        grad_rows = (grad_rows_hat - row_values * radial[:, None]) * inv_rows[:, None]
    offs_k = tl.arange(0, K_PAD)
    tl.store(
        grad_rows_ptr + rows.to(tl.int64)[:, None] * stride_gn + offs_k[None, :] * stride_gk,
        grad_rows.to(grad_rows_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & (offs_k < k)[None, :],
    )
    if SCALE_GRAD:
        tl.store(scale_partials_ptr + pid, tl.sum(scale_grad, axis=0))


@triton.jit
def _logits_stats_kernel(
    logits_ptr, qid_ptr, did_ptr,  # data
    neg_row_ptr, col_max_ptr, col_sum_ptr,  # outputs: (N,), and (row blocks, N) partials
    stride_n, stride_m,  # strides
    n,  # size
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
):  # fmt: skip
    """One read of a square logits matrix: each row block's exact row log-sum-exp over negatives
    (running maximum), and per-column partial (max, sum of exp(Z - max)) over its rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(0, tl.cdiv(n, BLOCK_N)):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        negative, _ = _tile_masks(
            rows, cols, n, n, 0, qid_ptr, did_ptr, qid_ptr, did_ptr, HAS_QID, HAS_DID
        )
        logits = tl.load(
            logits_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_m,
            mask=(rows < n)[:, None] & (cols < n)[None, :],
            other=0.0,
        ).to(tl.float32)
        logits_log2 = tl.where(negative, logits * LOG2E, float("-inf"))
        # Rows: running maximum, as in _online_lse_kernel.
        new_max = tl.maximum(running_max, tl.max(logits_log2, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - safe_max) + tl.sum(
            tl.exp2(logits_log2 - safe_max[:, None]), axis=1
        )
        running_max = new_max
        # Columns: this block's partial statistics, merged by a log-sum-exp afterwards.
        col_max = tl.max(logits_log2, axis=0)
        safe_col_max = tl.where(col_max == float("-inf"), 0.0, col_max)
        col_sum = tl.sum(tl.exp2(logits_log2 - safe_col_max[None, :]), axis=0)
        partial = pid.to(tl.int64) * n + cols
        tl.store(col_max_ptr + partial, col_max * LN2, mask=cols < n)
        tl.store(col_sum_ptr + partial, col_sum, mask=cols < n)
    tl.store(neg_row_ptr + rows, _finish_lse(running_max, running_sum), mask=rows < n)


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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < n
    cols_ok = cols < n
    negative, positive = _tile_masks(
        rows, cols, n, n, 0, qid_ptr, did_ptr, qid_ptr, did_ptr, HAS_QID, HAS_DID
    )
    in_bounds = rows_ok[:, None] & cols_ok[None, :]
    logits = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_m,
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
        grad_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :] * stride_gm,
        grad.to(grad_ptr.dtype.element_ty),
        mask=in_bounds,
    )


# ==============================================================================================
# Launchers
# ==============================================================================================

#: Whether the kernels above were defined under the Triton interpreter (TRITON_INTERPRET=1).
_INTERPRETING = interpreting(_stats_fwd_kernel)


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _tile_sizes(k_pad: int, element_size: int, backward: bool) -> dict[str, int]:
    """Tile sizes and warps for a problem of (padded) width ``k_pad``.

    The similarity tile is a ``BLOCK_M x BLOCK_N`` GEMM over ``k`` in ``BLOCK_K`` slices; the
    backward also keeps a ``BLOCK_M x k_pad`` fp32 gradient accumulator in registers and loads
    ``BLOCK_N x k_pad`` column tiles for ``dS @ C``. The sizes are the largest that ptxas
    compiles for Hopper (sm_90a) without register spills, or with the fewest (k = 1024), from
    ``benchmarks/static_tile_check.py --sweep``; they are not yet tuned by timing on a GPU. The
    interpreter gets small tiles: few programs, while ragged tiles and k slices are exercised.
    """
    if _INTERPRETING:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4)
    block_k = min(k_pad, 64 if element_size <= 2 else 32)
    if not backward:
        if element_size <= 2:
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k, num_warps=8)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=8)
    block_m = 16 if k_pad >= 1024 else 32
    block_n = 64 if k_pad <= 256 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8)


def _num_splits(n_rows: int, n_cols: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Column splits so that the forward grid has about four programs per SM."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: two splits exercise the atomic row sums too
        target = 2 * triton.cdiv(n_rows, block_m)
    return max(
        1, min(triton.cdiv(n_cols, block_n), triton.cdiv(target, triton.cdiv(n_rows, block_m)))
    )


def _kernel_flags(x: torch.Tensor) -> dict:
    """Compile-time switches that depend on the dtype and the user's fp32 matmul setting."""
    return dict(
        INPUT_PRECISION="ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32",
        UPCAST=_INTERPRETING and x.dtype == torch.bfloat16,
    )


def _ids_arguments(
    query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None, offset: int, n_rows: int,
    placeholder: torch.Tensor, swap: bool,
) -> tuple[list[torch.Tensor], dict]:  # fmt: skip
    """Kernel pointers ``(row_qid, row_did, col_qid, col_did)`` and flags. Ids are ``(M,)``, one
    per column; row ``i`` carries those of column ``offset + i``. ``swap``: rows are documents."""
    pointers = []
    for ids in (query_ids, doc_ids):
        if ids is None:
            pointers.append((placeholder, placeholder))
            continue
        ids = ids.contiguous()
        query_side = ids[offset : offset + n_rows]
        pointers.append((ids, query_side) if swap else (query_side, ids))
    (row_qid, col_qid), (row_did, col_did) = pointers
    flags = dict(HAS_QID=query_ids is not None, HAS_DID=doc_ids is not None)
    return [row_qid, row_did, col_qid, col_did], flags


def _inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fp32 ``1 / |x_i|``; without normalisation a placeholder the kernels never read."""
    inverse = reference.inverse_norms(x, normalize, dtype=torch.float32)
    return torch.ones(1, device=x.device) if inverse is None else inverse


def _oriented(
    query: torch.Tensor, doc: torch.Tensor, inv_query: torch.Tensor, inv_doc: torch.Tensor,
    query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None, offset: int,
    placeholder: torch.Tensor, swap: bool,
) -> tuple:  # fmt: skip
    """The problem as a row-owning kernel sees it: rows are the queries, or with ``swap`` the
    documents (whose positive is query ``j - offset``). Returns ``(rows, cols, inv_rows,
    inv_cols, id pointers, id flags, diag_offset)``."""
    pointers, flags = _ids_arguments(query_ids, doc_ids, offset, query.shape[0], placeholder, swap)
    if swap:
        return doc, query, inv_doc, inv_query, pointers, flags, -offset
    return query, doc, inv_query, inv_doc, pointers, flags, offset


def _triton_stats_forward(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    offset: int,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, k), m = query.shape, doc.shape[0]
    f32 = dict(device=query.device, dtype=torch.float32)
    scale = scale.detach().to(**f32).reshape(1)
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    bound = scale  # |Z| <= t for unit vectors, else |Z| <= t * max|q| * max|d|
    if not normalize:
        for x in (query, doc):
            bound = bound * torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).max()
    shift = (bound - SHIFT_HEADROOM).clamp_min(0.0).reshape(1)
    row_sum, col_sum, pos = torch.zeros(n, **f32), torch.zeros(m, **f32), torch.zeros(n, **f32)

    tiles = _tile_sizes(_k_pad(k), query.element_size(), backward=False)
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    splits = _num_splits(n, m, block_m, block_n, query.device)
    id_pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, row_sum, swap=False)
    constants = dict(NORMALIZE=normalize, **tiles, **id_flags, **_kernel_flags(query))
    problem = (query, doc, inv_query, inv_doc, query_ids, doc_ids, offset, row_sum)
    _stats_fwd_kernel[(triton.cdiv(n, block_m), splits)](
        query, doc, inv_query, inv_doc, *id_pointers, scale, shift, row_sum, col_sum, pos,
        query.stride(0), query.stride(1), doc.stride(0), doc.stride(1),
        n, m, k, offset, splits, **constants,
    )  # fmt: skip
    neg_row = torch.log(row_sum) + shift
    neg_col = torch.log(col_sum) + shift

    # Rows and columns whose sum underflowed (or that have no negative): exact recomputation.
    for swap, sums, lse in ((False, row_sum, neg_row), (True, col_sum, neg_col)):
        redo = ((sums < TINY_SUM) | ~torch.isfinite(sums)).to(torch.int8)
        rows, cols, inv_rows, inv_cols, pointers, _, diag_offset = _oriented(*problem, swap)
        _online_lse_kernel[(triton.cdiv(rows.shape[0], block_m),)](
            rows, cols, inv_rows, inv_cols, *pointers, scale, redo, lse,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            rows.shape[0], cols.shape[0], k, diag_offset, **constants,
        )  # fmt: skip
    return neg_row, neg_col, pos


def _triton_stats_backward(
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
    offset: int,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, k), m = query.shape, doc.shape[0]
    f32 = dict(device=query.device, dtype=torch.float32)
    scale32 = scale.detach().to(**f32).reshape(1)
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    grad_neg_row, grad_neg_col, grad_pos = (
        g.to(**f32).contiguous() for g in (grad_neg_row, grad_neg_col, grad_pos)
    )
    # Seen from the documents, row j's positive is column j - offset (when 0 <= j - offset < N).
    grad_pos_of_docs = torch.zeros(m, **f32)
    grad_pos_of_docs[offset : offset + n] = grad_pos
    grad_query, grad_doc = torch.empty_like(query), torch.empty_like(doc)

    k_pad = _k_pad(k)
    tiles = _tile_sizes(k_pad, query.element_size(), backward=True)
    block_m = tiles["BLOCK_M"]
    scale_partials = torch.zeros(triton.cdiv(n, block_m), **f32)
    common = dict(K_PAD=k_pad, NORMALIZE=normalize, **tiles, **_kernel_flags(query))
    problem = (query, doc, inv_query, inv_doc, query_ids, doc_ids, offset, scale32)
    jobs = (  # (swap, row statistics, column statistics, their upstream gradients, output)
        (False, neg_row, neg_col, grad_neg_row, grad_neg_col, grad_pos, grad_query),
        (True, neg_col, neg_row, grad_neg_col, grad_neg_row, grad_pos_of_docs, grad_doc),
    )
    for swap, stat_rows, stat_cols, g_rows, g_cols, g_pos, out in jobs:
        rows, cols, inv_rows, inv_cols, pointers, id_flags, diag_offset = _oriented(*problem, swap)
        _stats_bwd_kernel[(triton.cdiv(rows.shape[0], block_m),)](
            rows, cols, inv_rows, inv_cols, *pointers, scale32,
            stat_rows.contiguous(), stat_cols.contiguous(), g_rows, g_cols, g_pos,
            out, scale_partials,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            out.stride(0), out.stride(1),
            rows.shape[0], cols.shape[0], k, diag_offset,
            SCALE_GRAD=not swap, **id_flags, **common,
        )  # fmt: skip
    return grad_query, grad_doc, scale_partials.sum().to(scale.dtype)


def _triton_logits_forward(
    logits: torch.Tensor, query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    block_m, block_n = (32, 32) if _INTERPRETING else (128, 64)
    row_blocks = triton.cdiv(n, block_m)
    neg_row = torch.empty(n, **f32)
    col_max, col_sum = torch.empty(row_blocks, n, **f32), torch.empty(row_blocks, n, **f32)
    placeholder = neg_row
    _logits_stats_kernel[(row_blocks,)](
        logits, placeholder if query_ids is None else query_ids.contiguous(),
        placeholder if doc_ids is None else doc_ids.contiguous(),
        neg_row, col_max, col_sum, logits.stride(0), logits.stride(1), n,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_QID=query_ids is not None,
        HAS_DID=doc_ids is not None,
    )  # fmt: skip
    # Merge the blocks' partial column statistics: lse = logsumexp_b (max_b + log sum_b).
    neg_col = torch.logsumexp(col_max + torch.log(col_sum), dim=0)
    return neg_row, neg_col, logits.diagonal().to(torch.float32, copy=True)


def _triton_logits_backward(
    logits: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    grad_neg_row: torch.Tensor,
    grad_neg_col: torch.Tensor,
    grad_pos: torch.Tensor,
) -> torch.Tensor:
    n = logits.shape[0]
    grad = torch.empty_like(logits)
    block = 32 if _INTERPRETING else 64
    placeholder = neg_row
    _logits_grad_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](
        logits, placeholder if query_ids is None else query_ids.contiguous(),
        placeholder if doc_ids is None else doc_ids.contiguous(),
        neg_row, neg_col, *(g.float().contiguous() for g in (grad_neg_row, grad_neg_col, grad_pos)),
        grad, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), n,
        BLOCK_M=block, BLOCK_N=block, HAS_QID=query_ids is not None, HAS_DID=doc_ids is not None,
    )  # fmt: skip
    return grad


# ==============================================================================================
# Custom ops (opaque to torch.compile) and autograd
# ==============================================================================================


def _block_elements(x: torch.Tensor) -> int:
    """Block size of the PyTorch path for ``x``'s device (read at call time: tests shrink it)."""
    return reference.CUDA_BLOCK_ELEMENTS if x.is_cuda else reference.BLOCK_ELEMENTS


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autocast stays outside: the statistics are computed in fp32 from the inputs as they are.
    with torch.autocast(query.device.type, enabled=False):
        if backend == "triton":
            return _triton_stats_forward(query, doc, scale, query_ids, doc_ids, offset, normalize)
        return reference.blockwise_stats_forward(
            query, doc, scale, query_ids, doc_ids, offset, normalize, _block_elements(query)
        )


@_gcl_stats_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, offset, normalize, backend):
    dtype = torch.float32 if backend == "triton" else query.dtype
    n, m = query.shape[0], doc.shape[0]
    return (
        query.new_empty(n, dtype=dtype),
        query.new_empty(m, dtype=dtype),
        query.new_empty(n, dtype=dtype),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
            grad_pos, offset, normalize)  # fmt: skip
    with torch.autocast(query.device.type, enabled=False):
        if backend == "triton":
            return _triton_stats_backward(*args)
        grad_query, grad_doc, grad_scale = reference.blockwise_stats_backward(
            *args, _block_elements(query)
        )
    return grad_query, grad_doc, grad_scale.to(scale.dtype)


@_gcl_stats_backward_op.register_fake
def _(query, doc, scale, *args):
    return torch.empty_like(query), torch.empty_like(doc), torch.empty_like(scale)


@torch.library.custom_op("gcl_ops::logits_stats", mutates_args=())
def _logits_stats_op(
    logits: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(logits.device.type, enabled=False):
        return _triton_logits_forward(logits, query_ids, doc_ids)


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
    with torch.autocast(logits.device.type, enabled=False):
        return _triton_logits_backward(
            logits, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col, grad_pos
        )


@_logits_stats_backward_op.register_fake
def _(logits, *args):
    return torch.empty_like(logits)


class _GCLStatsFunction(torch.autograd.Function):
    """``(neg_row, neg_col, pos)`` of ``Z = t * Q^ D^T``; saves only O(N) statistics."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, query, doc, scale, query_ids, doc_ids, offset, normalize, backend):
        neg_row, neg_col, pos = torch.ops.gcl_ops.gcl_stats(
            query, doc, scale, query_ids, doc_ids, offset, normalize, backend
        )
        ctx.save_for_backward(query, doc, scale, query_ids, doc_ids, neg_row, neg_col)
        ctx.offset, ctx.normalize, ctx.backend = offset, normalize, backend
        return neg_row, neg_col, pos

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_neg_row, grad_neg_col, grad_pos):
        query, doc, scale, query_ids, doc_ids, neg_row, neg_col = ctx.saved_tensors
        grad_query, grad_doc, grad_scale = torch.ops.gcl_ops.gcl_stats_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col,
            grad_neg_row, grad_neg_col, grad_pos, ctx.offset, ctx.normalize, ctx.backend,
        )  # fmt: skip
        return grad_query, grad_doc, grad_scale, None, None, None, None, None


class _LogitsStatsFunction(torch.autograd.Function):
    """``(neg_row, neg_col, pos)`` of a materialised square logits matrix (Triton path)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, logits, query_ids, doc_ids):
        neg_row, neg_col, pos = torch.ops.gcl_ops.logits_stats(logits, query_ids, doc_ids)
        ctx.save_for_backward(logits, query_ids, doc_ids, neg_row, neg_col)
        return neg_row, neg_col, pos

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_neg_row, grad_neg_col, grad_pos):
        logits, query_ids, doc_ids, neg_row, neg_col = ctx.saved_tensors
        grad = torch.ops.gcl_ops.logits_stats_backward(
            logits, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col, grad_pos
        )
        return grad, None, None


# ==============================================================================================
# Functional API and module
# ==============================================================================================


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (statistics and losses are never half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scale_tensor(
    logit_scale: float | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``logit_scale`` as a 0-dim tensor, keeping its autograd graph."""
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(float(logit_scale), dtype=dtype, device=device)


def resolve_backend(impl: str, x: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` and the ``(N, k)`` input ``x``; raises with the
    reason when ``impl="triton"`` cannot run."""
    _checks.check_choice(impl, _checks.IMPLS, "impl")
    if impl == "torch":
        return "torch"
    problem = None
    if not HAS_TRITON:
        problem = "triton is not installed"
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problem = f"the Triton kernels take fp32, fp16 or bf16, not {x.dtype}"
    elif x.shape[-1] > MAX_TRITON_K:
        problem = f"the Triton kernels take k <= {MAX_TRITON_K}, got k = {x.shape[-1]}"
    elif x.device.type == "cpu" and not interpreting(_stats_fwd_kernel):
        problem = (
            "CPU tensors run the Triton kernels only under the interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    elif x.device.type not in ("cpu", "cuda"):
        problem = f"no Triton kernels for device {x.device.type}"
    if impl == "triton" and problem is not None:
        raise ValueError(f"impl='triton' cannot run here: {problem}")
    if impl == "auto" and (problem is not None or x.device.type != "cuda"):
        return "torch"
    return "triton"


def gcl_stats(
    query: torch.Tensor,
    doc: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics of ``Z = t * Q^ @ D^.T`` that the loss needs, without materialising ``Z``.

    No input checks (``gcl_loss`` makes them); this is the layer the loss, the distributed loss
    and the tests build on.

    Args:
        query: ``(N, k)`` row embeddings.
        doc: ``(M, k)`` column embeddings, ``M >= offset + N``.
        logit_scale: ``t``, a float or a 0-dim tensor (differentiable).
        query_ids, doc_ids: ``(M,)`` integer ids of the columns, or None; row ``i`` has the ids
            of column ``offset + i``, and an entry whose query or document id matches is not a
            negative.
        offset: the column of row 0's positive.
        normalize: L2-normalise rows and columns on the fly.
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``neg_row (N,)``, ``neg_col (M,)``: log-sum-exp over each row's and column's negatives
        (``-inf`` if none); ``pos (N,) = Z[i, offset + i]``. All differentiable; fp32 (fp64 for
        fp64 inputs on the PyTorch path).

    Equivalent PyTorch: ``gcl_ops.reference.naive_gcl_stats(query, doc, t, ...)``.
    """
    backend = resolve_backend(impl, query)
    query, doc, dtype = _prepare_embeddings(query, doc, backend)
    scale = _scale_tensor(logit_scale, dtype, query.device)
    return _GCLStatsFunction.apply(
        query, doc, scale, query_ids, doc_ids, offset, normalize, backend
    )


def per_pair_loss(
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    positive_logits: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of each pair, all ``(N,)``:
    ``w_i / 2 * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))``
    (``= -w_i / 2 * (log P_row[i, i] + log P_col[i, i])``)."""
    loss = 0.5 * (_softplus(neg_row - positive_logits) + _softplus(neg_col - positive_logits))
    return loss if weights is None else weights.to(loss.dtype) * loss


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` to full precision everywhere (``F.softplus`` returns ``x`` above 20,
    off by ``exp(-20) = 2e-9``)."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _prepare_embeddings(
    query: torch.Tensor, doc: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Both inputs in one dtype the backend takes, and the dtype of the statistics."""
    if backend == "torch":
        dtype = _compute_dtype(query, doc)
        return query.to(dtype), doc.to(dtype), dtype
    common = torch.promote_types(query.dtype, doc.dtype)
    return query.to(common), doc.to(common), torch.float32


def _check_loss_inputs(
    query, doc, weights, logit_scale, query_ids, doc_ids, reduction, normalize, validate
) -> None:
    _checks.check_embeddings(query, "query")
    n, k = query.shape
    _checks.check_embeddings(doc, "doc", rows=n, width=k)
    _checks.check_weights(weights, n, validate)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_logit_scale(logit_scale, validate)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    _checks.check_same_device(
        query=query, doc=doc, weights=weights, query_ids=query_ids, doc_ids=doc_ids,
        logit_scale=logit_scale if isinstance(logit_scale, torch.Tensor) else None,
    )  # fmt: skip
    if _checks.should_validate(validate):
        _checks.check_values(query, "query", nonzero_rows=normalize)
        _checks.check_values(doc, "doc", nonzero_rows=normalize)


def gcl_loss(
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
) -> torch.Tensor:
    """Weighted bidirectional contrastive loss of GCL, without materialising the N x N matrix.

    Args:
        query: ``(N, k)`` query embeddings (fp32, fp16, bf16 or fp64).
        doc: ``(N, k)`` document embeddings; pair ``i`` is ``(query[i], doc[i])``.
        weights: ``(N,)`` non-negative pair weights (``score_to_weight``), or None for all ones
            (then the loss is exactly open_clip's ``ClipLoss``).
        logit_scale: ``t > 0``, already exponentiated (open_clip's ``logit_scale.exp()``); a float
            or a 0-dim tensor, which receives a gradient when it requires one.
        query_ids, doc_ids: ``(N,)`` integer ids, or None. An off-diagonal pair ``(i, j)`` with
            ``query_ids[i] == query_ids[j]`` or ``doc_ids[i] == doc_ids[j]`` is left out of both
            softmax denominators: it is another positive, not a negative.
        reduction: ``"mean"`` (default, the paper's ``1/2N``), ``"sum"`` or ``"none"`` (``(N,)``
            per-pair losses ``-w_i/2 * (log P_row[i, i] + log P_col[i, i])``).
        normalize: L2-normalise the embeddings first (default True; idempotent on unit vectors).
        impl: ``"auto"`` (default: the fused Triton kernels for CUDA tensors of fp32/fp16/bf16
            with ``k <= 1024``, the blocked PyTorch path otherwise), ``"triton"`` or ``"torch"``.
        validate: check values (NaN, negative weights, zero rows, scale); one device sync.

    Returns:
        A scalar in the statistics' dtype (fp64 for fp64 inputs on the PyTorch path, else fp32),
        or ``(N,)``.

    Equivalent PyTorch::

        z = logit_scale * F.normalize(query) @ F.normalize(doc).T
        loss = -(w * (z.log_softmax(1).diag() + z.log_softmax(0).diag())).mean() / 2
    """
    _check_loss_inputs(
        query, doc, weights, logit_scale, query_ids, doc_ids, reduction, normalize, validate
    )
    neg_row, neg_col, positive_logits = gcl_stats(
        query, doc, logit_scale, query_ids=query_ids, doc_ids=doc_ids, normalize=normalize,
        impl=impl,
    )  # fmt: skip
    return reduce_loss(per_pair_loss(neg_row, neg_col, positive_logits, weights), reduction)


def gcl_loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The GCL loss from a similarity matrix the caller already holds.

    Args:
        logits: ``(N, N)`` scaled similarities, ``logits[i, j]`` = query ``i`` vs document ``j``.
        weights, query_ids, doc_ids, reduction, validate: as in ``gcl_loss``.
        impl: ``"auto"`` (default: Triton for CUDA fp32/fp16/bf16 matrices: one read of the
            matrix for both log-sum-exps, one pass to write the gradient), ``"triton"`` or
            ``"torch"`` (PyTorch ops on the matrix).

    Returns:
        A scalar (fp32, or fp64 for fp64 logits), or ``(N,)`` for ``reduction="none"``.

    Equivalent PyTorch:
    ``-(w * (logits.log_softmax(1).diag() + logits.log_softmax(0).diag())).mean() / 2``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (N, N) matrix, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("logits is an empty batch (N = 0): the loss needs at least one pair")
    _checks.check_weights(weights, n, validate)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if _checks.should_validate(validate):
        _checks.check_values(logits, "logits")

    if resolve_backend(impl, logits) == "triton":
        neg_row, neg_col, positive_logits = _LogitsStatsFunction.apply(logits, query_ids, doc_ids)
    else:
        z = logits.to(_compute_dtype(logits))
        neg_row, neg_col = naive_masked_lse(z, query_ids, doc_ids)
        positive_logits = z.diagonal()
    return reduce_loss(per_pair_loss(neg_row, neg_col, positive_logits, weights), reduction)


class GCLLoss(nn.Module):
    """Drop-in replacement for open_clip's ``ClipLoss`` that also takes pair weights.

    ``forward(image_features, text_features, logit_scale, weights=None, output_dict=False)``
    treats ``image_features`` as the row side (queries) and ``text_features`` as the column side
    (documents); the loss is symmetric in the two when no ids are given. With ``weights=None`` it
    equals ``ClipLoss`` on the same features and scale.

    open_clip passes features that are already unit-norm. With the default ``normalize=True`` the
    value is then identical to ``ClipLoss`` and so are the model's parameter gradients (the
    model's own normalisation removes the radial component that re-normalising here drops); pass
    ``normalize=False`` to match ``ClipLoss`` also in the gradient w.r.t. the features themselves.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        normalize: L2-normalise the features first (default True).
        impl: backend, as in ``gcl_loss``.
        validate: run value checks (one device sync per call).
        distributed: each rank passes its own pairs and the loss is that of the global batch
            (``gcl_ops.distributed.distributed_gcl_loss``: documents gathered with gradient,
            values scaled for DDP's gradient averaging), like open_clip's
            ``gather_with_grad=True, local_loss=True``. Default False.
        group: the process group for ``distributed`` (default: the world).
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        *,
        normalize: bool = True,
        impl: Impl = "auto",
        validate: bool = True,
        distributed: bool = False,
        group: object | None = None,
    ) -> None:
        super().__init__()
        _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
        _checks.check_choice(impl, _checks.IMPLS, "impl")
        self.reduction, self.normalize, self.impl = reduction, normalize, impl
        self.validate, self.distributed, self.group = validate, distributed, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        weights: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        query_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        options = dict(
            query_ids=query_ids, doc_ids=doc_ids, reduction=self.reduction,
            normalize=self.normalize, impl=self.impl, validate=self.validate,
        )  # fmt: skip
        if self.distributed:
            from gcl_ops.distributed import distributed_gcl_loss

            loss = distributed_gcl_loss(
                image_features, text_features, weights, logit_scale, group=self.group, **options
            )
        else:
            loss = gcl_loss(image_features, text_features, weights, logit_scale, **options)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, normalize={self.normalize}, impl={self.impl!r}, "
            f"distributed={self.distributed}"
        )
