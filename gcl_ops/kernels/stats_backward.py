"""Backward kernel of the embedding form. A program owns a block of vectors of one side ("own":
the documents, or with the roles swapped the queries) and a slice of ``k``, keeps their gradient
on chip while the other side streams past, and writes it once (FlashAttention-2's layout):

    dZ_ab  = g_own_a exp(Z_ab - lse_own_a) + g_other_b exp(Z_ab - lse_other_b)   (a negative)
    dZ_ab  = g_pos_a                                                             (the positive)
    dOwn^_a += t sum_b dZ_ab other^_b                        (on chip, written once)
    dOther^_b += t sum_a dZ_ab own^_a                        (OTHER_GRAD: added atomically)

The formula is symmetric in the two sides, so one kernel serves both launches of the atomic-free
backward (documents own, then queries own; each recomputes ``S``) and the one launch of the
atomic backward (documents own, the queries' gradient added atomically: one recomputation of
``S``, ``k / 64`` fp32 atomic adds per entry). Launched by ``gcl_ops.launchers``.
"""

from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import (
    LOG2E,
    _cosine_tile,
    _fp16_exponent,
    _power_of_two,
    _resident_cosines,
    _resident_operands,
    _row_offsets,
    _tile_masks,
)


@triton.jit
def _gradient_gemm(accumulator, operand, other_ptr, other, other_ok, offs_k, k_end,
                   stride_tn, stride_tk, UPCAST: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``accumulator += operand @ X[other, offs_k]``, the raw rows of ``X`` (zero from column
    ``k_end`` on)."""
    tile = tl.load(other_ptr + _row_offsets(other, offs_k, stride_tn, stride_tk),
                   mask=other_ok[:, None] & (offs_k < k_end)[None, :], other=0.0)  # fmt: skip
    if UPCAST:  # the interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584)
        tile = tile.to(tl.float32)
    return tl.dot(operand, tile, accumulator, input_precision=INPUT_PRECISION)


@triton.jit
def _stats_bwd_kernel(
    own_ptr, other_ptr, inv_own_ptr, inv_other_ptr,  # data
    own_qid_ptr, own_did_ptr, other_qid_ptr, other_did_ptr,  # ids
    scalars_ptr,  # t; fp16: also max_b 1/|other_b| and max_b |g_other_b|
    lse_own_ptr, lse_other_ptr,  # (n_own,), (n_other,): lse / t (0: no negative)
    grad_own_lse_ptr, grad_other_lse_ptr, grad_pos_ptr,  # upstream: (n_own,), (n_other,), (n_own,)
    grad_own_ptr, grad_other_ptr, scale_part_ptr,  # fp32 outputs, zeroed: (n_own, k), (n_other, k), (n_own,)
    stride_on, stride_ok, stride_tn, stride_tk,  # strides of own and other (outputs: (rows, k))
    n_own, n_other, k, diag_offset,  # sizes; the positive of own a is other a + diag_offset
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_K: tl.constexpr,
    K_MAIN: tl.constexpr, K_TAIL: tl.constexpr, RESIDENT: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_QID: tl.constexpr, HAS_DID: tl.constexpr,
    OTHER_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program ``(o, r, s)``: own block ``o``, slice ``s`` of ``k`` (``K_MAIN + K_TAIL`` wide: two
    power-of-two accumulators, so that ``k = 300`` needs 256 + 64 columns, not 512), and the
    other side's blocks ``r, r + R, ...`` (``R`` splits; with more than one, the own gradient is
    added atomically too). Per tile ``S`` is recomputed over all of ``k`` and ``dS = t dZ``
    formed once. ``RESIDENT`` (one slice): the own block's rows stay on chip for the whole loop
    and each block of the other side is loaded once, whole, for both its GEMMs (``S`` and the
    gradient); otherwise ``S`` streams over ``k`` in ``BLOCK_K`` slices and the gradient GEMM
    loads its slice of the other side again. With ``SCALE_GRAD`` (and ``s == 0``), ``scale_part_ptr[a] += sum_b dZ_ab S_ab``
    over the negatives (the launcher adds the positives' terms in float64)."""
    pid_own, pid_split, pid_slice = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    own = pid_own * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_ok = own < n_own
    scale = tl.load(scalars_ptr)
    exp_scale = scale * LOG2E
    lse_own = tl.load(lse_own_ptr + own, mask=own_ok, other=0.0)
    grad_own_lse = tl.load(grad_own_lse_ptr + own, mask=own_ok, other=0.0)
    grad_pos = tl.load(grad_pos_ptr + own, mask=own_ok, other=0.0)
    inv_own = tl.full((BLOCK_OWN,), 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv_own = tl.load(inv_own_ptr + own, mask=own_ok, other=1.0)
    dtype = own_ptr.dtype.element_ty
    # dS enters the gradient GEMMs in the inputs' precision (like P in P @ V), times the other
    # side's 1/|x|. fp16: dS_ab ~ t w / N^2 flushes to 0 below fp16's smallest normal (6e-5)
    # at large N, so each operand is scaled by 2^e before the cast and the fp32 result by 2^-e
    # after (exact); e puts a bound on the operand in [2^13, 2^14) (docs/CONTRACT.md).
    RESCALE: tl.constexpr = dtype == tl.float16
    own_up, own_down, other_up, other_down = 1.0, 1.0, 1.0, 1.0
    if RESCALE:
        grad_bound = scale * (
            tl.max(tl.where(own_ok, tl.abs(grad_own_lse) + tl.abs(grad_pos), 0.0), axis=0)
            + tl.load(scalars_ptr + 2)
        )
        own_exponent = _fp16_exponent(grad_bound * tl.load(scalars_ptr + 1))
        other_exponent = _fp16_exponent(grad_bound * tl.max(tl.where(own_ok, inv_own, 0.0), 0))
        own_up, own_down = _power_of_two(own_exponent), _power_of_two(-own_exponent)
        other_up, other_down = _power_of_two(other_exponent), _power_of_two(-other_exponent)

    # fp32 with normalisation, resident: the operands on chip are the normalised rows, so dS
    # takes no 1/|x| factor (the streamed gradient GEMMs load raw rows).
    PRESCALED: tl.constexpr = RESIDENT and NORMALIZE and dtype == tl.float32
    if RESIDENT:
        own_main, own_tail = _resident_operands(
            own_ptr, own, inv_own, stride_on, stride_ok, n_own, k,
            K_MAIN, K_TAIL, NORMALIZE, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
    slice_start = pid_slice * (K_MAIN + K_TAIL)
    offs_main = slice_start + tl.arange(0, K_MAIN)
    grad_main = tl.zeros((BLOCK_OWN, K_MAIN), dtype=tl.float32)
    if K_TAIL > 0:
        offs_tail = slice_start + K_MAIN + tl.arange(0, K_TAIL)
        grad_tail = tl.zeros((BLOCK_OWN, K_TAIL), dtype=tl.float32)
    scale_part = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    other_blocks = tl.cdiv(n_other, BLOCK_OTHER)
    for visit in range(pid_split, other_blocks, tl.num_programs(1)):
        # Each own block starts at another block of the other side: with OTHER_GRAD the programs
        # resident at once add to different rows instead of contending for the first ones.
        block = (visit + pid_own) % other_blocks
        other = block * BLOCK_OTHER + tl.arange(0, BLOCK_OTHER)
        other_ok = other < n_other
        inv_other = tl.full((BLOCK_OTHER,), 1.0, dtype=tl.float32)
        if NORMALIZE:
            inv_other = tl.load(inv_other_ptr + other, mask=other_ok, other=1.0)
        lse_other = tl.load(lse_other_ptr + other, mask=other_ok, other=0.0)
        grad_other_lse = tl.load(grad_other_lse_ptr + other, mask=other_ok, other=0.0)
        if RESIDENT:
            other_main, other_tail = _resident_operands(
                other_ptr, other, inv_other, stride_tn, stride_tk, n_other, k,
                K_MAIN, K_TAIL, NORMALIZE, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
            cosines = _resident_cosines(own_main, own_tail, other_main, other_tail, inv_own,
                                        inv_other, K_TAIL, NORMALIZE, dtype != tl.float32,
                                        INPUT_PRECISION)  # fmt: skip
        else:
            cosines = _cosine_tile(
                own_ptr, other_ptr, own, other, inv_own, inv_other,
                stride_on, stride_ok, stride_tn, stride_tk, n_own, n_other, k,
                BLOCK_OWN, BLOCK_OTHER, BLOCK_K, NORMALIZE, INPUT_PRECISION, UPCAST,
            )  # fmt: skip
        negative, positive = _tile_masks(
            own, other, n_own, n_other, diag_offset,
            own_qid_ptr, own_did_ptr, other_qid_ptr, other_did_ptr, HAS_QID, HAS_DID,
        )  # fmt: skip
        # P = exp(Z - lse) = exp2((S - lse / t) t log2(e)), the difference in cosine units
        # (exact where P is not negligible: S near lse / t). On negatives Z <= lse up to the rounding
        # of S, which differs from the forward's by a few ulps (another tile order): the clamp
        # keeps P <= 1 where a negative is alone in its row or column (docs/CONTRACT.md).
        own_gap = cosines - lse_own[:, None]
        other_gap = cosines - lse_other[None, :]
        p_own = tl.exp2(tl.minimum(own_gap, 0.0) * exp_scale)
        p_other = tl.exp2(tl.minimum(other_gap, 0.0) * exp_scale)
        grad_logits = tl.where(
            negative, grad_own_lse[:, None] * p_own + grad_other_lse[None, :] * p_other, 0.0
        )
        grad_logits = tl.where(positive, grad_pos[:, None], grad_logits)
        if SCALE_GRAD:
            scale_part += tl.sum(tl.where(positive, 0.0, grad_logits * cosines), axis=1)
        grad_cosines = grad_logits * scale  # dS = t dZ
        # dOwn^ += (dS / |other|) Other over this program's slice of k
        other_factor = inv_other * own_up
        if PRESCALED:
            other_factor = tl.full((BLOCK_OTHER,), 1.0, dtype=tl.float32)
        operand = (grad_cosines * other_factor[None, :]).to(dtype)
        if UPCAST:
            operand = operand.to(tl.float32)
        if RESIDENT:
            grad_main = tl.dot(operand, other_main, grad_main, input_precision=INPUT_PRECISION)
            if K_TAIL > 0:
                grad_tail = tl.dot(operand, other_tail, grad_tail, input_precision=INPUT_PRECISION)
        else:
            grad_main = _gradient_gemm(grad_main, operand, other_ptr, other, other_ok, offs_main,
                                       k, stride_tn, stride_tk, UPCAST, INPUT_PRECISION)  # fmt: skip
            if K_TAIL > 0:
                grad_tail = _gradient_gemm(grad_tail, operand, other_ptr, other, other_ok,
                                           offs_tail, k, stride_tn, stride_tk, UPCAST,
                                           INPUT_PRECISION)  # fmt: skip
        if OTHER_GRAD:  # dOther^ += (dS / |own|)^T Own, atomically
            own_factor = inv_own * other_up
            if PRESCALED:
                own_factor = tl.full((BLOCK_OWN,), 1.0, dtype=tl.float32)
            operand = tl.trans((grad_cosines * own_factor[:, None]).to(dtype))
            if UPCAST:
                operand = operand.to(tl.float32)
            grad_rows = grad_other_ptr + tl.cast(block * BLOCK_OTHER, tl.int64) * k
            within = tl.arange(0, BLOCK_OTHER)[:, None] * k
            if RESIDENT:  # (the block's origin in int64, the offsets within it in int32)
                offs_k = tl.arange(0, K_MAIN)
                grad_chunk = tl.dot(operand, own_main, input_precision=INPUT_PRECISION)
                tl.atomic_add(grad_rows + within + offs_k[None, :], grad_chunk * other_down,
                              mask=other_ok[:, None] & (offs_k < k)[None, :], sem="relaxed")  # fmt: skip
                if K_TAIL > 0:
                    offs_k = K_MAIN + tl.arange(0, K_TAIL)
                    grad_chunk = tl.dot(operand, own_tail, input_precision=INPUT_PRECISION)
                    tl.atomic_add(grad_rows + within + offs_k[None, :], grad_chunk * other_down,
                                  mask=other_ok[:, None] & (offs_k < k)[None, :], sem="relaxed")  # fmt: skip
            else:  # 64 columns of k at a time (chunks may overhang the slice: masked)
                slice_end = tl.minimum(slice_start + K_MAIN + K_TAIL, k)
                for chunk in range(0, K_MAIN + K_TAIL, 64):
                    offs_k = slice_start + chunk + tl.arange(0, 64)
                    grad_chunk = _gradient_gemm(
                        tl.zeros((BLOCK_OTHER, 64), dtype=tl.float32), operand, own_ptr, own,
                        own_ok, offs_k, slice_end, stride_on, stride_ok, UPCAST, INPUT_PRECISION,
                    )  # fmt: skip
                    tl.atomic_add(grad_rows + within + offs_k[None, :], grad_chunk * other_down,
                                  mask=other_ok[:, None] & (offs_k < slice_end)[None, :],
                                  sem="relaxed")  # fmt: skip
    _write(grad_own_ptr, grad_main * own_down, own, own_ok, offs_main, k)
    if K_TAIL > 0:
        _write(grad_own_ptr, grad_tail * own_down, own, own_ok, offs_tail, k)
    if SCALE_GRAD:  # noqa: SIM102 (a compile-time switch, then a runtime test)
        if pid_slice == 0:
            tl.atomic_add(scale_part_ptr + own, scale_part, mask=own_ok, sem="relaxed")


@triton.jit
def _write(grad_ptr, values, rows, rows_ok, offs_k, k):
    """``grad[rows, offs_k] = values`` where one program covers the rows (no split of the other
    side), else ``+=`` atomically."""
    pointers = grad_ptr + _row_offsets(rows, offs_k, k, 1)
    mask = rows_ok[:, None] & (offs_k < k)[None, :]
    if tl.num_programs(1) == 1:
        tl.store(pointers, values, mask=mask)
    else:
        tl.atomic_add(pointers, values, mask=mask, sem="relaxed")
