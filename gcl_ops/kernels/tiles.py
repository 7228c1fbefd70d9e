"""Shared Triton tile helpers of the GCL kernels: pointers and offsets, the cosine tile
``S = R^ C^T`` with its negative and positive masks, and the constants the kernels share.

Every ``@triton.jit`` kernel in ``gcl_ops.kernels`` builds on these; nothing here launches.
"""

from gcl_ops._triton import interpreting, tl, triton

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)), x already a difference
LN2 = tl.constexpr(0.6931471805599453)
#: The fp16 backward scales ``dS`` by ``2^e`` before the cast, ``|e|`` at most this: a row block
#: whose bound on ``|dS|`` is below ``2^(14 - 100)`` (8e-27) is scaled by 2^100 only.
MAX_FP16_EXPONENT = tl.constexpr(100)


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
#: Whether one ``tl.dot`` over ``K`` columns rounds exactly like a loop of ``tl.dot`` over its
#: slices into the same accumulator: on the GPU (tensor-core k steps or FMAs in order either
#: way); the interpreter's numpy GEMM sums a wide product in its own order.
CHAINED_DOT = tl.constexpr(not interpreting(_fma_probe))


@triton.jit
def _power_of_two(exponent):
    """``2^exponent`` exactly, for int32 ``exponent`` in fp32's normal range [-126, 127]: the
    biased exponent written straight into the float's bits."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp16_exponent(bound):
    """``e`` with ``bound 2^e`` in ``[2^13, 2^14)``, clamped to ``[-100, 100]``, for ``bound > 0``
    (``floor(log2 x)`` of a normal fp32 ``x`` is its biased exponent ``bits >> 23`` minus 127)."""
    bits = tl.maximum(bound, 1e-30).to(tl.int32, bitcast=True)
    exponent = 140 - (bits >> 23)
    return tl.minimum(tl.maximum(exponent, -MAX_FP16_EXPONENT), MAX_FP16_EXPONENT)
