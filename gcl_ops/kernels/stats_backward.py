"""Backward kernel of the embedding form: both gradients (and ``d t``) in one pass over the
tiles, FlashAttention-2 style (a program owns a block of columns and the row blocks stream past).
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import (
    CHAINED_DOT,
    LOG2E,
    _cosine_tile,
    _fp16_exponent,
    _power_of_two,
    _row_offsets,
    _tile_masks,
)


@triton.jit(do_not_specialize=["size_bucket"])
def _stats_bwd_kernel(
    query_ptr, doc_ptr, inv_query_ptr, inv_doc_ptr,  # data
    row_qid_ptr, row_did_ptr, col_qid_ptr, col_did_ptr,  # ids
    scalars_ptr,  # t; fp16: also max_i 1/|q_i| and max_i (|g_row_i| + |g_pos_i|)
    neg_row_ptr, neg_col_ptr,  # (2, N), (2, M): lse / t as hi and lo parts
    grad_neg_row_ptr, grad_neg_col_ptr, grad_pos_ptr,  # upstream gradients
    grad_query_ptr, grad_doc_ptr, scale_cols_ptr,  # fp32 outputs, zeroed: (N, k), (M, k), (M,)
    stride_qn, stride_qk, stride_dn, stride_dk,  # strides of the inputs (outputs: (rows, k))
    n_rows, n_cols, k, diag_offset,  # sizes
    size_bucket,  # log2 of n_rows * n_cols, rounded: only a key for the autotuner
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_SLICE: tl.constexpr,
    RESIDENT: tl.constexpr, NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    NEED_QUERY: tl.constexpr, NEED_DOC: tl.constexpr, SCALE_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The whole backward in one pass over the tiles (FlashAttention-2's layout): program
    ``(c, r, s)`` owns column block ``c`` (documents) and the ``s``-th ``K_SLICE`` of the
    embedding width, and visits row blocks ``r, r + R, ...`` (``R = num_programs(1)``). Per tile
    it recomputes ``S`` (bitwise the forward's), forms ``dS = t dZ`` once and uses it twice:

        dD^_c[:, s] += (dS * 1/|q|)^T Q_r[:, s]    (kept on chip for the whole row loop)
        dQ^_r[:, s] += (dS * 1/|d|) D_c[:, s]      (added to ``grad_query_ptr`` atomically)

    The tile is held transposed, documents x queries (``S^T``, ``BLOCK_N x BLOCK_M``), so that
    the documents are the M side (wgmma's 64 rows per warp group) of ``S^T = D_c Q_r^T`` and
    of ``dD^``, whose register operand ``dS^T`` is then the tile itself. ``dQ^`` is
    ``dS D_c`` (``dS`` the register operand) for row blocks of 64 and more, and ``D_c^T dS^T``
    (``k`` on the M side) for narrower ones (``TRANSPOSED_QUERY_GRAD``): 16-query row blocks
    leave the registers to a ``dD^`` as wide as ``k = 512``. With ``RESIDENT`` (one slice
    spanning ``k``) ``D_c`` is loaded once for the whole row loop and each ``Q_r`` once for both
    of its GEMMs; otherwise the gradients load their slice of each again (from L2).

    ``dX^`` is the gradient through the normalised vectors, ``dL/dx^ / |x|``-free: the launcher
    applies ``dx = (dx^ - x <x, dx^> / |x|^2) / |x|`` (``_through_norm``). ``dD^`` is added
    atomically too when row blocks are split across programs. With ``SCALE_GRAD`` (and
    ``s == 0``), ``scale_cols_ptr[j] += sum_i dZ_ij S_ij`` over the negatives (the launcher adds
    the positives' terms).

    The statistics come as log-sum-exps in cosine units, ``lse / t = hi + lo`` (two fp32 parts:
    ``neg_row_ptr[i]``, ``neg_row_ptr[n_rows + i]``; 0 where there is no negative)."""
    pid_c = tl.program_id(0)
    slice_start = tl.program_id(2) * K_SLICE
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < n_cols
    scale = tl.load(scalars_ptr).to(tl.float32)
    neg_col = tl.load(neg_col_ptr + cols, mask=cols_ok, other=0.0)
    neg_col_lo = tl.load(neg_col_ptr + n_cols + cols, mask=cols_ok, other=0.0)
    grad_neg_col = tl.load(grad_neg_col_ptr + cols, mask=cols_ok, other=0.0)
    inv_cols = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv_cols = tl.load(inv_doc_ptr + cols, mask=cols_ok, other=1.0)
    # dS enters the two GEMMs in the inputs' precision, like P @ V in attention, scaled by the
    # other side's 1/|x| (the GEMMs then run on the raw, unnormalised inputs).
    # fp16: dS_ij ~ t w / N^2 is far below fp16's smallest normal (6e-5) at large N and would
    # flush to 0 in the cast. Each operand is scaled by a power of two 2^e before the cast and
    # the fp32 result by 2^-e after (exact). With P <= 1 on negatives (clamped below),
    #     |dZ_ij| <= G + max_{j in c} |g_col_j|,   G = max_i (|g_row_i| + |g_pos_i|),
    # times t and the largest 1/|x| on the side that scales the operand bounds it; e puts that
    # bound in [2^13, 2^14), so nothing passes fp16's 65504 and an entry f times below the bound
    # keeps fp16's 11 bits down to f = 2^-27 (then subnormals); e is clamped to [-100, 100].
    # (bf16 has fp32's exponent range and fp32 casts nothing: no scaling.)
    RESCALE: tl.constexpr = query_ptr.dtype.element_ty == tl.float16
    col_factor = inv_cols  # of dS for dQ^ = dS' D, per column
    doc_up = 1.0
    query_down = 1.0
    doc_down = 1.0
    if RESCALE:
        grad_bound = scale * (tl.load(scalars_ptr + 2) + tl.max(tl.abs(grad_neg_col), axis=0))
        query_exponent = _fp16_exponent(
            grad_bound * tl.max(tl.where(cols_ok, inv_cols, 0.0), axis=0)
        )
        doc_exponent = _fp16_exponent(grad_bound * tl.load(scalars_ptr + 1))
        col_factor = inv_cols * _power_of_two(query_exponent)
        doc_up = _power_of_two(doc_exponent)
        query_down = _power_of_two(-query_exponent)
        doc_down = _power_of_two(-doc_exponent)

    # RESIDENT (one slice as wide as k, chosen by the launcher's tile candidates): D_c is loaded
    # once, before the row loop, and each Q_r once per row block, each serving both of its
    # GEMMs (S^T and dQ^; S^T and dD^) from on-chip memory. Otherwise both stream through the
    # GEMM over k for S^T and their slice is loaded again for the gradients (a resident D_c of
    # the whole width needs one dQ^ GEMM as wide as k, whose accumulator spills from 256 bytes
    # per row on). fp32 with normalisation (SCALE_OPERANDS, as in _cosine_tile): the resident
    # tiles are the normalised D^_c, Q^_r, and the gradients' dS takes no 1/|x| factor.
    SCALE_OPERANDS: tl.constexpr = query_ptr.dtype.element_ty == tl.float32
    PRESCALED: tl.constexpr = (RESIDENT and NORMALIZE) and SCALE_OPERANDS
    # dQ^ goes out in chunks of 64 of k (the whole slice where it is narrower or resident): with
    # row blocks below 64 the chunk is the M side of its GEMM (TRANSPOSED_QUERY_GRAD), and wgmma
    # needs 64 (the launcher pairs slices narrower than 64 with 64-row blocks, or FMA tiles).
    QUERY_CHUNK: tl.constexpr = K_SLICE if (K_SLICE < 64 or RESIDENT) else 64
    tl.static_assert(K_SLICE % QUERY_CHUNK == 0)  # (powers of two: the chunks tile the slice)
    TRANSPOSED_QUERY_GRAD: tl.constexpr = BLOCK_M < 64
    offs_slice = slice_start + tl.arange(0, K_SLICE)
    slice_ok = offs_slice < k
    if PRESCALED:
        col_factor = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if RESIDENT:  # D_c (fp32 normalised: D^_c), all of k, on chip for the whole row loop
        doc_tile = tl.load(
            doc_ptr + _row_offsets(cols, offs_slice, stride_dn, stride_dk),
            mask=cols_ok[:, None] & slice_ok[None, :], other=0.0,
        )  # fmt: skip
        if UPCAST:
            doc_tile = doc_tile.to(tl.float32)
        if PRESCALED:
            doc_tile = doc_tile * inv_cols[:, None]
    grad_doc_hat = tl.zeros((BLOCK_N, K_SLICE), dtype=tl.float32)
    scale_cols = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    for visit in range(tl.program_id(1), row_blocks, tl.num_programs(1)):
        # Each column block starts at another row block: the programs resident at once add to
        # different rows of dQ^ instead of all contending for the first ones.
        row_block = (visit + pid_c) % row_blocks
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_ok = rows < n_rows
        grad_query_rows = grad_query_ptr + tl.cast(row_block * BLOCK_M, tl.int64) * k
        inv_rows = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        if NORMALIZE:
            inv_rows = tl.load(inv_query_ptr + rows, mask=rows_ok, other=1.0)
        neg_row = tl.load(neg_row_ptr + rows, mask=rows_ok, other=0.0)
        neg_row_lo = tl.load(neg_row_ptr + n_rows + rows, mask=rows_ok, other=0.0)
        grad_neg_row = tl.load(grad_neg_row_ptr + rows, mask=rows_ok, other=0.0)
        grad_pos = tl.load(grad_pos_ptr + rows, mask=rows_ok, other=0.0)
        if RESIDENT:  # Q_r (fp32 normalised: Q^_r), all of k, for S^T and dD^
            query_tile = tl.load(
                query_ptr + _row_offsets(rows, offs_slice, stride_qn, stride_qk),
                mask=rows_ok[:, None] & slice_ok[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST:
                query_tile = query_tile.to(tl.float32)
            if PRESCALED:
                query_tile = query_tile * inv_rows[:, None]
        # (documents as the tile's rows: S^T, bitwise the forward's S)
        if RESIDENT and CHAINED_DOT:
            # One GEMM over all of k: on the GPU the same k16 (TF32: k8; FMA: k1) steps into
            # one accumulator, in the same order, as _cosine_tile's loop over BLOCK_K slices.
            cosines = tl.dot(doc_tile, tl.trans(query_tile), input_precision=INPUT_PRECISION)
            if NORMALIZE and not SCALE_OPERANDS:
                cosines = cosines * (inv_cols[:, None] * inv_rows[None, :])
        else:  # (the interpreter's numpy GEMM rounds a K-wide dot otherwise: slices, as there)
            cosines = _cosine_tile(
                doc_ptr, query_ptr, cols, rows, inv_cols, inv_rows,
                stride_dn, stride_dk, stride_qn, stride_qk, n_cols, n_rows, k,
                BLOCK_N, BLOCK_M, BLOCK_K, NORMALIZE, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
        # (query i is the positive of document j = i + diag_offset)
        negative, positive = _tile_masks(
            cols, rows, n_cols, n_rows, -diag_offset,
            col_qid_ptr, col_did_ptr, row_qid_ptr, row_did_ptr, HAS_QID, HAS_DID,
        )  # fmt: skip
        # dZ = g_row_i P_row + g_col_j P_col on negatives, g_pos_i on the positive, else 0, with
        # P = exp(Z - lse) = exp2((S - hi - lo) t log2(e)). In cosine units S - hi is exact
        # where it matters (P not negligible: S near hi, Sterbenz) and every later rounding is
        # relative to the small difference; Z = S t and an fp32 lse would each be off by up to
        # ulp(|Z|) / 2 (1.5e-5 at |Z| ~ 300), relative errors in P that d t = sum dZ S sums up.
        # On negatives Z <= lse, so P <= 1; the clamp only keeps the discarded entries finite.
        row_gap = (cosines - neg_row[None, :]) - neg_row_lo[None, :]
        col_gap = (cosines - neg_col[:, None]) - neg_col_lo[:, None]
        p_row = tl.exp2(tl.minimum(row_gap * scale, 0.0) * LOG2E)
        p_col = tl.exp2(tl.minimum(col_gap * scale, 0.0) * LOG2E)
        grad_logits = tl.where(
            negative, grad_neg_row[None, :] * p_row + grad_neg_col[:, None] * p_col, 0.0
        )
        grad_logits = tl.where(positive, grad_pos[None, :], grad_logits)
        if SCALE_GRAD:
            # (the positives' terms are summed by the launcher, in float64)
            scale_cols += tl.sum(tl.where(positive, 0.0, grad_logits * cosines), axis=1)
        grad_cosines = grad_logits * scale  # dS^T = t dZ^T
        if NEED_DOC:  # dD^_c += (dS / |q|)^T Q_r over this program's slice of k
            row_factor = inv_rows * doc_up if RESCALE else inv_rows
            if PRESCALED:
                row_factor = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
            doc_operand = (grad_cosines * row_factor[None, :]).to(query_ptr.dtype.element_ty)
            if RESIDENT:
                row_slice = query_tile
            else:
                row_slice = tl.load(
                    query_ptr + _row_offsets(rows, offs_slice, stride_qn, stride_qk),
                    mask=rows_ok[:, None] & slice_ok[None, :], other=0.0,
                )  # fmt: skip
            if UPCAST:  # the interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584)
                doc_operand = doc_operand.to(tl.float32)
                row_slice = row_slice.to(tl.float32)
            grad_doc_hat = tl.dot(doc_operand, row_slice, grad_doc_hat,
                                  input_precision=INPUT_PRECISION)  # fmt: skip
        if NEED_QUERY:  # dQ^_r += (dS / |d|) D_c, QUERY_CHUNK columns of k at a time, atomically
            query_operand = (grad_cosines * col_factor[:, None]).to(query_ptr.dtype.element_ty)
            if UPCAST:
                query_operand = query_operand.to(tl.float32)
            for chunk in range(0, K_SLICE, QUERY_CHUNK):
                offs_k = slice_start + chunk + tl.arange(0, QUERY_CHUNK)
                k_ok = offs_k < k
                if RESIDENT:  # (one chunk: the resident D_c)
                    col_chunk = doc_tile
                else:
                    col_chunk = tl.load(
                        doc_ptr + _row_offsets(cols, offs_k, stride_dn, stride_dk),
                        mask=cols_ok[:, None] & k_ok[None, :], other=0.0,
                    )  # fmt: skip
                if UPCAST:
                    col_chunk = col_chunk.to(tl.float32)
                if TRANSPOSED_QUERY_GRAD:  # dQ^T = D_c^T dS'^T: k on the M side
                    grad_chunk = tl.dot(tl.trans(col_chunk), query_operand,
                                        input_precision=INPUT_PRECISION)  # fmt: skip
                    within = tl.arange(0, BLOCK_M)[None, :] * k + offs_k[:, None]
                    chunk_ok = k_ok[:, None] & rows_ok[None, :]
                else:  # dQ = dS' D_c: dS' the GEMM's register operand
                    grad_chunk = tl.dot(tl.trans(query_operand), col_chunk,
                                        input_precision=INPUT_PRECISION)  # fmt: skip
                    within = tl.arange(0, BLOCK_M)[:, None] * k + offs_k[None, :]
                    chunk_ok = rows_ok[:, None] & k_ok[None, :]
                if RESCALE:
                    grad_chunk = grad_chunk * query_down
                # (the row block's origin in int64, the offsets within it in int32)
                tl.atomic_add(grad_query_rows + within, grad_chunk, mask=chunk_ok, sem="relaxed")
    if NEED_DOC:
        if RESCALE:
            grad_doc_hat = grad_doc_hat * doc_down
        tl.atomic_add(
            grad_doc_ptr + _row_offsets(cols, offs_slice, k, 1), grad_doc_hat,
            mask=cols_ok[:, None] & slice_ok[None, :], sem="relaxed",
        )  # fmt: skip
    if SCALE_GRAD:  # noqa: SIM102 (a compile-time switch, then a runtime test)
        if slice_start == 0:
            tl.atomic_add(scale_cols_ptr + cols, scale_cols, mask=cols_ok, sem="relaxed")
