"""Shared Triton tile helpers of the GCL kernels: offsets, the cosine tile ``S = R^ C^T`` with its
negative and positive masks, and the constants the kernels share. Nothing here launches.
"""

from gcl_ops._triton import tl, triton

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)), x already a difference
#: The fp16 backward scales ``dS`` by ``2^e`` before the cast, ``|e|`` at most this.
MAX_FP16_EXPONENT = tl.constexpr(100)


@triton.jit
def _row_offsets(rows, cols, stride_n, stride_m):
    """Element offsets ``rows_i stride_n + cols_j stride_m`` of a tile: the row part in int64
    (``rows * stride_n`` passes 2^31 in a large matrix), the column part in int32 (the launchers
    keep it in range: ``_fit_int32_offsets``)."""
    return rows.to(tl.int64)[:, None] * stride_n + (cols * stride_m)[None, :]


@triton.jit
def _tile_pointers(ptr, row_start, col_start, stride_n, stride_m,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Pointers to the ``(BLOCK_M, BLOCK_N)`` tile at ``(row_start, col_start)``: the origin in
    int64 (a transposed ``(N, N)`` matrix has ``stride_m = N``), the offsets within in int32."""
    origin = ptr + tl.cast(row_start, tl.int64) * stride_n + tl.cast(col_start, tl.int64) * stride_m
    within = tl.arange(0, BLOCK_M)[:, None] * stride_n + tl.arange(0, BLOCK_N)[None, :] * stride_m
    return origin + within


@triton.jit
def _round_to_tf32(x):
    """``x`` rounded to the nearest TF32 value (10 mantissa bits, ties away from zero), as an fp32.

    A TF32 GEMM rounds or truncates its fp32 operands depending on where the operand comes from
    (registers or shared memory) and on the architecture. Operands that already are TF32 values
    make every GEMM of every kernel see the same numbers: their products are exact in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = ~0x1FFF


@triton.jit
def _operand(x, inv_norms, SCALE: tl.constexpr, UPCAST: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """A loaded ``(rows, k)`` tile as a GEMM operand: fp32 tiles scaled by their rows' ``1/|x|``
    (with ``SCALE``) and rounded to TF32 (for TF32 GEMMs); bf16 upcast under the interpreter,
    which cannot ``tl.dot`` bf16 operands (triton-lang/triton#11584)."""
    if UPCAST:
        x = x.to(tl.float32)
    if SCALE:
        x = x * inv_norms[:, None]
    if INPUT_PRECISION == "tf32":
        x = _round_to_tf32(x)
    return x


@triton.jit
def _cosine_tile(
    rows_ptr, cols_ptr, rows, cols, inv_rows, inv_cols,
    stride_rn, stride_rk, stride_cn, stride_ck, n_rows, n_cols, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``S = R^ C^T`` for one tile: a GEMM over ``k`` in ``BLOCK_K`` slices, fp32 accumulator.
    fp32 operands are normalised before the GEMM (the naive rounding of a dot of unit vectors:
    scaling after it would add one rounding of ``|r||c| S``, noise of ``t ulp(S)`` in ``Z`` that
    d t sums up), half operands after it (normalised, they would be rounded to half again)."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_rn
    col_offsets = cols.to(tl.int64)[:, None] * stride_cn
    rows_ok = (rows < n_rows)[:, None]
    cols_ok = (cols < n_cols)[:, None]
    SCALE_OPERANDS: tl.constexpr = NORMALIZE and rows_ptr.dtype.element_ty == tl.float32
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < k)[None, :]
        row_slice = tl.load(rows_ptr + row_offsets + offs_k[None, :] * stride_rk,
                            mask=rows_ok & k_ok, other=0.0)  # fmt: skip
        col_slice = tl.load(cols_ptr + col_offsets + offs_k[None, :] * stride_ck,
                            mask=cols_ok & k_ok, other=0.0)  # fmt: skip
        row_slice = _operand(row_slice, inv_rows, SCALE_OPERANDS, UPCAST, INPUT_PRECISION)
        col_slice = _operand(col_slice, inv_cols, SCALE_OPERANDS, UPCAST, INPUT_PRECISION)
        accumulator = tl.dot(row_slice, tl.trans(col_slice), accumulator,
                             input_precision=INPUT_PRECISION)  # fmt: skip
    if NORMALIZE and not SCALE_OPERANDS:
        accumulator = accumulator * (inv_rows[:, None] * inv_cols[None, :])
    return accumulator


@triton.jit
def _load_rows(ptr, rows, n_rows, start, stride_n, stride_k, k_end, WIDTH: tl.constexpr):
    """``x[rows, start : start + WIDTH]`` of a matrix, zero beyond ``n_rows`` and ``k_end``."""
    offs = start + tl.arange(0, WIDTH)
    return tl.load(ptr + _row_offsets(rows, offs, stride_n, stride_k),
                   mask=(rows < n_rows)[:, None] & (offs < k_end)[None, :], other=0.0)  # fmt: skip


@triton.jit
def _resident_operands(ptr, rows, inv_norms, stride_n, stride_k, n_rows, k,
                       K_MAIN: tl.constexpr, K_TAIL: tl.constexpr, NORMALIZE: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """A block of rows as GEMM operands over all of ``k``: ``(main, tail)``, the first ``K_MAIN``
    columns and the next ``K_TAIL`` (``main`` again where ``K_TAIL`` is 0), as ``_operand``
    prepares them (fp32: normalised and TF32-rounded as the GEMM needs)."""
    scale: tl.constexpr = NORMALIZE and ptr.dtype.element_ty == tl.float32
    main = _load_rows(ptr, rows, n_rows, 0, stride_n, stride_k, k, K_MAIN)
    main = _operand(main, inv_norms, scale, UPCAST, INPUT_PRECISION)
    tail = main
    if K_TAIL > 0:
        tail = _load_rows(ptr, rows, n_rows, K_MAIN, stride_n, stride_k, k, K_TAIL)
        tail = _operand(tail, inv_norms, scale, UPCAST, INPUT_PRECISION)
    return main, tail


@triton.jit
def _resident_cosines(row_main, row_tail, col_main, col_tail, inv_rows, inv_cols,
                      K_TAIL: tl.constexpr, NORMALIZE: tl.constexpr, HALF: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``S = R^ C^T`` from operands on chip (``_resident_operands``): one GEMM over ``K_MAIN``
    columns, one over the tail; half operands are normalised after the GEMMs."""
    cosines = tl.dot(row_main, tl.trans(col_main), input_precision=INPUT_PRECISION)
    if K_TAIL > 0:
        cosines = tl.dot(row_tail, tl.trans(col_tail), cosines, input_precision=INPUT_PRECISION)
    if NORMALIZE and HALF:
        cosines = cosines * (inv_rows[:, None] * inv_cols[None, :])
    return cosines


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
    negative = valid & ~is_positive
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
