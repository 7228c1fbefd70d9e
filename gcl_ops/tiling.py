"""Tile choice of the Triton kernels: one default per kernel, precision and GPU architecture, read by
the launchers (``gcl_ops.launchers``). Autotuning is opt-in (``GCL_OPS_AUTOTUNE=1``): it times
the default against deeper and shallower software pipelines, which no static count can rank.

Every default compiles without register spills for ``k`` from 16 to 1024 (multiples of 16: the
launchers pad ``k`` with zero columns, which change neither the dot products nor the norms) and
``N`` not divisible by 16, and on Hopper every half and TF32 GEMM runs on wgmma:
``benchmarks/static_tile_check.py`` compiles them with ptxas and records the traffic model
(``benchmarks/results/static_tiles_<arch>.csv``). None has been timed on a GPU yet.
"""

from __future__ import annotations

import os

import torch

from gcl_ops._triton import interpreting, triton
from gcl_ops.kernels.stats_forward import _stats_fwd_kernel

#: Whether the kernels were defined under the Triton interpreter (``TRITON_INTERPRET=1``).
INTERPRETING = interpreting(_stats_fwd_kernel)
ARCHITECTURES = ("sm80", "sm89", "sm90", "sm100")
PRECISIONS = ("half", "tf32", "ieee")  # bf16 / fp16 operands, fp32 on TF32 or on IEEE FMAs
STRATEGIES = ("split", "atomic")

#: Per architecture and precision, the forward's streaming tiles ``(BLOCK_M, BLOCK_N, BLOCK_K,
#: warps, stages)`` (``BLOCK_K`` the widest slice of ``k``) and its resident ones ``(BLOCK_M,
#: BLOCK_N, warps, stages)``, tried in order: the row block on chip for the whole loop, so that
#: each column tile is read once (``k e / BLOCK_M`` bytes per entry from L2, not
#: ``k e (1 / BLOCK_M + 1 / BLOCK_N)``).
_FORWARD_STREAMING = {
    ("sm90", "half"): (128, 64, 64, 8, 3),
    ("sm90", "tf32"): (128, 64, 32, 8, 3),
    ("sm90", "ieee"): (64, 64, 32, 4, 2),
    ("sm80", "half"): (128, 64, 32, 8, 3),
    ("sm80", "tf32"): (64, 64, 32, 8, 3),
    ("sm80", "ieee"): (64, 64, 32, 4, 2),
    ("sm100", "half"): (128, 64, 64, 8, 2),
    ("sm100", "ieee"): (32, 32, 32, 4, 2),
}
_FORWARD_RESIDENT = {
    ("sm90", "half"): ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
    ("sm90", "tf32"): ((128, 32, 8, 2), (64, 32, 4, 2)),
    ("sm80", "half"): ((128, 32, 8, 2), (64, 32, 4, 2)),
    ("sm80", "tf32"): ((64, 32, 4, 2),),
}
#: The backward: ``(BLOCK_OWN, BLOCK_OTHER, BLOCK_K, warps, stages, MAIN_CAP, TAIL_CAP)``: one
#: slice of ``k`` up to ``MAIN_CAP + TAIL_CAP`` columns (a 64 x 576 fp32 accumulator is 144
#: registers per thread at 8 warps), wider ``k`` in slices of at most ``MAIN_CAP``, each
#: recomputing ``S``. One slice runs resident where the own block and ``stages`` blocks of the
#: other side fit in ``SHARED_MEMORY``: each block read once for both its GEMMs.
_BACKWARD = {
    ("sm90", "half", "split"): (64, 32, 64, 8, 2, 512, 64),
    ("sm90", "tf32", "split"): (64, 32, 32, 8, 1, 256, 64),
    ("sm90", "ieee", "split"): (64, 32, 32, 8, 2, 64, 0),
    ("sm90", "half", "atomic"): (64, 64, 64, 8, 2, 256, 0),
    ("sm90", "tf32", "atomic"): (64, 64, 32, 8, 2, 128, 0),
    ("sm100", "half", "split"): (64, 64, 64, 8, 2, 256, 64),
    ("sm100", "tf32", "split"): (64, 64, 32, 8, 1, 256, 0),
    ("sm100", "ieee", "split"): (32, 32, 32, 4, 2, 64, 0),
    ("sm80", "half", "split"): (32, 32, 32, 8, 1, 512, 0),
    ("sm80", "tf32", "split"): (32, 32, 32, 8, 1, 256, 64),
    ("sm80", "ieee", "split"): (32, 32, 32, 8, 2, 64, 0),
    ("sm80", "half", "atomic"): (32, 32, 32, 8, 2, 256, 0),
    ("sm80", "tf32", "atomic"): (64, 32, 32, 8, 2, 128, 0),
}
#: Shared memory the resident operands may take per block (H100, B200: 227 KiB per block; A100:
#: 163; the 8.6 / 8.9 class: 99), leaving room for the other buffers (the dS operand, layout
#: conversions).
SHARED_MEMORY = {
    "sm90": 200 * 1024,
    "sm100": 200 * 1024,
    "sm80": 136 * 1024,
    "sm89": 80 * 1024,
    "interpreter": 1 << 30,
}
#: Under the interpreter: small tiles, so that ragged tiles, slices of k (and a tail), split
#: loops and the atomic paths all run on test-sized problems; resident where k fits one slice.
_INTERPRETER_FORWARD = (32, 32, 16, 4, 1)
_INTERPRETER_BACKWARD = (32, 32, 16, 4, 1, 32, 16)


def architecture(device: torch.device) -> str:
    """``"interpreter"``, or the tile table's name for the device's GPU: Blackwell from compute
    capability 10, Hopper 9, A100 8.0, and the A10 / L4 / L40 / RTX class (8.6, 8.9: Ampere's
    tiles in their 100 KiB of shared memory)."""
    if INTERPRETING or device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "sm100"
    return "sm90" if major == 9 else "sm80" if minor == 0 else "sm89"


def precision_class(dtype: torch.dtype, tf32: bool) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "tf32" if tf32 else "ieee"


def padded_width(k: int) -> int:
    """``k`` rounded up to a multiple of 16 (what the launchers pad the inputs to)."""
    return -(-k // 16) * 16


def _slice_width(k_pad: int, widest: int) -> int:
    """The widest of ``widest``, ``widest / 2``, 16 whose multiples cover ``k_pad`` with at most
    1/8 of padding (k = 304 in slices of 64, 80 in slices of 16)."""
    for width in (widest, widest // 2, 16):
        if -(-k_pad // width) * width <= k_pad * 9 // 8:
            return width
    return 16


def k_parts(width: int, min_tail: int = 16) -> tuple[int, int]:
    """``(K_MAIN, K_TAIL)``: a width (a multiple of 16) as a power of two and a power-of-two
    tail of at least ``min_tail`` that together cover it (300 -> 256 + 64, 520 -> 512 + 16)."""
    main = 1 << (width.bit_length() - 1)
    return main, 0 if width == main else max(min_tail, triton.next_power_of_2(width - main))


def k_slices(k_pad: int, main_cap: int, tail_cap: int, min_tail: int = 16) -> tuple[int, int, int]:
    """``(K_MAIN, K_TAIL, slices)`` of the backward's accumulators: one slice where ``k_pad <=
    main_cap + tail_cap``, else the fewest of at most ``main_cap`` columns."""
    slices = 1 if k_pad <= main_cap + tail_cap else -(-k_pad // main_cap)
    return (*k_parts(padded_width(-(-k_pad // slices)), min_tail), slices)


def _fits(arch: str, precision: str, width: int, resident_rows: int, streamed_rows: int) -> bool:
    """Whether operands of ``width`` columns for ``resident_rows`` on chip and ``streamed_rows``
    in flight fit ``SHARED_MEMORY``. fp32 operands count twice: the loaded tile and its
    TF32-rounded copy, which the GEMM reads. Never for IEEE fp32 (FMA loops), nor for TF32 on
    Ampere (whose mma.sync holds the operands in registers: they spill)."""
    per_element = {"half": 2, "tf32": 8}.get(precision)
    if per_element is None or (precision == "tf32" and _known(arch) == "sm80"):
        return False
    return per_element * width * (resident_rows + streamed_rows) <= SHARED_MEMORY[arch]


def forward_tiles(arch: str, precision: str, k_pad: int) -> dict:
    """``BLOCK_M, BLOCK_N, BLOCK_K, K_MAIN, K_TAIL, RESIDENT, num_warps, num_stages`` of
    ``_stats_fwd_kernel``: the first resident tiles whose row block and pipelined column tiles
    fit in shared memory, else streaming ones."""
    main, tail = k_parts(k_pad)
    if arch == "interpreter":
        block_m, block_n, widest, warps, stages = _INTERPRETER_FORWARD
        resident = [(block_m, block_n, warps, stages)]
    else:
        block_m, block_n, widest, warps, stages = _lookup(_FORWARD_STREAMING, arch, precision)
        resident = _lookup(_FORWARD_RESIDENT, arch, precision, default=())
    tiles = dict(BLOCK_K=_slice_width(k_pad, widest), K_MAIN=main, K_TAIL=tail)
    for rows, cols, resident_warps, resident_stages in resident:
        if _fits(arch, precision, main + tail, rows, resident_stages * cols):
            return dict(tiles, BLOCK_M=rows, BLOCK_N=cols, RESIDENT=True,
                        num_warps=resident_warps, num_stages=resident_stages)  # fmt: skip
    return dict(tiles, BLOCK_M=block_m, BLOCK_N=block_n, RESIDENT=False, num_warps=warps,
                num_stages=stages)  # fmt: skip


def recompute_tiles(arch: str, precision: str, k_pad: int) -> dict:
    """The exact recomputation (``_online_lse_kernel``, rarely run): the forward's streaming
    tiles at most 64 x 64, 4 warps, 2 stages (128-wide tiles spill there)."""
    if arch == "interpreter":
        block_m, block_n, widest, _, stages = _INTERPRETER_FORWARD
    else:
        block_m, block_n, widest, _, stages = _lookup(_FORWARD_STREAMING, arch, precision)
    block = 32 if precision == "ieee" else 64
    warps = 8 if (_known(arch), precision) == ("sm80", "tf32") or arch == "sm100" else 4
    return dict(BLOCK_M=min(block_m, block), BLOCK_N=min(block_n, block),
                BLOCK_K=_slice_width(k_pad, widest), num_warps=warps, num_stages=min(stages, 2))  # fmt: skip


def backward_tiles(arch: str, precision: str, k_pad: int, strategy: str) -> dict:
    """``BLOCK_OWN, BLOCK_OTHER, BLOCK_K, K_MAIN, K_TAIL, RESIDENT, num_warps, num_stages`` of
    ``_stats_bwd_kernel`` for the ``strategy``, and ``slices`` (of ``k``: the grid's third axis)."""
    if arch == "interpreter":
        table = _INTERPRETER_BACKWARD
    else:  # (IEEE fp32 runs the split backward only: its FMA loops gain nothing from atomics)
        key = "split" if precision == "ieee" else strategy
        table = _lookup(_BACKWARD, arch, precision, key)
    block_own, block_other, widest, warps, stages, main_cap, tail_cap = table
    # (Ampere: a 16-column tail next to a wide accumulator spills kilobytes, 64 none)
    main, tail, slices = k_slices(k_pad, main_cap, tail_cap, 64 if _known(arch) == "sm80" else 16)
    resident = slices == 1 and _fits(arch, precision, main + tail, block_own, stages * block_other)
    return dict(BLOCK_OWN=block_own, BLOCK_OTHER=block_other,
                BLOCK_K=_slice_width(k_pad, widest), K_MAIN=main, K_TAIL=tail,
                RESIDENT=resident, num_warps=warps, num_stages=stages, slices=slices)  # fmt: skip


def logits_tiles(arch: str) -> tuple[int, int, int]:
    """``(forward rows, forward columns, gradient tile)`` of the logits kernels: 32 everywhere
    (elementwise work; 64-wide tiles spill where 16 does not divide the matrix's row stride)."""
    return 32, 32, 32


def _lookup(table: dict, arch: str, *key: str, default=None):
    """``table``'s entry for ``arch`` itself, else for the architecture whose tiles it takes."""
    found = table.get((arch, *key)) or table.get((_known(arch), *key))
    if found is None and default is None:
        raise KeyError((arch, *key))
    return default if found is None else found


def _known(arch: str) -> str:
    """The tile table's architecture: Blackwell takes Hopper's tiles (the same shared memory),
    8.6 / 8.9 Ampere's (their shared-memory budget is their own: ``SHARED_MEMORY``)."""
    return {"sm100": "sm90", "sm89": "sm80"}.get(arch, arch)


#: The traffic model's constants per architecture: published dense rates (TFLOP/s: bf16/fp16,
#: TF32, fp32 FMA) and an L2 bandwidth (TB/s) of about twice HBM, an assumption until a GPU
#: measures it. H100 SXM, B200, A100 SXM, L40S.
PEAKS = {
    "sm90": (989, 494, 67, 7.0),
    "sm100": (2250, 1100, 80, 16.0),
    "sm80": (312, 156, 19.5, 4.0),
    "sm89": (362, 183, 91.6, 2.0),
}


def traffic(tiles: dict, k_pad: int, element_size: int, *, backward: bool,
            other_grad: bool = False, slices: int = 1, split_share: float = 0.0) -> dict:  # fmt: skip
    """The traffic model of one launch, per entry of the similarity, as its tiles issue it:
    ``flops`` (2 per multiply-add of every GEMM; ``S`` over ``BLOCK_K`` slices of ``k`` or the
    resident width), ``l2`` bytes (operand tiles loaded per tile: a tile loading ``w`` columns of
    ``e`` bytes on both sides moves ``w e (1 / rows + 1 / cols)``; resident operands only the
    streamed side's; the backward's gradient GEMM its other-side slice again where not resident;
    fp32 atomic adds at 8 bytes) and ``atomics`` (fp32 adds: the forward's column sums, the
    atomic backward's other side, and with ``split_share`` the own gradient's share added by
    other-side splits). Loads once per program and per-row statistics are left out."""
    width = tiles["K_MAIN"] + tiles["K_TAIL"]
    similarity = width if tiles["RESIDENT"] else -(-k_pad // tiles["BLOCK_K"]) * tiles["BLOCK_K"]
    if not backward:
        rows, cols = tiles["BLOCK_M"], tiles["BLOCK_N"]
        loads = 1 / rows if tiles["RESIDENT"] else 1 / rows + 1 / cols
        return dict(flops=2 * similarity, l2=similarity * element_size * loads + 8 / rows,
                    atomics=1 / rows)  # fmt: skip
    own, other = tiles["BLOCK_OWN"], tiles["BLOCK_OTHER"]
    flops = slices * (2 * similarity + 2 * width)
    if tiles["RESIDENT"]:  # the other block once per tile, for both GEMMs
        l2 = width * element_size / own
    else:
        l2 = slices * (
            similarity * element_size * (1 / own + 1 / other) + width * element_size / own
        )
    atomics = slices * width * split_share
    if other_grad:
        chunks = -(-width // 64) * 64
        flops += slices * 2 * chunks
        l2 += slices * chunks * element_size / other
        atomics += slices * chunks / own
    return dict(flops=flops, l2=l2 + 8 * atomics, atomics=atomics)


def estimate_seconds(arch: str, precision: str, model: dict, entries: float,
                     mma_sync_on_hopper: bool = False) -> float:  # fmt: skip
    """``max(FLOPs / rate, L2 bytes / L2 bandwidth)`` over ``entries`` entries (the rate halved
    where Hopper runs a GEMM on mma.sync instead of wgmma). Latency, the exponentials and the
    grid's tail effects are not modelled."""
    half, tf32, fp32, l2 = PEAKS[arch]
    rate = {"half": half, "tf32": tf32, "ieee": fp32}[precision] / (2 if mma_sync_on_hopper else 1)
    return max(model["flops"] * entries / (rate * 1e12), model["l2"] * entries / (l2 * 1e12))


def backward_strategy(arch: str = "interpreter", precision: str = "half", k_pad: int = 512) -> str:
    """The backward's strategy: ``GCL_OPS_BACKWARD`` if set, else the one the traffic model
    favours for the architecture, precision and width: ``"split"`` (two atomic-free launches,
    each side's gradient owned by its programs; ties and the interpreter go here) or
    ``"atomic"`` (one launch, the queries' gradient added with fp32 atomics). Not timed on a GPU
    yet (the GPU kit times both)."""
    strategy = os.environ.get("GCL_OPS_BACKWARD")
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise ValueError(f"GCL_OPS_BACKWARD must be one of {STRATEGIES}, got {strategy!r}")
        return strategy
    if arch == "interpreter" or precision == "ieee":
        return "split"
    element = 2 if precision == "half" else 4

    def seconds(strategy: str) -> float:
        tiles = backward_tiles(arch, precision, k_pad, strategy)
        model = traffic(tiles, k_pad, element, backward=True, other_grad=strategy == "atomic",
                        slices=tiles["slices"])  # fmt: skip
        return estimate_seconds(arch, precision, model, 1.0) * (2 if strategy == "split" else 1)

    return min(STRATEGIES, key=seconds)


def autotuning() -> bool:
    """``GCL_OPS_AUTOTUNE=1``: launches time the candidates (``candidates``) on the first call
    of each problem size and keep the fastest. Off under the interpreter (it times nothing)."""
    return not INTERPRETING and os.environ.get("GCL_OPS_AUTOTUNE", "0") == "1"


def candidates(tiles: dict) -> list[dict]:
    """The autotuner's configurations: ``tiles`` (first) with 2, 3 and 4 pipeline stages."""
    stages = [tiles["num_stages"]] + [s for s in (2, 3, 4) if s != tiles["num_stages"]]
    return [dict(tiles, num_stages=s) for s in stages]
