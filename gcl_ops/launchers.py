"""Launchers of the Triton kernels: they pad, allocate, pick the tiles (``gcl_ops.tiling``), launch
and finish the statistics in float64. They check nothing but shapes; the custom ops of
``gcl_ops.ops`` call them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gcl_ops import tiling
from gcl_ops._triton import triton
from gcl_ops.blockwise import SHIFT_HEADROOM, TINY_SUM, inverse_norms
from gcl_ops.kernels.logits import _logits_grad_kernel, _logits_stats_kernel
from gcl_ops.kernels.stats_backward import _stats_bwd_kernel
from gcl_ops.kernels.stats_forward import _online_lse_kernel, _stats_fwd_kernel

#: The Triton path keeps embedding rows' gradients on chip; wider embeddings take the PyTorch path.
MAX_TRITON_K = 1024
LOG2E = 1.4426950408889634
#: Offsets within a tile are int32 (``kernels.tiles``): see ``_fit_int32_offsets``.
_INT32_OFFSETS = 2**31
#: Rows per step of ``_through_norm``: bounds its fp32 temporaries to 32K x k.
_THROUGH_NORM_ROWS = 1 << 15


@torch.compiler.assume_constant_result  # (a setting read while tracing: no graph break)
def allow_tf32(autocast: bool = False) -> bool:
    """Whether fp32 GEMMs may use TF32. The newer setting ``torch.backends.cuda.matmul.
    fp32_precision`` ("ieee", "tf32", or "none": defer to the legacy one) is final when set (the
    legacy ``torch.get_float32_matmul_precision()`` then raises). Otherwise TF32 under
    ``autocast`` (the user asked for reduced precision; TF32 keeps fp32's range) or where the
    legacy setting allows it."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return autocast or torch.get_float32_matmul_precision() != "highest"


def kernel_flags(x: torch.Tensor, tf32: bool) -> dict:
    """Compile-time switches that depend on the dtype and the fp32 GEMM precision."""
    return dict(
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        UPCAST=tiling.INTERPRETING and x.dtype == torch.bfloat16,
    )


def warn_if_slow(x: torch.Tensor, tf32: bool) -> None:
    """IEEE fp32 on a GPU runs the kernels' GEMMs on the FMA units (20k FLOPs per entry where the
    PyTorch path runs cuBLAS): ``impl="auto"`` takes the PyTorch path there; asked for
    explicitly, it runs with a warning (once)."""
    if x.is_cuda and x.dtype == torch.float32 and not tf32:
        _warn_ieee_once()


@functools.cache
def _warn_ieee_once() -> None:
    warnings.warn(
        "impl='triton' with IEEE fp32 GEMMs runs the GEMMs on the GPU's FMA units, several times "
        "slower than impl='auto' (which takes the cuBLAS-backed PyTorch path here). For speed, "
        "allow TF32 (torch.backends.cuda.matmul.fp32_precision = 'tf32') or pass bf16 inputs.",
        stacklevel=4,
    )


# ----------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------


def _fit_int32_offsets(x: torch.Tensor, *extents: int) -> torch.Tensor:
    """``x``, or a contiguous copy where a tile's int32 offsets ``sum_d (extent_d - 1) stride_d``
    could overflow (only odd layouts, such as an ``(N, k)`` view of a ``(k, N)`` matrix)."""
    span = sum(max(extent - 1, 0) * stride for extent, stride in zip(extents, x.stride()))
    return x if span < _INT32_OFFSETS else x.contiguous()


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` with ``k`` padded by zero columns to a multiple of 16 (a copy only where it is not):
    Triton specialises a row stride divisible by 16 (vectorised loads, wgmma's shared-memory
    pipelines); without it the widest tiles spill."""
    k = x.shape[1]
    if k != tiling.padded_width(k):
        return F.pad(x, (0, tiling.padded_width(k) - k))
    return _fit_int32_offsets(x, 0, k)


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
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
    return [row_qid, row_did, col_qid, col_did], dict(
        HAS_QID=query_ids is not None, HAS_DID=doc_ids is not None
    )


def _inverse_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fp32 ``1 / |x_i|``; without normalisation a placeholder the kernels never read."""
    inverse = inverse_norms(x, normalize, dtype=torch.float32)
    return torch.ones(1, device=x.device) if inverse is None else inverse


@functools.cache
def _autotuner(kernel, tiles: tuple, zeroed: tuple, key: tuple):
    """``kernel`` under ``triton.autotune`` over ``tiling.candidates`` of the default ``tiles``;
    ``zeroed``: the outputs accumulated atomically, zeroed before each timed run."""
    configs = []
    for candidate in tiling.candidates(dict(tiles)):
        launch = {name: candidate.pop(name) for name in ("num_warps", "num_stages")}
        configs.append(triton.Config(candidate, **launch))
    return triton.autotune(configs, key=list(key), reset_to_zero=list(zeroed))(kernel)


def _launch(kernel, grid, arguments: tuple, flags: dict, tiles: dict, zeroed=(), key=()) -> None:
    """``kernel[grid]`` with the default ``tiles``, or with ``GCL_OPS_AUTOTUNE=1`` through the
    autotuner (keyed on ``key``, the size arguments)."""
    if tiling.autotuning():
        autotuner = _autotuner(kernel, tuple(sorted(tiles.items())), tuple(zeroed), tuple(key))
        autotuner[grid](*arguments, **flags)
    else:
        kernel[grid](*arguments, **flags, **tiles)


def _sm_count(device: torch.device) -> int | None:
    """The device's streaming multiprocessors (for grid sizes); None off a GPU (interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Embedding form: forward
# ----------------------------------------------------------------------------------------------


class ForwardStats(NamedTuple):
    """What ``stats_forward`` computes. ``row_parts`` ``(2, N)``: ``lse / t`` of the rows (from
    float64, 0 where infinite) and the positive cosines ``S_ii``; ``col_parts`` ``(M,)``:
    ``lse / t`` of the columns (for the backward). ``row_sum`` ``(N,)``, ``col_sum`` ``(M,)``: the kernel's
    sums of ``exp(Z - shift)`` over the negatives, and ``redo_rows``, ``redo_cols``: which of them
    were recomputed exactly (sum below ``TINY_SUM``)."""

    neg_row: torch.Tensor
    neg_col: torch.Tensor
    pos: torch.Tensor
    row_parts: torch.Tensor
    col_parts: torch.Tensor
    row_sum: torch.Tensor
    col_sum: torch.Tensor
    redo_rows: torch.Tensor
    redo_cols: torch.Tensor


def stats_forward(
    query: torch.Tensor,
    doc: torch.Tensor,
    scale: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    offset: int,
    normalize: bool,
    autocast: bool = False,
) -> ForwardStats:
    """The statistics of ``Z = t Q^ D^T`` (``Q`` ``(N, k)``, ``D`` ``(M, k)``, row ``i``'s positive
    column ``offset + i``) in one pass over the tiles, then an exact recomputation of the rows and
    columns whose sum underflowed. ``autocast``: the caller ran under autocast (fp32 GEMMs in
    TF32, ``allow_tf32``). Equivalent PyTorch: ``gcl_ops.reference.naive_gcl_stats``."""
    n, m = query.shape[0], doc.shape[0]
    query, doc = _padded(query), _padded(doc)
    k = query.shape[1]
    f32 = dict(device=query.device, dtype=torch.float32)
    scale = scale.detach().to(**f32).reshape(1)
    scale64 = scale.double()
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    bound = scale64  # |Z| <= t for unit vectors, else |Z| <= t * max|q| * max|d|
    if not normalize:
        for x in (query, doc):
            bound = bound * torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).max()
    # The fixed shift in cosine units, sigma = shift / t (the kernels subtract it from S).
    shift_cosine = ((bound - SHIFT_HEADROOM).clamp_min(0.0) / scale64).float().reshape(1)
    shift_arguments = torch.cat([shift_cosine, (scale64 * LOG2E).float()])
    row_sum, col_sum = torch.zeros(n, **f32), torch.zeros(m, **f32)
    positive_cosines = torch.zeros(n, **f32)
    tf32 = allow_tf32(autocast)
    arch, precision = tiling.architecture(query.device), tiling.precision_class(query.dtype, tf32)
    tiles = tiling.forward_tiles(arch, precision, k)
    id_pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, row_sum, swap=False)
    flags = dict(NORMALIZE=normalize, **id_flags, **kernel_flags(query, tf32))

    def grid(meta: dict) -> tuple[int, int]:
        row_blocks, col_tiles = triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"])
        # Column splits for about four programs per SM (the interpreter: two, so that the
        # atomic row sums run too).
        sms = _sm_count(query.device)
        target = 4 * sms if sms else 2 * row_blocks
        return row_blocks, max(1, min(col_tiles, triton.cdiv(target, row_blocks)))

    arguments = (
        query, doc, inv_query, inv_doc, *id_pointers, shift_arguments, row_sum, col_sum,
        positive_cosines, query.stride(0), query.stride(1), doc.stride(0), doc.stride(1),
        n, m, k, offset,
    )  # fmt: skip
    _launch(_stats_fwd_kernel, grid, arguments, flags, tiles,
            zeroed=("row_sum_ptr", "col_sum_ptr", "pos_ptr"), key=("n_rows", "n_cols", "k"))  # fmt: skip
    recompute = tiling.recompute_tiles(arch, precision, k)
    # lse = shift + log(sum) in float64, rounded to fp32 once (the output) and, divided by t,
    # once more for the backward (docs/CONTRACT.md, numerics).
    shift64 = scale64 * shift_cosine.double()
    results, redone = [], []
    for swap, sums in ((False, row_sum), (True, col_sum)):
        lse = torch.log(sums.double()) + shift64
        # Sums that underflowed (or that have no negative): exact, with a running maximum.
        redo = (sums < TINY_SUM) | ~torch.isfinite(sums)
        parts = torch.zeros(2, sums.shape[0], **f32)  # (max cosine, sum) where redo
        pointers, _ = _ids_arguments(query_ids, doc_ids, offset, n, row_sum, swap)
        rows, cols, inv_rows, inv_cols = (
            (doc, query, inv_doc, inv_query) if swap else (query, doc, inv_query, inv_doc)
        )
        _online_lse_kernel[(triton.cdiv(rows.shape[0], recompute["BLOCK_M"]),)](
            rows, cols, inv_rows, inv_cols, *pointers, scale, redo.to(torch.int8), parts,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            rows.shape[0], cols.shape[0], k, -offset if swap else offset,
            **flags, **recompute,
        )  # fmt: skip
        recomputed = scale64 * parts[0].double() + torch.log(parts[1].double())
        recomputed = torch.where(parts[1] > 0, recomputed, float("-inf"))
        lse = torch.where(redo, recomputed, lse)
        results.append((lse.float(), _lse_parts(lse, scale64)))
        redone.append(redo)
    (neg_row, row_parts), (neg_col, col_parts) = results
    pos = (scale64 * positive_cosines.double()).float()  # Z_ii = t S_ii, rounded once
    row_parts = torch.stack([row_parts, positive_cosines])
    return ForwardStats(neg_row, neg_col, pos, row_parts, col_parts, row_sum, col_sum, *redone)


def _lse_parts(lse: torch.Tensor, scale64: torch.Tensor) -> torch.Tensor:
    """``lse / t`` in fp32 from float64, 0 where ``lse`` is infinite (no negative: nothing
    reads it)."""
    return torch.where(torch.isfinite(lse), lse.double() / scale64, 0.0).float()


# ----------------------------------------------------------------------------------------------
# Embedding form: backward
# ----------------------------------------------------------------------------------------------


def stats_backward(
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
    autocast: bool = False,
    strategy: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)``, computing only the parts in ``needs_grad`` (a skipped
    gradient comes back empty). ``row_parts``, ``col_parts``: the forward's (``ForwardStats``);
    without them, those of the fp32 ``neg_row``, ``neg_col``. ``strategy``: ``"split"`` (two
    atomic-free launches, one per side) or ``"atomic"`` (one launch, the queries' gradient added
    atomically); default ``tiling.backward_strategy``: the traffic model's choice."""
    (n, k), m = query.shape, doc.shape[0]
    query_padded, doc_padded = _padded(query), _padded(doc)
    k_pad = query_padded.shape[1]
    f32 = dict(device=query.device, dtype=torch.float32)
    scale32 = scale.detach().to(**f32).reshape(1)
    if row_parts is None or col_parts is None:  # (positive cosines recomputed here)
        positive_cosines = torch.linalg.vecdot(
            *(F.normalize(x.float(), dim=-1) if normalize else x.float()
              for x in (query, doc[offset : offset + n]))
        )  # fmt: skip
        row_parts, col_parts = (_lse_parts(lse, scale32.double()) for lse in (neg_row, neg_col))
        row_parts = torch.stack([row_parts, positive_cosines])
    positive_cosines = row_parts[1]
    inv_query = _inverse_norms(query_padded, normalize)
    inv_doc = _inverse_norms(doc_padded, normalize)
    grad_neg_row, grad_neg_col, grad_pos = (
        g.to(**f32).contiguous() for g in (grad_neg_row, grad_neg_col, grad_pos)
    )
    grad_pos_of_docs = torch.zeros(m, **f32)  # g_pos in the documents' index
    grad_pos_of_docs[offset : offset + n] = grad_pos
    need_query, need_doc, need_scale = needs_grad
    if need_scale and not (need_query or need_doc):
        need_query = True  # d scale comes out of a gradient pass
    tf32 = allow_tf32(autocast)
    arch, precision = tiling.architecture(query.device), tiling.precision_class(query.dtype, tf32)
    if strategy is None:
        strategy = tiling.backward_strategy(arch, precision, k_pad)
    if not (need_query and need_doc) or precision == "ieee":
        strategy = "split"  # one side: one atomic-free launch either way; FMA loops: split only
    tiles = tiling.backward_tiles(arch, precision, k_pad, strategy)
    slices = tiles.pop("slices")
    grad_query_hat = torch.zeros(n if need_query else 0, k_pad, **f32)
    grad_doc_hat = torch.zeros(m if need_doc else 0, k_pad, **f32)
    flags = dict(NORMALIZE=normalize, **kernel_flags(query, tf32))
    row_lse, col_lse = row_parts[0].contiguous(), col_parts.contiguous()
    # (own side, its inverse norms, lse parts, g_lse, g_pos, gradient, swap) per side
    documents = (doc_padded, inv_doc, col_lse, grad_neg_col, grad_pos_of_docs, grad_doc_hat, True)
    queries = (query_padded, inv_query, row_lse, grad_neg_row, grad_pos, grad_query_hat, False)
    if strategy == "atomic":
        launches = [(documents, queries, True)]
    else:
        launches = [(own, other, False) for own, other, needed in
                    ((documents, queries, need_doc), (queries, documents, need_query)) if needed]  # fmt: skip
    scale_part = None
    for (own, inv_own, lse_own, g_own, g_pos_own, grad_own, swap), other, other_grad in launches:
        other_x, inv_other, lse_other, g_other, _, grad_other, _ = other
        n_own, n_other = own.shape[0], other_x.shape[0]
        part = torch.zeros(n_own if scale_part is None and need_scale else 0, **f32)
        scalars = scale32
        if query.dtype == torch.float16:  # the bounds of the fp16 rescaling (see the kernel)
            max_inv = inv_other.max().reshape(1) if normalize else torch.ones(1, **f32)
            scalars = torch.cat([scale32, max_inv, g_other.abs().max().reshape(1)])
        pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, scale32, swap)
        own_blocks = triton.cdiv(n_own, tiles["BLOCK_OWN"])
        other_blocks = triton.cdiv(n_other, tiles["BLOCK_OTHER"])
        sms = _sm_count(query.device)
        if sms:  # other-side splits (atomic adds of the own gradient) where the grid is small
            splits = max(1, min(other_blocks, triton.cdiv(2 * sms, own_blocks * slices)))
        else:  # the interpreter: both the plain and the atomic write on test-sized problems
            splits = 2 if other_blocks > 2 else 1
        arguments = (
            own, other_x, inv_own, inv_other, *pointers, scalars, lse_own, lse_other,
            g_own, g_other, g_pos_own, grad_own, grad_other if other_grad else grad_own,
            part if part.numel() else scalars,
            own.stride(0), own.stride(1), other_x.stride(0), other_x.stride(1),
            n_own, n_other, k_pad, -offset if swap else offset,
        )  # fmt: skip
        zeroed = (
            ("grad_own_ptr",)
            + ("grad_other_ptr",) * other_grad
            + (("scale_part_ptr",) if part.numel() else ())
        )
        _launch(_stats_bwd_kernel, (own_blocks, splits, slices), arguments,
                dict(flags, **id_flags, OTHER_GRAD=other_grad, SCALE_GRAD=part.numel() > 0),
                tiles, zeroed=zeroed, key=("n_own", "n_other", "k"))  # fmt: skip
        scale_part = part if scale_part is None else scale_part
    # d t = sum_ij dZ_ij S_ij: the kernel sums the negatives' terms, the positives' g_pos_i S_ii
    # are summed here: numerically either way, but the kernel without them takes fewer registers.
    if need_scale:
        positives = (grad_pos.double() * positive_cosines.double()).sum()
        grad_scale = (scale_part.double().sum() + positives).to(scale.dtype)
    else:
        grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    grads = []
    for x, grad_hat, inverse in ((query, grad_query_hat, inv_query), (doc, grad_doc_hat, inv_doc)):
        grad_hat = grad_hat[:, :k] if k != k_pad else grad_hat  # (padded columns: 0)
        grads.append(_through_norm(x, grad_hat, inverse, normalize) if grad_hat.shape[0]
                     else x.new_empty(0))  # fmt: skip
    return grads[0], grads[1], grad_scale


def _through_norm(
    x: torch.Tensor, grad_hat: torch.Tensor, inv_norms: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """``dL/dx`` in ``x``'s dtype from the fp32 ``dL/dx^`` through ``x^ = x / |x|`` (the identity
    without normalisation): ``dx = (dx^ - x <x, dx^> / |x|^2) / |x|``, in place in ``grad_hat``,
    in blocks of rows."""
    if normalize:
        for start in range(0, x.shape[0], _THROUGH_NORM_ROWS):
            rows = slice(start, start + _THROUGH_NORM_ROWS)
            values, grad, inverse = x[rows].float(), grad_hat[rows], inv_norms[rows]
            radial = torch.linalg.vecdot(values, grad) * inverse * inverse
            grad.addcmul_(values, radial[:, None], value=-1.0).mul_(inverse[:, None])
    return grad_hat.to(x.dtype, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Logits form
# ----------------------------------------------------------------------------------------------


def logits_forward(
    logits: torch.Tensor, query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos)`` of a square logits matrix in one read.
    Equivalent PyTorch: ``gcl_ops.reference.naive_masked_lse`` and the diagonal."""
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    block_m, block_n, _ = tiling.logits_tiles(tiling.architecture(logits.device))
    logits = _fit_int32_offsets(logits, block_m, block_n)
    row_blocks = triton.cdiv(n, block_m)
    # Row blocks alone leave SMs idle for a small batch (N = 8192: 128 programs on 132 SMs).
    sms = _sm_count(logits.device)
    target = 4 * sms if sms else 2 * row_blocks
    splits = max(1, min(triton.cdiv(n, block_n), triton.cdiv(target, row_blocks)))
    row_max, row_sum = torch.empty(splits, n, **f32), torch.empty(splits, n, **f32)
    col_max, col_sum = torch.empty(row_blocks, n, **f32), torch.empty(row_blocks, n, **f32)
    placeholder = row_max
    _logits_stats_kernel[(row_blocks, splits)](
        logits, placeholder if query_ids is None else query_ids.contiguous(),
        placeholder if doc_ids is None else doc_ids.contiguous(),
        row_max, row_sum, col_max, col_sum, logits.stride(0), logits.stride(1), n, splits,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_QID=query_ids is not None,
        HAS_DID=doc_ids is not None,
    )  # fmt: skip
    # Merge the partials: lse = logsumexp_b (max_b + log sum_b) (-inf where all are empty).
    neg_row = torch.logsumexp(row_max + torch.log(row_sum), dim=0)
    neg_col = torch.logsumexp(col_max + torch.log(col_sum), dim=0)
    return neg_row, neg_col, logits.diagonal().to(torch.float32, copy=True)


def logits_backward(
    logits: torch.Tensor,
    query_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    grad_neg_row: torch.Tensor,
    grad_neg_col: torch.Tensor,
    grad_pos: torch.Tensor,
) -> torch.Tensor:
    """``dL/dlogits`` from the statistics' gradients, in one elementwise pass."""
    n = logits.shape[0]
    _, _, block = tiling.logits_tiles(tiling.architecture(logits.device))
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
