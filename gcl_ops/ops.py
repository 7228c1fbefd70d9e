"""Launchers of the Triton kernels and the custom ops ``gcl_ops::*`` that dispatch to them or to
the blocked PyTorch path of ``gcl_ops.reference``.

The launchers check nothing but shapes and allocate. The custom ops are opaque to
``torch.compile`` (no graph break); registering them is a side effect of importing this module.
"""

import contextlib
import functools
import itertools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from gcl_ops import reference
from gcl_ops._triton import interpreting, triton
from gcl_ops.kernels.logits import _logits_grad_kernel, _logits_stats_kernel
from gcl_ops.kernels.stats_backward import _stats_bwd_kernel
from gcl_ops.kernels.stats_forward import _online_lse_kernel, _stats_fwd_kernel
from gcl_ops.reference import (  # the fixed shift and the underflow threshold: one place
    SHIFT_HEADROOM,
    TINY_SUM,
)

#: The Triton path keeps whole embedding rows on chip; wider embeddings take the PyTorch path.
MAX_TRITON_K = 1024


# ==============================================================================================
# Launchers
# ==============================================================================================

#: Whether the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1).
_INTERPRETING = interpreting(_stats_fwd_kernel)


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _tile_candidates(
    k_pad: int, element_size: int, backward: bool, tf32: bool = False
) -> list[dict[str, int]]:
    """The tile configurations worth timing for a problem of (padded) width ``k_pad``, the
    default first (what launches when the autotuner is off, and under the interpreter).

    Forward: a ``BLOCK_M x BLOCK_N`` similarity tile, a GEMM over ``k`` in ``BLOCK_K`` slices.
    Backward: a ``BLOCK_N x BLOCK_M`` tile (documents x queries), a ``BLOCK_N x K_SLICE`` fp32
    accumulator of ``dD^`` kept on chip and chunks of ``dQ^`` added atomically; ``k`` is cut
    into ``K_PAD / K_SLICE`` slices, each recomputing ``S`` (2k FLOPs per N^2 each): one slice
    reaches the 6k of a backward without recomputation but costs registers (64 x 512 fp32 is
    half of an SM's register file). Every candidate compiles for Hopper (sm_90a) without
    register spills (``benchmarks/static_tile_check.py``); the tensor-core ones put every GEMM
    on wgmma. They trade FLOPs against the shape of the wgmma instructions:

    * 64 x 64 tiles, slices of 256 (half) or 128 (TF32): the default from k = 256 (half) or
      128 (TF32) on and below k = 64 (between: 32 x 128, resident, see ``RESIDENT``). 10k
      (half) or 14k (TF32) FLOPs per N^2 at k = 512, wgmma m64n32 for ``S`` (A and B from
      shared memory).
    * 16-query row blocks with the full width of k = 512 (half): 8k FLOPs per N^2 at k = 512,
      but ``S`` and ``dQ^`` then run as wgmma m64n8 (two warp groups share the 16 columns),
      which read their operands from shared memory at about 3x the bytes per FLOP of m64n32:
      by that count about a fifth of the tensor-core rate for two of the three GEMMs (m64n32:
      about two thirds). TF32: 32-query row blocks with 256-wide slices (m64n16k8), 10k at
      k = 512.

    ``RESIDENT`` (backward): where one slice spans ``k``, a row is at most 256 bytes (half:
    k <= 128; TF32: k <= 64) and the GEMMs run on tensor cores, the documents' tile stays on
    chip for the whole row loop and each query tile for both of its GEMMs: ``S^T`` and the
    gradients read no operand twice (otherwise each tile is read again from L2 for its second
    GEMM). There the default is 32 queries x 128 documents from k = 64 on: per entry of ``S``
    half the query reads and half the fp32 atomic adds of ``dQ^`` of 64 documents (which
    dominate the bytes once the operands are resident), with ``S^T`` on wgmma m64n32 as in the
    64 x 64 tiles. Below k = 64 the transposed ``dQ^`` GEMM of 32-query row blocks would have
    fewer than wgmma's 64 rows (``k``) and fall back to mma.sync: 64 x 64 there.

    Which is faster is for a GPU to say: the first call of each problem size bucket, width and
    dtype times them all and keeps the fastest. Not yet timed on a GPU. fp32 with IEEE GEMMs
    runs on the FMA units, in small tiles and 64-wide slices (wider ones spill kilobytes).
    The interpreter gets small tiles: few programs, while ragged tiles, k slices (backward:
    slices of 32), the transposed ``dQ^`` GEMM of row blocks below 64 and split row blocks are
    exercised."""
    half = element_size <= 2

    def resident(config: dict) -> dict:
        # Both operand tiles on chip for both their GEMMs where one slice spans k, the row at
        # most 256 bytes (wider: the whole-width dQ^ accumulator spills) and the GEMMs run on
        # tensor cores (FMA loops gain nothing from it and hold their operands in registers).
        whole = config["K_SLICE"] == k_pad and k_pad * element_size <= 256 and (half or tf32)
        return dict(config, RESIDENT=whole)

    if _INTERPRETING:
        tiles = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4)
        return [resident(dict(tiles, K_SLICE=min(k_pad, 32))) if backward else tiles]
    block_k = min(k_pad, 64 if half else 32)

    def tiles(block_m: int, block_n: int, warps: int, stages: int, **extra: int) -> dict:
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=extra.pop("BLOCK_K", block_k),
                    num_warps=warps, num_stages=stages, **extra)  # fmt: skip

    if not backward:
        wide, tall = tiles(64, 128, 8, 3), tiles(128, 64, 8, 3)
        if not half and not tf32:  # FMA loops: 128 x 64 spills 44 bytes in three stages
            tall = dict(tall, num_stages=2)
        first, second = (tall, wide) if half else (wide, tall)
        return [first, second, dict(first, num_stages=4)]
    if not half and not tf32:  # FMA loops: small tiles
        candidates = [
            tiles(32, 32, 8, 2, K_SLICE=min(k_pad, 64)),
            tiles(16, 32, 4, 2, K_SLICE=min(k_pad, 64)),
            tiles(32, 32, 4, 2, K_SLICE=min(k_pad, 32)),
        ]
        if k_pad <= 32:  # there ptxas holds the others to 128 registers: with ids, 4-16 B spill
            candidates = candidates[:1]
    else:
        # 64 x 64 tiles in slices of 256 (half; also 128) or 128 (TF32); and a 64-document
        # dD^ as wide as the registers allow next to 16 (half) or 32 (TF32) query rows.
        slices = (256, 128) if half else (128,)
        candidates = [tiles(64, 64, 8, 2, K_SLICE=min(k_pad, width)) for width in slices]
        widest = min(k_pad, 512 if half else 256)
        if widest > candidates[0]["K_SLICE"]:
            candidates.append(tiles(16 if half else 32, 64, 8, 2, K_SLICE=widest))
        # Resident operands (below), 128 documents per program; from k = 64 on, where the
        # transposed dQ^ GEMM of its 32-query row blocks has the 64 rows of k that wgmma needs
        # (below, the 64 x 64 tile: dQ^ = dS D_c has 64 query rows).
        if k_pad >= 64 and k_pad * element_size <= 256:
            candidates.insert(0, tiles(32, 128, 8, 2, K_SLICE=k_pad))
    candidates = [resident(config) for config in candidates]
    return [config for i, config in enumerate(candidates) if config not in candidates[:i]]


def _tile_sizes(
    k_pad: int, element_size: int, backward: bool, tf32: bool = False
) -> dict[str, int]:
    """The default tiles (``_tile_candidates``' first): what launches without the autotuner."""
    return _tile_candidates(k_pad, element_size, backward, tf32)[0]


def _autotuning() -> bool:
    """Whether launches go through ``triton.autotune``: on a GPU, unless ``GCL_OPS_AUTOTUNE=0``
    (then the default tiles launch, as under the interpreter, which times nothing) or a CUDA
    graph is being captured (timing synchronises, which a capture does not allow)."""
    if _INTERPRETING or os.environ.get("GCL_OPS_AUTOTUNE", "1") == "0":
        return False
    return not _capturing()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#: The tiles the autotuner chose, per launch (``_launch``'s key), for the launches made while
#: a CUDA graph is captured: they reuse the kernel compiled (and loaded) for the warm-up steps
#: before the capture, where other tiles would compile and load a module inside the capture,
#: which CUDA does not allow.
_CHOSEN_TILES: dict = {}


def _launch(which: str, grid, arguments: tuple, flags: dict, tiles: dict, key: tuple) -> None:
    """The forward or backward kernel (``which``) over ``grid``: through the autotuner
    (``_autotuning``), else with ``tiles`` (the defaults) or, while a CUDA graph is captured,
    the tiles the autotuner chose for this ``key`` before."""
    if _autotuning():
        autotuner = _autotuned(which)
        autotuner[grid](*arguments, **flags, **_COMPILE_OPTIONS)
        if getattr(autotuner, "best_config", None) is not None:
            _CHOSEN_TILES[key] = _config_tiles(autotuner.best_config)
        return
    if _capturing():
        tiles = _CHOSEN_TILES.get(key, tiles)
    kernel = _stats_bwd_kernel if which == "backward" else _stats_fwd_kernel
    kernel[grid](*arguments, **flags, **tiles, **_COMPILE_OPTIONS)


#: Compile options of every embedding-form launch. No floating-point contraction: the kernels
#: compute S bitwise alike in every kernel that recomputes it, and the forward carries rounding
#: errors by TwoSum and an explicit fma; LLVM would otherwise fuse a product into the next
#: addition where one kernel's code allows it and another's does not.
_COMPILE_OPTIONS = dict(enable_fp_fusion=False)


#: Problems above this many entries (65,536^2) share one autotuning bucket, timed once on their
#: leading block of that size (``_tune_on_leading_block``): a first call at N = 1M would
#: otherwise time every candidate at full size, minutes on the first step.
_TUNE_ENTRIES = 1 << 32
_TUNED_ON_LEADING_BLOCK: set = set()


def _size_bucket(n_rows: int, n_cols: int) -> int:
    """``round(log2(n_rows n_cols) / 2)``, at most 16: problems whose tiles the autotuner times
    once (with the width ``k``, the dtypes and the compile-time switches)."""
    return round(math.log2(max(min(n_rows * n_cols, _TUNE_ENTRIES), 1)) / 2)


def _tune_on_leading_block(key: tuple, n_rows: int, n_cols: int, launch) -> None:
    """Before the first autotuned launch of a problem above ``_TUNE_ENTRIES`` (per ``key``: the
    kernel, width, dtype and switches), ``launch(rows, cols)`` runs the same problem on its
    leading ``rows x cols`` block (at most 65,536 rows, at most ``_TUNE_ENTRIES`` entries,
    offset 0), whose result is discarded: the autotuner times the candidates there, and the
    full problem, in the same size bucket, then launches with the tiles it chose."""
    if not _autotuning() or n_rows * n_cols <= _TUNE_ENTRIES or key in _TUNED_ON_LEADING_BLOCK:
        return
    rows = min(n_rows, 1 << 16)
    launch(rows, min(n_cols, _TUNE_ENTRIES // rows))
    _TUNED_ON_LEADING_BLOCK.add(key)


def _head(ids: torch.Tensor | None, length: int) -> torch.Tensor | None:
    return None if ids is None else ids[:length]


def _config_tiles(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@functools.cache
def _autotuned(which: str):
    """The forward or backward kernel under ``triton.autotune``: every configuration that
    ``_tile_candidates`` proposes for some width and dtype, pruned per call to this call's
    candidates; the atomically accumulated outputs are zeroed before each timed run."""
    backward = which == "backward"
    kernel = _stats_bwd_kernel if backward else _stats_fwd_kernel
    data = "query_ptr" if backward else "rows_ptr"
    seen, configs = set(), []
    for k_pad, element_size, tf32 in itertools.product(
        [16 << i for i in range(7)], (2, 4), (False, True)
    ):
        for tiles in _tile_candidates(k_pad, element_size, backward, tf32):
            key = tuple(sorted(tiles.items()))
            if key not in seen:
                seen.add(key)
                launch = {name: tiles[name] for name in ("num_warps", "num_stages")}
                kwargs = {name: v for name, v in tiles.items() if name not in launch}
                configs.append(triton.Config(kwargs, **launch))

    def prune(configs, named_args, **kwargs):
        x = named_args[data]
        wanted = _tile_candidates(
            _k_pad(named_args["k"]), x.element_size(), backward,
            kwargs.get("INPUT_PRECISION") == "tf32",
        )  # fmt: skip
        return [config for config in configs if _config_tiles(config) in wanted]

    zeroed = (["grad_query_ptr", "grad_doc_ptr", "scale_cols_ptr"] if backward
              else ["row_sum_ptr", "col_sum_ptr", "pos_ptr"])  # fmt: skip
    key = ["size_bucket", "k", "INPUT_PRECISION", "NORMALIZE", "HAS_QID", "HAS_DID"]
    if backward:
        key += ["NEED_QUERY", "NEED_DOC", "SCALE_GRAD"]
    return triton.autotune(
        configs, key=key, prune_configs_by={"early_config_prune": prune}, reset_to_zero=zeroed
    )(kernel)


def _num_splits(n_rows: int, n_cols: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Column splits so that the forward grid has about four programs per SM."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: two splits exercise the atomic row sums too
        target = 2 * triton.cdiv(n_rows, block_m)
    return max(
        1, min(triton.cdiv(n_cols, block_n), triton.cdiv(target, triton.cdiv(n_rows, block_m)))
    )


def _allow_tf32(autocast: bool = False) -> bool:
    """Whether fp32 GEMMs may use TF32. The newer setting
    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none": defer to the legacy
    one) comes first and is final: once it is set, the legacy
    ``torch.get_float32_matmul_precision()`` raises. Otherwise TF32 under ``autocast`` (the
    call was made inside ``torch.autocast`` for the inputs' device: the user asked for reduced
    precision, which autocast would give a matmul as bf16/fp16; TF32 keeps fp32's range and
    10 bits more than bf16) or where the legacy setting allows it."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return autocast or torch.get_float32_matmul_precision() != "highest"


def _kernel_flags(x: torch.Tensor, tf32: bool | None = None) -> dict:
    """Compile-time switches that depend on the dtype and the fp32 GEMM precision (``tf32``;
    ``None``: the user's fp32 matmul setting, ``_allow_tf32()``)."""
    tf32 = _allow_tf32() if tf32 is None else tf32
    return dict(
        INPUT_PRECISION="tf32" if tf32 else "ieee",
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
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos)`` and, for the backward, ``row_parts`` ``(3, N)``: ``lse / t``
    of the rows as an fp32 pair ``hi + lo`` (``_lse_parts``) and the positive cosines ``S_ii``,
    and ``col_parts`` ``(2, M)``: ``lse / t`` of the columns. ``autocast``: the call was made
    under autocast (fp32 GEMMs then in TF32, ``_allow_tf32``)."""
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
    row_sum, col_sum = torch.zeros(n, **f32), torch.zeros(m, **f32)
    positive_cosines = torch.zeros(n, **f32)

    tf32 = _allow_tf32(autocast)
    key = ("forward", k, query.dtype, normalize, query_ids is None, doc_ids is None, tf32)
    _tune_on_leading_block(key, n, m, lambda rows, cols: _triton_stats_forward(
        query[:rows], doc[:cols], scale, _head(query_ids, cols), _head(doc_ids, cols), 0,
        normalize, autocast,
    ))  # fmt: skip
    tiles = _tile_sizes(_k_pad(k), query.element_size(), backward=False, tf32=tf32)
    block_m = tiles["BLOCK_M"]
    id_pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, row_sum, swap=False)
    flags = dict(NORMALIZE=normalize, **id_flags, **_kernel_flags(query, tf32))
    problem = (query, doc, inv_query, inv_doc, query_ids, doc_ids, offset, row_sum)

    def grid(meta: dict) -> tuple[int, int]:
        splits = _num_splits(n, m, meta["BLOCK_M"], meta["BLOCK_N"], query.device)
        return (triton.cdiv(n, meta["BLOCK_M"]), splits)

    arguments = (
        query, doc, inv_query, inv_doc, *id_pointers, shift_arguments, row_sum, col_sum,
        positive_cosines,
        query.stride(0), query.stride(1), doc.stride(0), doc.stride(1),
        n, m, k, offset, _size_bucket(n, m),
    )  # fmt: skip
    _launch("forward", grid, arguments, flags, tiles, (*key, query.device, _size_bucket(n, m)))
    # The recomputation (rarely run) in at most 64-wide column tiles, 4 warps, 2 stages:
    # the forward's 128-wide tiles spill there for fp32 with IEEE dot products.
    constants = {**flags, **tiles, "BLOCK_N": min(tiles["BLOCK_N"], 64), "num_warps": 4,
                 "num_stages": 2, **_COMPILE_OPTIONS}  # fmt: skip
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
    # Z_ii = t S_ii rounded once; the backward also gets S_ii itself (row_parts[2]) for d t.
    pos = (scale64 * positive_cosines.double()).float()
    return neg_row, neg_col, pos, torch.cat([row_parts, positive_cosines[None]]), col_parts


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
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)`` in one launch of the fused backward, which computes only the
    parts in ``needs_grad`` (a skipped gradient comes back as an empty tensor).
    ``row_parts`` ``(3, N)``, ``col_parts`` ``(2, M)``: the forward's (``_triton_stats_forward``);
    without them, the log-sum-exp parts of the fp32 ``neg_row``, ``neg_col`` and recomputed
    positive cosines. ``autocast``: the forward's (the GEMMs recompute its ``S``)."""
    (n, k), m = query.shape, doc.shape[0]
    query, doc = _fit_int32_offsets(query, 0, k), _fit_int32_offsets(doc, 0, k)
    f32 = dict(device=query.device, dtype=torch.float32)
    scale32 = scale.detach().to(**f32).reshape(1)
    if row_parts is None or col_parts is None:  # (positive cosines recomputed here)
        positive_cosines = torch.linalg.vecdot(
            *(F.normalize(x.float(), dim=-1) if normalize else x.float()
              for x in (query, doc[offset : offset + n]))
        )  # fmt: skip
        row_parts, col_parts = (_lse_parts(lse, scale32.double()) for lse in (neg_row, neg_col))
        row_parts = torch.cat([row_parts, positive_cosines[None]])
    positive_cosines = row_parts[2]
    inv_query, inv_doc = _inverse_norms(query, normalize), _inverse_norms(doc, normalize)
    grad_neg_row, grad_neg_col, grad_pos = (
        g.to(**f32).contiguous() for g in (grad_neg_row, grad_neg_col, grad_pos)
    )
    need_query, need_doc, need_scale = needs_grad
    if need_scale and not (need_query or need_doc):
        need_query = True  # d scale comes out of a gradient pass
    tf32 = _allow_tf32(autocast)
    key = ("backward", k, query.dtype, normalize, query_ids is None, doc_ids is None,
           tf32, need_query, need_doc, need_scale)  # fmt: skip
    _tune_on_leading_block(key, n, m, lambda rows, cols: _triton_stats_backward(
        query[:rows], doc[:cols], scale, _head(query_ids, cols), _head(doc_ids, cols),
        neg_row[:rows], neg_col[:cols], grad_neg_row[:rows], grad_neg_col[:cols],
        grad_pos[:rows], 0, normalize, (need_query, need_doc, need_scale),
        row_parts[:, :rows], col_parts[:, :cols], autocast,
    ))  # fmt: skip
    # fp32 accumulators of dQ^, dD^ (through the normalised vectors), added to atomically.
    grad_query_hat = torch.zeros(n if need_query else 0, k, **f32)
    grad_doc_hat = torch.zeros(m if need_doc else 0, k, **f32)
    scale_cols = torch.zeros(m if need_scale else 0, **f32)
    scalars = scale32
    if query.dtype == torch.float16:  # the bounds of the fp16 rescaling (see the kernel)
        max_inv_query = inv_query.max().reshape(1) if normalize else torch.ones(1, **f32)
        scalars = torch.cat([scale32, max_inv_query,
                             (grad_neg_row.abs() + grad_pos.abs()).max().reshape(1)])  # fmt: skip
    id_pointers, id_flags = _ids_arguments(query_ids, doc_ids, offset, n, scale32, swap=False)
    flags = dict(NORMALIZE=normalize, NEED_QUERY=need_query, NEED_DOC=need_doc,
                 SCALE_GRAD=need_scale, **id_flags, **_kernel_flags(query, tf32))  # fmt: skip

    def grid(meta: dict) -> tuple[int, int, int]:
        return _backward_grid(n, m, k, meta, query.device)

    arguments = (
        query, doc, inv_query, inv_doc, *id_pointers, scalars,
        row_parts[:2].contiguous(), col_parts.contiguous(), grad_neg_row, grad_neg_col, grad_pos,
        grad_query_hat, grad_doc_hat, scale_cols,
        query.stride(0), query.stride(1), doc.stride(0), doc.stride(1),
        n, m, k, offset, _size_bucket(n, m),
    )  # fmt: skip
    tiles = _tile_sizes(_k_pad(k), query.element_size(), backward=True, tf32=tf32)
    _launch("backward", grid, arguments, flags, tiles, (*key, query.device, _size_bucket(n, m)))
    # d t = sum_ij dZ_ij S_ij: the kernel sums the negatives' terms per column; the positives'
    # g_pos_i S_ii are summed here in float64 (they are the largest terms, w_i / 2 S_ii and
    # more, and cancel against the negatives' sums: fp32 partial sums of them cost digits).
    if need_scale:
        positives = (grad_pos.double() * positive_cosines.double()).sum()
        grad_scale = (scale_cols.double().sum() + positives).to(scale.dtype)
    else:
        grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    grad_query = _through_norm(query, grad_query_hat, inv_query, normalize) if need_query else None
    del grad_query_hat
    grad_doc = _through_norm(doc, grad_doc_hat, inv_doc, normalize) if need_doc else None
    return (
        query.new_empty(0) if grad_query is None else grad_query,
        doc.new_empty(0) if grad_doc is None else grad_doc,
        grad_scale,
    )


#: Rows per step of ``_through_norm``: bounds its fp32 temporaries to 32K x k.
_THROUGH_NORM_ROWS = 1 << 15


def _through_norm(
    x: torch.Tensor, grad_hat: torch.Tensor, inv_norms: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """``dL/dx`` in ``x``'s dtype from the fp32 ``dL/dx^`` through ``x^ = x / |x|`` (the
    identity without normalisation): ``dx = (dx^ - x <x, dx^> / |x|^2) / |x|``, computed in
    place in ``grad_hat``, in blocks of rows."""
    if not normalize:
        return grad_hat.to(x.dtype)
    for start in range(0, x.shape[0], _THROUGH_NORM_ROWS):
        rows = slice(start, start + _THROUGH_NORM_ROWS)
        values, grad, inverse = x[rows].float(), grad_hat[rows], inv_norms[rows]
        radial = torch.linalg.vecdot(values, grad) * inverse * inverse
        grad.addcmul_(values, radial[:, None], value=-1.0).mul_(inverse[:, None])
    return grad_hat.to(x.dtype)


def _backward_grid(n_rows: int, n_cols: int, k: int, tiles: dict, device: torch.device) -> tuple:
    """``(column blocks, row splits, k slices)``: the column blocks (and the k slices) alone
    leave SMs idle for a small local batch (N = 4096, BLOCK_N = 64: 64 programs on 132 SMs);
    the row blocks are then split too, for about two programs per SM, at the price of one more
    atomic add of each program's ``dD^`` block."""
    col_blocks = triton.cdiv(n_cols, tiles["BLOCK_N"])
    k_slices = triton.cdiv(k, tiles["K_SLICE"])  # (none wholly beyond k)
    row_blocks = triton.cdiv(n_rows, tiles["BLOCK_M"])
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: two splits exercise the atomic dD^ too
        target = 2 * col_blocks * k_slices
    row_splits = max(1, min(row_blocks, triton.cdiv(target, col_blocks * k_slices)))
    return (col_blocks, row_splits, k_slices)


def _triton_logits_forward(
    logits: torch.Tensor, query_ids: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    f32 = dict(device=logits.device, dtype=torch.float32)
    block_m, block_n = (32, 32) if _INTERPRETING else (128, 64)
    logits = _fit_int32_offsets(logits, block_m, block_n)
    row_blocks = triton.cdiv(n, block_m)
    # Row blocks alone leave SMs idle for a small batch (N = 8192: 64 programs on 132 SMs).
    splits = _num_splits(n, n, block_m, block_n, logits.device)
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
# Custom ops (opaque to torch.compile)
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
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(neg_row, neg_col, pos, row_parts, col_parts)``: the last two only for the backward,
    the log-sum-exps more precisely than fp32 holds them near |Z| = 64: the Triton path's
    ``lse / t`` in two fp32 parts, ``(2, M)`` for the columns, and for the rows ``(3, N)`` with
    the positive cosines as a third row; the PyTorch path's in float64, ``(N,)`` and ``(M,)``.
    ``autocast``: the caller ran under autocast (the Triton path's fp32 GEMMs then use TF32)."""
    # Autocast stays outside: the statistics are computed in fp32 from the inputs as they are.
    with torch.autocast(query.device.type, enabled=False), _on_device(query):
        if backend == "triton":
            return _triton_stats_forward(
                query, doc, scale, query_ids, doc_ids, offset, normalize, autocast
            )
        return reference.blockwise_stats_forward(
            query, doc, scale, query_ids, doc_ids, offset, normalize, _block_elements(query)
        )


@_gcl_stats_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, offset, normalize, backend, autocast=False):
    dtype = torch.float32 if backend == "triton" else query.dtype
    n, m = query.shape[0], doc.shape[0]
    triton_path = backend == "triton"
    parts_dtype = torch.float32 if triton_path else torch.float64
    return (
        query.new_empty(n, dtype=dtype),
        query.new_empty(m, dtype=dtype),
        query.new_empty(n, dtype=dtype),
        query.new_empty((3, n) if triton_path else (n,), dtype=parts_dtype),
        query.new_empty((2, m) if triton_path else (m,), dtype=parts_dtype),
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
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d query, d doc, d scale)``; a gradient not needed comes back empty (``(0,)``) and is
    not computed (the Triton path skips its pass, the PyTorch path its GEMM).
    ``row_parts``, ``col_parts``: the forward's precise log-sum-exps (``gcl_stats``);
    ``autocast``: the forward's, for the Triton path."""
    args = (query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
            grad_pos, offset, normalize)  # fmt: skip
    needs_grad = (needs_query_grad, needs_doc_grad, needs_scale_grad)
    with torch.autocast(query.device.type, enabled=False), _on_device(query):
        if backend == "triton":
            grad_query, grad_doc, grad_scale = _triton_stats_backward(
                *args, needs_grad, row_parts, col_parts, autocast
            )
        else:
            grad_query, grad_doc, grad_scale = reference.blockwise_stats_backward(
                *args, _block_elements(query), need_query=needs_query_grad,
                need_doc=needs_doc_grad, need_scale=needs_scale_grad, lse_row=row_parts,
                lse_col=col_parts,
            )  # fmt: skip
    if not needs_query_grad:
        grad_query = query.new_empty(0)
    if not needs_doc_grad:
        grad_doc = doc.new_empty(0)
    return grad_query, grad_doc, grad_scale.to(scale.dtype)


@_gcl_stats_backward_op.register_fake
def _(query, doc, scale, query_ids, doc_ids, neg_row, neg_col, grad_neg_row, grad_neg_col,
      grad_pos, offset, normalize, backend, needs_query_grad=True, needs_doc_grad=True,
      needs_scale_grad=True, row_parts=None, col_parts=None, autocast=False):  # fmt: skip
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
