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

import contextlib
from typing import Literal, Optional

import torch
from torch import nn

from gcl_ops import _checks, reference
from gcl_ops._triton import HAS_TRITON, interpreting, tl, triton
from gcl_ops.reference import (  # the fixed shift and the underflow threshold: one place
    SHIFT_HEADROOM,
    TINY_SUM,
    Reduction,
    naive_masked_lse,
    reduce_loss,
)

Impl = Literal["auto", "triton", "torch"]

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)), x already a difference
LN2 = tl.constexpr(0.6931471805599453)
#: The Triton path keeps whole embedding rows on chip; wider embeddings take the PyTorch path.
MAX_TRITON_K = 1024
#: The fp16 backward scales ``dS`` by ``2^e`` before the cast, ``|e|`` at most this: a row block
#: whose bound on ``|dS|`` is below ``2^(14 - 100)`` (8e-27) is scaled by 2^100 only.
MAX_FP16_EXPONENT = tl.constexpr(100)


# ==============================================================================================
# Triton kernels
# ==============================================================================================


@triton.jit
def _row_offsets(rows, cols, stride_n, stride_m):
    """Element offsets ``rows_i stride_n + cols_j stride_m`` of a tile: the row part in int64
    (``rows * stride_n`` passes 2^31 in a large matrix), the column part in int32, which the
    launchers keep in range (``_fit_int32_offsets``): 64-bit per-element products cost
    registers the widest tiles do not have."""
    return rows.to(tl.int64)[:, None] * stride_n + (cols * stride_m)[None, :]


@triton.jit
def _tile_pointers(ptr, row_start, col_start, stride_n, stride_m,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Pointers to the ``(BLOCK_M, BLOCK_N)`` tile at ``(row_start, col_start)`` of a matrix: the
    tile's origin ``row_start stride_n + col_start stride_m`` in int64 (a transposed ``(N, N)``
    matrix has ``stride_m = N``, and ``col_start N`` passes 2^31 from N = 46,341), the offsets
    within the tile in int32, which the launchers keep in range (``_fit_int32_offsets``)."""
    origin = ptr + tl.cast(row_start, tl.int64) * stride_n + tl.cast(col_start, tl.int64) * stride_m
    within = tl.arange(0, BLOCK_M)[:, None] * stride_n + tl.arange(0, BLOCK_N)[None, :] * stride_m
    return origin + within


@triton.jit
def _load_rows(ptr, rows, stride_n, stride_k, n, k, K_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of an ``(n, k)`` matrix as a ``(len(rows), K_PAD)`` tile, zero-padded."""
    offs_k = tl.arange(0, K_PAD)
    mask = (rows < n)[:, None] & (offs_k < k)[None, :]
    tile = tl.load(
        ptr + _row_offsets(rows, offs_k, stride_n, stride_k),
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
    accumulator. fp32 operands are normalised before the GEMM (each slice times its rows' and
    columns' ``1/|x|``), half operands after it (``* (1/|r_i| 1/|c_j|)``). Offsets as in
    ``_row_offsets``: rows in int64, ``k`` in int32.

    Either way ``S_ij`` comes out bitwise the same with rows and columns swapped. The column
    statistics are computed with documents as rows (_online_lse_kernel, backward), and
    P = exp(Z - lse) is exact only where lse saw the very Z the backward recomputes (a column
    with one negative has lse = Z and P = 1; a one-ulp mismatch in S costs t ulp(S) in P, ~1e-5
    at t = 175, times t again in the gradient). Normalising first: ``x_k (1/|x|)`` is the same
    product from either side. After the GEMM: the product of the inverse norms first, which is
    commutative."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_rn
    col_offsets = cols.to(tl.int64)[:, None] * stride_cn
    rows_ok = (rows < n_rows)[:, None]
    cols_ok = (cols < n_cols)[:, None]
    # fp32: S = sum_k r^_k c^_k rounds like a dot of normalised vectors (the naive computation),
    # where scaling after the GEMM would add one rounding of |r||c| S to every entry: noise of
    # t ulp(S) in Z at large t, which d t = sum dZ S sums up (2e-6 against 9e-5 at t = 316).
    # Half operands stay as they are: normalised, they would be rounded to the half type again.
    SCALE_OPERANDS: tl.constexpr = rows_ptr.dtype.element_ty == tl.float32
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
        if NORMALIZE and SCALE_OPERANDS:
            row_slice = row_slice * inv_rows[:, None]
            col_slice = col_slice * inv_cols[:, None]
        accumulator = tl.dot(row_slice, tl.trans(col_slice), accumulator,
                             input_precision=INPUT_PRECISION)  # fmt: skip
    if NORMALIZE and not SCALE_OPERANDS:
        accumulator = accumulator * (inv_rows[:, None] * inv_cols[None, :])
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
def _fma_probe():
    pass


#: Whether ``tl.fma`` is fused (one rounding): on the GPU; the interpreter rounds the product.
FUSED_FMA = tl.constexpr(not interpreting(_fma_probe))


@triton.jit
def _stats_fwd_kernel(
    rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scale_ptr, shift_ptr,  # device scalars t and the fixed shift in cosine units, shift / t
    row_sum_ptr, col_sum_ptr, pos_ptr,  # outputs, zero-initialised, accumulated atomically
    stride_rn, stride_rk, stride_cn, stride_ck,  # strides
    n_rows, n_cols, k, diag_offset, num_splits,  # sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program ``(m, s)``: rows block ``m`` against column tiles ``s, s + num_splits, ...``.

    row_sum_i += sum_j exp(t (S_ij - sigma)), col_sum_j += sum_i exp(t (S_ij - sigma)) over
    negatives, with ``sigma = shift / t``; pos_i = Z_{i, i + diag_offset}.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    inv_rows = tl.load(inv_rows_ptr + rows, mask=rows_ok, other=1.0) if NORMALIZE else None
    scale = tl.load(scale_ptr).to(tl.float32)
    shift_cosine = tl.load(shift_ptr).to(tl.float32)
    # t log2(e) as two fp32 parts (from the launcher, in float64): one fp32 product would be off
    # by up to 6e-8 relative, 5e-6 absolute at exponents near the headroom (92 in base 2).
    exp_scale = tl.load(shift_ptr + 1).to(tl.float32)
    exp_scale_lo = tl.load(shift_ptr + 2).to(tl.float32)

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
        tl.atomic_add(col_sum_ptr + cols, tl.sum(shifted, axis=0), mask=cols_ok)
        positive_cosine += tl.sum(tl.where(positive, cosines, 0.0), axis=1)
    tl.atomic_add(row_sum_ptr + rows, row_sum, mask=rows_ok)
    tl.atomic_add(pos_ptr + rows, positive_cosine * scale, mask=rows_ok)


@triton.jit
def _finish_lse(running_max, running_sum):
    """Log-sum-exp ``max + log(sum)`` from a running maximum and the sum of ``exp(x - max)``;
    -inf for an empty sum."""
    lse = running_max + tl.log2(tl.maximum(running_sum, 1e-38)) * LN2
    return tl.where(running_sum == 0.0, float("-inf"), lse)


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


@triton.jit
def _power_of_two(exponent):
    """``2^exponent`` exactly, for int32 ``exponent`` in fp32's normal range [-126, 127]: the
    biased exponent written straight into the float's bits."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


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
        # Columns: this block's partial statistics, merged by a log-sum-exp afterwards.
        col_max = tl.max(logits, axis=0)
        safe_col_max = tl.where(col_max == float("-inf"), 0.0, col_max)
        col_sum = tl.sum(tl.exp2((logits - safe_col_max[None, :]) * LOG2E), axis=0)
        partial = pid.to(tl.int64) * n + cols
        tl.store(col_max_ptr + partial, col_max, mask=cols < n)
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


def _allow_tf32() -> bool:
    """Whether the user lets fp32 matmuls use TF32. The newer setting
    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none": defer to the legacy
    one) comes first: once it is set, the legacy ``torch.get_float32_matmul_precision()`` raises."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _kernel_flags(x: torch.Tensor) -> dict:
    """Compile-time switches that depend on the dtype and the user's fp32 matmul setting."""
    return dict(
        INPUT_PRECISION="tf32" if _allow_tf32() else "ieee",
        UPCAST=_INTERPRETING and x.dtype == torch.bfloat16,
    )


#: Offsets within a tile are int32 (``_row_offsets``, ``_tile_pointers``): each launcher makes
#: sure that ``sum_d (extent_d - 1) stride_d`` fits, over the extents a tile spans.
_INT32_OFFSETS = 2**31


def _fit_int32_offsets(x: torch.Tensor, *extents: int) -> torch.Tensor:
    """``x``, or a contiguous copy of it where the int32 offsets within a tile could overflow:
    a tile spans ``extents[d]`` indices along dimension ``d`` (0 for a dimension the kernel
    addresses in int64). Only odd layouts copy, such as an ``(N, k)`` view of a ``(k, N)``
    matrix with N above 2^31 / k; a contiguous operand has ``(k - 1) * 1`` or, for an
    ``(N, N)`` logits matrix, ``127 (N + 1)``, far inside int32 at any size that fits memory."""
    span = sum(max(extent - 1, 0) * stride for extent, stride in zip(extents, x.stride()))
    return x if span < _INT32_OFFSETS else x.contiguous()


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device: make it ``x``'s (nothing to do on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos)`` and, for the backward, ``lse / t`` of the rows and of the
    columns as ``(2, N)`` / ``(2, M)`` fp32 pairs ``hi + lo`` (``_lse_parts``)."""
    (n, k), m = query.shape, doc.shape[0]
    query, doc = _fit_int32_offsets(query, 0, k), _fit_int32_offsets(doc, 0, k)
    f32 = dict(device=query.device, dtype=torch.float32)
    scale = scale.detach().to(**f32).reshape(1)
    scale64 = scale.double()
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    bound = scale64  # |Z| <= t for unit vectors, else |Z| <= t * max|q| * max|d|
    if not normalize:
        for x in (query, doc):
            bound = bound * torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).max()
    # The shift in cosine units, sigma = shift / t (the kernels subtract it from S, not Z).
    shift_cosine = ((bound - SHIFT_HEADROOM).clamp_min(0.0) / scale64).float().reshape(1)
    exp_scale64 = scale64 * 1.4426950408889634  # t log2(e), as hi + lo for the kernel
    exp_scale = exp_scale64.float()
    exp_scale_lo = (exp_scale64 - exp_scale.double()).float()
    shift_arguments = torch.cat([shift_cosine, exp_scale.reshape(1), exp_scale_lo.reshape(1)])
    row_sum, col_sum, pos = torch.zeros(n, **f32), torch.zeros(m, **f32), torch.zeros(n, **f32)

    tiles = _tile_sizes(_k_pad(k), query.element_size(), backward=False)
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    splits = _num_splits(n, m, block_m, block_n, query.device)
    id_pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, row_sum, swap=False)
    constants = dict(NORMALIZE=normalize, **tiles, **id_flags, **_kernel_flags(query))
    problem = (query, doc, inv_query, inv_doc, query_ids, doc_ids, offset, row_sum)
    _stats_fwd_kernel[(triton.cdiv(n, block_m), splits)](
        query, doc, inv_query, inv_doc, *id_pointers, scale, shift_arguments, row_sum, col_sum, pos,
        query.stride(0), query.stride(1), doc.stride(0), doc.stride(1),
        n, m, k, offset, splits, **constants,
    )  # fmt: skip
    # lse = t sigma + log(sum) in float64, rounded to fp32 once (the output) and split into two
    # fp32 parts for the backward: at |lse| ~ 300 one fp32 rounding is up to 1.5e-5, a relative
    # error of every P = exp(Z - lse) that the backward would sum up t-fold.
    shift64 = scale64 * shift_cosine.double()
    results = []
    for swap, sums in ((False, row_sum), (True, col_sum)):
        lse = torch.log(sums.double()) + shift64
        # Rows and columns whose sum underflowed (or that have no negative): exact recomputation
        # with a running maximum, finished here in float64 as well.
        redo = (sums < TINY_SUM) | ~torch.isfinite(sums)
        parts = torch.zeros(2, sums.shape[0], **f32)  # (max cosine, sum) where redo
        rows, cols, inv_rows, inv_cols, pointers, _, diag_offset = _oriented(*problem, swap)
        _online_lse_kernel[(triton.cdiv(rows.shape[0], block_m),)](
            rows, cols, inv_rows, inv_cols, *pointers, scale, redo.to(torch.int8), parts,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            rows.shape[0], cols.shape[0], k, diag_offset, **constants,
        )  # fmt: skip
        recomputed = scale64 * parts[0].double() + torch.log(parts[1].double())
        recomputed = torch.where(parts[1] > 0, recomputed, float("-inf"))
        lse = torch.where(redo, recomputed, lse)
        results.append((lse.float(), _lse_parts(lse, scale64)))
    (neg_row, row_parts), (neg_col, col_parts) = results
    return neg_row, neg_col, pos, row_parts, col_parts


def _lse_parts(lse: torch.Tensor, scale64: torch.Tensor) -> torch.Tensor:
    """``lse / t`` (0 where ``lse`` is infinite: no negative, nothing reads it) as a ``(2, len)``
    fp32 pair ``hi + lo``, from float64."""
    cosine = torch.where(torch.isfinite(lse), lse.double() / scale64, 0.0)
    hi = cosine.float()
    return torch.stack([hi, (cosine - hi.double()).float()])


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
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    row_parts: torch.Tensor | None = None,
    col_parts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)``; one launch per side, only for the sides in ``needs_grad``
    (a skipped gradient comes back as an empty tensor). ``d scale = sum_ij dZ_ij S_ij`` rides on
    the first launch. ``row_parts``, ``col_parts``: the forward's float64 log-sum-exps as
    ``_lse_parts``; without them, those of the fp32 ``neg_row``, ``neg_col``."""
    (n, k), m = query.shape, doc.shape[0]
    # The gradients are allocated like the (possibly copied) inputs: the same offsets.
    query, doc = _fit_int32_offsets(query, 0, k), _fit_int32_offsets(doc, 0, k)
    f32 = dict(device=query.device, dtype=torch.float32)
    scale32 = scale.detach().to(**f32).reshape(1)
    if row_parts is None or col_parts is None:
        row_parts, col_parts = (_lse_parts(lse, scale32.double()) for lse in (neg_row, neg_col))
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    grad_neg_row, grad_neg_col, grad_pos = (
        g.to(**f32).contiguous() for g in (grad_neg_row, grad_neg_col, grad_pos)
    )
    # Seen from the documents, row j's positive is column j - offset (when 0 <= j - offset < N).
    grad_pos_of_docs = torch.zeros(m, **f32)
    grad_pos_of_docs[offset : offset + n] = grad_pos
    need_query, need_doc, need_scale = needs_grad
    if need_scale and not (need_query or need_doc):
        need_query = True  # d scale comes out of a gradient pass
    grad_query = torch.empty_like(query) if need_query else query.new_empty(0)
    grad_doc = torch.empty_like(doc) if need_doc else doc.new_empty(0)

    k_pad = _k_pad(k)
    tiles = _tile_sizes(k_pad, query.element_size(), backward=True)
    block_m = tiles["BLOCK_M"]
    common = dict(K_PAD=k_pad, NORMALIZE=normalize, **tiles, **_kernel_flags(query))
    problem = (query, doc, inv_query, inv_doc, query_ids, doc_ids, offset, scale32)
    jobs = (  # (swap, row statistics, column statistics, their upstream gradients, output)
        (False, row_parts, col_parts, grad_neg_row, grad_neg_col, grad_pos, grad_query),
        (True, col_parts, row_parts, grad_neg_col, grad_neg_row, grad_pos_of_docs, grad_doc),
    )
    jobs = [job for job, needed in zip(jobs, (need_query, need_doc)) if needed]
    grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    for launch, (swap, stat_rows, stat_cols, g_rows, g_cols, g_pos, out) in enumerate(jobs):
        rows, cols, inv_rows, inv_cols, pointers, id_flags, diag_offset = _oriented(*problem, swap)
        scale_partials = torch.zeros(triton.cdiv(rows.shape[0], block_m), **f32)
        scalars = scale32
        if rows.dtype == torch.float16:  # the bound of the fp16 rescaling (see the kernel)
            col_weights = inv_cols if normalize else torch.ones_like(inv_cols)
            scalars = torch.cat([scale32, col_weights.max().reshape(1),
                                 (g_cols.abs() * col_weights).max().reshape(1)])  # fmt: skip
        _stats_bwd_kernel[(triton.cdiv(rows.shape[0], block_m),)](
            rows, cols, inv_rows, inv_cols, *pointers, scalars,
            stat_rows.contiguous(), stat_cols.contiguous(), g_rows, g_cols, g_pos,
            out, scale_partials,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            out.stride(0), out.stride(1),
            rows.shape[0], cols.shape[0], k, diag_offset,
            SCALE_GRAD=need_scale and launch == 0, **id_flags, **common,
        )  # fmt: skip
        if launch == 0:
            grad_scale = scale_partials.sum().to(scale.dtype)
    return grad_query, grad_doc, grad_scale


def _triton_logits_forward(
    logits: torch.Tensor, query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    block_m, block_n = (32, 32) if _INTERPRETING else (128, 64)
    logits = _fit_int32_offsets(logits, block_m, block_n)
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
    block = 32 if _INTERPRETING else 64
    logits = _fit_int32_offsets(logits, block, block)
    grad = torch.empty_like(logits)  # a dense logits' strides, else contiguous: in range too
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos, row_parts, col_parts)``: the last two only for the backward,
    the Triton path's ``lse / t`` in two fp32 parts (``(2, N)``, ``(2, M)``; empty on the
    PyTorch path)."""
    # Autocast stays outside: the statistics are computed in fp32 from the inputs as they are.
    with torch.autocast(query.device.type, enabled=False), _on_device(query):
        if backend == "triton":
            return _triton_stats_forward(query, doc, scale, query_ids, doc_ids, offset, normalize)
        neg_row, neg_col, pos = reference.blockwise_stats_forward(
            query, doc, scale, query_ids, doc_ids, offset, normalize, _block_elements(query)
        )
        unused = query.new_empty(0, dtype=torch.float32)
        return neg_row, neg_col, pos, unused, unused.clone()


@_gcl_stats_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, offset, normalize, backend):
    dtype = torch.float32 if backend == "triton" else query.dtype
    n, m = query.shape[0], doc.shape[0]
    triton_path = backend == "triton"
    return (
        query.new_empty(n, dtype=dtype),
        query.new_empty(m, dtype=dtype),
        query.new_empty(n, dtype=dtype),
        query.new_empty((2, n) if triton_path else (0,), dtype=torch.float32),
        query.new_empty((2, m) if triton_path else (0,), dtype=torch.float32),
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
    needs_query_grad: bool = True,
    needs_doc_grad: bool = True,
    needs_scale_grad: bool = True,
    row_parts: Optional[torch.Tensor] = None,  # noqa: UP045
    col_parts: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)``; a gradient not needed comes back empty (``(0,)``) and is
    not computed (the Triton path skips its pass, the PyTorch path its GEMM).
    ``row_parts``, ``col_parts``: the forward's, for the Triton path."""
    args = (query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
            grad_pos, offset, normalize)  # fmt: skip
    needs_grad = (needs_query_grad, needs_doc_grad, needs_scale_grad)
    with torch.autocast(query.device.type, enabled=False), _on_device(query):
        if backend == "triton":
            grad_query, grad_doc, grad_scale = _triton_stats_backward(
                *args, needs_grad, row_parts, col_parts
            )
        else:
            grad_query, grad_doc, grad_scale = reference.blockwise_stats_backward(
                *args, _block_elements(query), need_query=needs_query_grad,
                need_doc=needs_doc_grad, need_scale=needs_scale_grad,
            )  # fmt: skip
    if not needs_query_grad:
        grad_query = query.new_empty(0)
    if not needs_doc_grad:
        grad_doc = doc.new_empty(0)
    return grad_query, grad_doc, grad_scale.to(scale.dtype)


@_gcl_stats_backward_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
      grad_pos, offset, normalize, backend, needs_query_grad=True, needs_doc_grad=True,
      needs_scale_grad=True, row_parts=None, col_parts=None):  # fmt: skip
    return (
        torch.empty_like(query) if needs_query_grad else query.new_empty(0),
        torch.empty_like(doc) if needs_doc_grad else doc.new_empty(0),
        torch.empty_like(scale),
    )


@torch.library.custom_op("gcl_ops::logits_stats", mutates_args=())
def _logits_stats_op(
    logits: torch.Tensor,
    query_ids: Optional[torch.Tensor],  # noqa: UP045
    doc_ids: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(logits.device.type, enabled=False), _on_device(logits):
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
    with torch.autocast(logits.device.type, enabled=False), _on_device(logits):
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
        neg_row, neg_col, pos, row_parts, col_parts = torch.ops.gcl_ops.gcl_stats(
            query, doc, scale, query_ids, doc_ids, offset, normalize, backend
        )
        ctx.save_for_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col, row_parts, col_parts
        )
        ctx.offset, ctx.normalize, ctx.backend = offset, normalize, backend
        return neg_row, neg_col, pos

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_neg_row, grad_neg_col, grad_pos):
        query, doc, scale, query_ids, doc_ids, neg_row, neg_col, row_parts, col_parts = (
            ctx.saved_tensors
        )
        # A frozen side (say, a fixed document tower) gets no gradient pass at all.
        needs_query, needs_doc, needs_scale = ctx.needs_input_grad[:3]
        grad_query, grad_doc, grad_scale = torch.ops.gcl_ops.gcl_stats_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col,
            grad_neg_row, grad_neg_col, grad_pos, ctx.offset, ctx.normalize, ctx.backend,
            needs_query, needs_doc, needs_scale, row_parts, col_parts,
        )  # fmt: skip
        return (
            grad_query if needs_query else None,
            grad_doc if needs_doc else None,
            grad_scale if needs_scale else None,
            None, None, None, None, None,
        )  # fmt: skip


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
    _checks.check_weights(weights, n, validate=False)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_logit_scale(logit_scale, validate=False)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    _checks.check_same_device(
        query=query, doc=doc, weights=weights, query_ids=query_ids, doc_ids=doc_ids,
        logit_scale=logit_scale if isinstance(logit_scale, torch.Tensor) else None,
    )  # fmt: skip
    if _checks.should_validate(validate):  # one device synchronisation for all of them
        _checks.check_all_values(
            [("query", query, normalize), ("doc", doc, normalize)], weights, logit_scale
        )


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
    _checks.check_weights(weights, n, validate=False)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if _checks.should_validate(validate):  # one device synchronisation
        _checks.check_all_values([("logits", logits, False)], weights)

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
