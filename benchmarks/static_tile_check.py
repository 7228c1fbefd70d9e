"""Compile the fused-loss kernels for Hopper (sm_90a) without a GPU, as gcl_ops launches them, and
report per variant: registers, spills and shared memory (from ptxas), wgmma or mma.sync per GEMM
(from the Triton GPU IR and the PTX), and the GEMM FLOPs per N^2 of each kernel.

    python benchmarks/static_tile_check.py                     # the configurations gcl_ops launches
    python benchmarks/static_tile_check.py --out benchmarks/results/static_tiles_sm90.csv
    python benchmarks/static_tile_check.py --k 512 --dtype bf16 --normalize on --ids none
    python benchmarks/static_tile_check.py --sweep --k 512     # a grid of tile sizes

What is compiled is what launches (issue 9: declaring every integer a plain i32, as this script
once did, compiles other code: 255 registers and spills for the bf16 forward, where the launched
specialisation has none). The launchers of ``gcl_ops.ops`` are *called*, on ``meta``
tensors (shapes and strides, no memory) for a contiguous ``(N, k)`` problem (``--n``, default
32768, as many rows as columns, offset 0), with every kernel replaced by a recorder; the
arguments, the constexprs (tile sizes from ``_tile_sizes``, ``K_PAD`` from ``_k_pad``,
``INPUT_PRECISION`` from the fp32 matmul setting, ``NORMALIZE``, ``HAS_QID`` / ``HAS_DID``,
``SCALE_GRAD``, ``UPCAST``) and the launch options (``num_warps``; ``num_stages`` is triton's
default, 3) are the launchers' own, and ``_num_splits`` answers as on an H100 (132 SMs). Each
argument is then specialised as ``JITFunction.run`` does on a GPU (triton's
``native_specialize_impl``; the same rules in Python where a triton lacks it):

* an integer equal to 1 (the inner stride of a contiguous matrix) becomes the constant 1;
* an integer divisible by 16 (a row stride ``k`` for k = 64, ..., 1024; ``N``; offset 0) and a
  pointer aligned to 16 bytes get ``tt.divisibility = 16`` (vectorised loads, and the shared
  memory pipelines that wgmma reads from); other integers are plain i32 (i64 from 2^31);
* ``None`` is a constant; floats are fp32 scalars,

which become ``triton.compile(ASTSource(fn, signature, constexprs, attrs), GPUTarget("cuda", 90,
32), options)``. Registers and spills are read from that compile's own ptxas log
(``TRITON_DUMP_PTXAS_LOG``); on a triton cache hit ptxas runs again on the PTX with triton's flags
(``-lineinfo -v --regAllocOptLevel=2 --gpu-name=sm_90a``). The column ``specialised`` lists the
integer arguments that became 1 and those known to be multiples of 16.

Variants: k in ``--k`` (padded as the launchers pad: ``K_PAD``, ``BLOCK_K``), fp32 with IEEE and
with TF32 GEMMs (the launcher follows ``torch.backends.cuda.matmul``; IEEE fp32 GEMMs run on the
FMA units), bf16 and fp16 (which do not depend on the setting), ``NORMALIZE`` on and off,
without ids and with query and document ids. Per variant, the launches of one training step:
the forward (``_stats_fwd_kernel``), the exact recomputation of underflowed rows and columns
(``_online_lse_kernel``, launched for both, returns at once where no row needs it), the fused
backward (both gradients and d t); then the logits-form kernels (``_logits_stats_kernel``,
``_logits_grad_kernel``) per dtype and ids. The forward and the backward are compiled once per
configuration the autotuner may time (column ``config``; 0 is the default, which launches with
``GCL_OPS_AUTOTUNE=0``; ``--candidates default`` compiles only that one). Launches that compile
identically share a row; identical compiles are compiled once.

FLOPs per N^2 (per entry of the ``N x M`` similarity; 2 per multiply-add of each ``tl.dot``,
whose number is checked against the dots in the Triton IR), in units of k: the forward's
``S = Q D^T`` is 2k; the recomputation 2k per side, but only for flagged rows (0 otherwise); the
backward recomputes ``S`` once per ``K_SLICE`` of k (2k each) and runs ``dS^T Q`` and ``dS D``
(4k). Forward + backward: 8k with one slice (the goal), 10k with two. ``flops_exec`` is what the
tiles issue with k padded (``S`` over ``ceil(k / BLOCK_K)`` slices, the gradients over ``K_PAD``). The column ``mma`` names the
instruction of each dot in order: ``wgmma`` (Hopper warp-group MMA, which needs 64-row tiles per
warp group), ``mma.sync`` (Ampere-style) or ``fma``; ``ptx_wgmma`` / ``ptx_mma_sync`` count them
in the PTX, and ``wgmma_shapes`` lists the wgmma instruction shapes with their counts.

Exits with status 1 if a launched configuration fails to compile or needs more shared memory
than an H100 gives one block (227 KiB). Spills are reported, not failed: they cost speed only.
A GPU measurement (benchmarks/bench_loss.py) is the real test; this is what can be checked
without one. Needs triton's bundled ptxas (Linux x86-64 wheels) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import types
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints its own ptxas -v (captured below)

from gcl_ops import ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes per block on H100 / H200 (227 KiB)
H100_SMS = 132  # streaming multiprocessors of an H100 SXM: the forward's column splits
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: (dtype, the fp32 matmul setting the launcher reads): half GEMMs ignore the setting.
PRECISIONS = (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee"))
IDS = {"none": (False, False), "qid+did": (True, True), "qid": (True, False)}
KERNELS = ("_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel",
           "_logits_stats_kernel", "_logits_grad_kernel")  # fmt: skip
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
                torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
DIVISIBILITY_16 = [["tt.divisibility", 16]]

try:  # the specialisation JITFunction.run applies (triton >= 3.5 has it in C++)
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
except ImportError:  # pragma: no cover - older triton: the same rules below
    native_specialize_impl = None


# ------------------------------------------------------------------------------------------
# Recording the launches
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    role: str  # which launch of a training step
    arguments: dict  # parameter name -> value, as the launcher passed it
    options: dict  # launch options (num_warps, num_stages if given)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the call instead of launching."""

    def __init__(self, kernel, launches: list[Launch], roles):
        self.kernel, self.launches, self.roles = kernel, launches, roles

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.arg_names)
            arguments = dict(zip(names, args))
            options = {key: value for key, value in kwargs.items() if key not in names}
            arguments.update((key, value) for key, value in kwargs.items() if key in names)
            role = next(self.roles[self.kernel.fn.__name__])
            self.launches.append(Launch(self.kernel, role, arguments, options))

        return launch


_num_splits = ops._num_splits


def _h100_num_splits(n_rows, n_cols, block_m, block_n, device):
    """``ops._num_splits`` as it answers on an H100 (its CUDA branch, 132 SMs)."""
    properties = types.SimpleNamespace(multi_processor_count=H100_SMS)
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *_: properties):
        return _num_splits(n_rows, n_cols, block_m, block_n, torch.device("cuda"))


@contextlib.contextmanager
def recording(launches: list[Launch], precision: str, tile_sizes=None):
    roles = {
        "_stats_fwd_kernel": iter(["forward"] * 10),
        "_online_lse_kernel": iter(["recompute rows", "recompute cols"] * 5),
        "_stats_bwd_kernel": iter(["backward"] * 10),
        "_logits_stats_kernel": iter(["logits forward"] * 10),
        "_logits_grad_kernel": iter(["logits backward"] * 10),
    }
    with contextlib.ExitStack() as stack:
        for name in KERNELS:
            recorder = _Recorder(getattr(ops, name), launches, roles)
            stack.enter_context(mock.patch.object(ops, name, recorder))
        stack.enter_context(mock.patch.object(ops, "_num_splits", _h100_num_splits))
        stack.enter_context(
            mock.patch.object(ops, "_allow_tf32", lambda autocast=False: precision == "tf32")
        )
        # The autotuner's configurations are compiled one by one (``candidate``), as launched
        # with the autotuner off.
        stack.enter_context(mock.patch.object(ops, "_autotuning", lambda: False))
        if tile_sizes is not None:
            stack.enter_context(mock.patch.object(ops, "_tile_sizes", tile_sizes))
        yield


def candidate_tiles(index: int):
    """``ops._tile_sizes`` answering with the autotuner's ``index``-th configuration (the last
    where there are fewer)."""

    def tile_sizes(k_pad, element_size, backward, tf32=False):
        candidates = ops._tile_candidates(k_pad, element_size, backward, tf32)
        return candidates[min(index, len(candidates) - 1)]

    return tile_sizes


def candidate_count(k: int, dtype: str, precision: str, backward: bool) -> int:
    element_size = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    return len(ops._tile_candidates(ops._k_pad(k), element_size, backward, precision == "tf32"))


def embedding_launches(n: int, k: int, dtype: str, precision: str, normalize: bool, ids: str,
                       tile_sizes=None) -> list[Launch]:  # fmt: skip
    """The kernel launches of one forward and backward of the embedding form, as recorded."""
    meta = dict(device="meta")
    query = torch.empty(n, k, dtype=DTYPES[dtype], **meta)
    doc = torch.empty(n, k, dtype=DTYPES[dtype], **meta)
    scale = torch.empty((), dtype=torch.float32, **meta)
    has_qid, has_did = IDS[ids]
    query_ids = torch.empty(n, dtype=torch.int64, **meta) if has_qid else None
    doc_ids = torch.empty(n, dtype=torch.int64, **meta) if has_did else None
    launches: list[Launch] = []
    with recording(launches, precision, tile_sizes):
        neg_row, neg_col, pos, row_parts, col_parts = ops._triton_stats_forward(
            query, doc, scale, query_ids, doc_ids, 0, normalize
        )
        grads = [torch.empty_like(x) for x in (neg_row, neg_col, pos)]
        ops._triton_stats_backward(
            query, doc, scale, query_ids, doc_ids, neg_row, neg_col, *grads, 0, normalize,
            needs_grad=(True, True, True), row_parts=row_parts, col_parts=col_parts,
        )  # fmt: skip
    return launches


def logits_launches(n: int, dtype: str, ids: str) -> list[Launch]:
    meta = dict(device="meta")
    logits = torch.empty(n, n, dtype=DTYPES[dtype], **meta)
    has_qid, has_did = IDS[ids]
    query_ids = torch.empty(n, dtype=torch.int64, **meta) if has_qid else None
    doc_ids = torch.empty(n, dtype=torch.int64, **meta) if has_did else None
    launches: list[Launch] = []
    with recording(launches, "ieee"):
        neg_row, neg_col, pos = ops._triton_logits_forward(logits, query_ids, doc_ids)
        grads = [torch.empty_like(x) for x in (neg_row, neg_col, pos)]
        ops._triton_logits_backward(
            logits, query_ids, doc_ids, neg_row, neg_col, *grads
        )  # fmt: skip
    return launches


# ------------------------------------------------------------------------------------------
# Specialisation, as JITFunction.run does it
# ------------------------------------------------------------------------------------------


def _specialise_scalar(value, specialize: bool, align: bool) -> tuple[str, object]:
    """``(type, attribute)`` of a non-tensor argument: ``("constexpr", value)`` for 1 and None,
    ``(type, "D")`` for an integer divisible by 16."""
    if native_specialize_impl is not None:
        with contextlib.suppress(TypeError):  # another signature: the rules below
            return tuple(native_specialize_impl(CUDABackend, value, False, specialize, align))[:2]
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if specialize and align and value % 16 == 0 else ""
    raise TypeError(f"cannot specialise {type(value).__name__}")


def specialise(launch: Launch) -> tuple[dict, dict, dict, str]:
    """``(signature, constexprs, attrs, summary)`` for ``ASTSource``."""
    signature, constexprs, attrs = {}, {}, {}
    constant_ones, divisible = [], []
    for index, param in enumerate(launch.kernel.params):
        name, value = param.name, launch.arguments[param.name]
        if param.is_constexpr:
            signature[name], constexprs[(index,)] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            # Allocations are (at least) 256-byte aligned; a view moves by its storage offset.
            aligned = (value.storage_offset() * value.element_size()) % 16 == 0
            kind = "*" + TRITON_TYPES[value.dtype]
            attribute = "D" if aligned and not param.do_not_specialize_on_alignment else ""
        else:
            kind, attribute = _specialise_scalar(
                value, not param.do_not_specialize, not param.do_not_specialize_on_alignment
            )
        if kind == "constexpr":
            signature[name], constexprs[(index,)] = "constexpr", value
            if value == 1:
                constant_ones.append(name)
            continue
        signature[name] = kind
        if attribute == "D":
            attrs[(index,)] = DIVISIBILITY_16
            if not kind.startswith("*"):
                divisible.append(name)
    summary = f"=1: {' '.join(constant_ones) or '-'}; %16: {' '.join(divisible) or '-'}"
    return signature, constexprs, attrs, summary


# ------------------------------------------------------------------------------------------
# Compiling and reading the result
# ------------------------------------------------------------------------------------------

_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_log(compiled) -> str:
    """ptxas -v again, with the flags triton's own compile uses (for a cache hit)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        command = [_PTXAS, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                   ptx.name, "-o", os.devnull]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def _mma_kinds(ttgir: str) -> list[str]:
    """The instruction of each dot in the Triton GPU IR, in order: wgmma (Hopper warp-group
    MMA, ``ttng.warp_group_dot``) or mma.sync (``tt.dot`` on an ``#mma`` v2 layout)."""
    kinds = []
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            kinds.append("wgmma")
        elif re.search(r"= tt\.dot ", line):
            kinds.append("mma.sync" if "mma" in line else "fma")
    return kinds


def _wgmma_shapes(ptx: str) -> str:
    """The wgmma instruction shapes in the PTX with their counts, ``m64n32k16 x8 m64n128k16 x4``:
    the smaller ``n``, the more shared-memory reads per FLOP (``m64n8`` reads its 64 x 16 A
    operand for a quarter of the work of ``m64n32``)."""
    counts: dict = {}
    for shape in re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx):
        counts[shape] = counts.get(shape, 0) + 1
    return " ".join(f"{shape} x{count}" for shape, count in counts.items()) or "-"


def compile_report(launch: Launch) -> dict:
    signature, constexprs, attrs, summary = specialise(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the ptxas log (TRITON_DUMP_PTXAS_LOG, set above)
        compiled = triton.compile(source, target=TARGET, options=dict(launch.options))
    log = log.getvalue()
    if "Used" not in log:
        log = _ptxas_log(compiled)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    mma = _mma_kinds(ttgir)
    return {
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_stores": sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
        "spill_loads": sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log)),
        "shared_bytes": compiled.metadata.shared,
        "mma": "+".join(mma) or "-",
        "ptx_wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "ptx_mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "wgmma_shapes": _wgmma_shapes(ptx),
        "specialised": summary,
    }


def flops(launch: Launch, gemms: int) -> tuple[str, str, int]:
    """``(tensor-core FLOPs per N^2 in units of k, note, FLOPs per N^2 as the tiles issue them)``."""
    name, args = launch.kernel.fn.__name__, launch.arguments
    expected = {"_stats_fwd_kernel": 1, "_online_lse_kernel": 1, "_stats_bwd_kernel": 3}
    if gemms != expected.get(name, 0):
        raise AssertionError(f"{name}: {gemms} dots in the IR, the FLOP count assumes "
                             f"{expected.get(name, 0)}")  # fmt: skip
    if not gemms:
        return "0", "elementwise", 0
    k = args["k"]
    similarity = 2 * triton.cdiv(k, args["BLOCK_K"]) * args["BLOCK_K"]  # S over BLOCK_K slices
    if name == "_stats_fwd_kernel":
        return "2k", "S = Q D^T", similarity
    if name == "_online_lse_kernel":
        return "0", "2k for the flagged rows only (none usually)", 0
    k_pad = ops._k_pad(k)
    slices = triton.cdiv(k, args["K_SLICE"])
    if args["RESIDENT"]:  # S^T as one GEMM over the resident tiles' K_PAD columns
        return "6k", "S again (one GEMM, operands on chip) + dS^T Q + dS D", 6 * k_pad
    note = f"S again ({slices} k slice{'s' * (slices > 1)}) + dS^T Q + dS D"
    return f"{2 * slices + 4}k", note, slices * similarity + 4 * k_pad


def l2_bytes(launch: Launch) -> float | None:
    """Bytes per N^2 that the tiles move through L2 (operand loads into shared memory and the
    fp32 atomic adds of dQ^), as issued, per entry of the similarity; ``None`` for the kernels
    without GEMMs. A ``BLOCK_M x BLOCK_N`` tile loading ``BLOCK_M + BLOCK_N`` rows of ``w``
    columns of ``e`` bytes moves ``w e (1 / BLOCK_N + 1 / BLOCK_M)`` per entry. Loads once per
    program (the backward's dD^ and its resident D_c) and the per-row statistics are below
    ``k e / N`` per entry and left out; an upper bound where loads hit in L1. ``flop_per_l2_byte``
    (``flops_exec`` over it) is to be compared with the GPU's tensor-core rate over its L2
    bandwidth: 989 dense bf16 TFLOP/s on an H100 SXM over the ~7-12 TB/s that public
    measurements give its L2, some 80-140 FLOPs per byte; below that, L2 bounds the kernel."""
    name, args = launch.kernel.fn.__name__, launch.arguments
    if name not in ("_stats_fwd_kernel", "_stats_bwd_kernel"):
        return None
    element = args["query_ptr" if name == "_stats_bwd_kernel" else "rows_ptr"].element_size()
    k, block_m, block_n = args["k"], args["BLOCK_M"], args["BLOCK_N"]
    both_sides = 1 / block_m + 1 / block_n
    similarity = triton.cdiv(k, args["BLOCK_K"]) * args["BLOCK_K"]  # S's columns, as loaded
    if name == "_stats_fwd_kernel":
        return similarity * element * both_sides
    width = triton.cdiv(k, args["K_SLICE"]) * args["K_SLICE"]  # the slices' columns, in all
    atomics = 4 * width / block_n  # dQ^ in fp32, one add per entry of each (row block, slice)
    if args["RESIDENT"]:  # each query tile once per tile, for S^T and dD^
        return width * element / block_n + atomics
    slices = triton.cdiv(k, args["K_SLICE"])
    # S^T over all of k per slice, then the slice's Q_r and D_c again for the two gradients.
    return (slices * similarity + width) * element * both_sides + atomics


# ------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------


def launched_variants(args) -> list[tuple[dict, Launch]]:
    """``(description, launch)`` for every variant asked for, as the launchers launch them."""
    variants = []
    for k, (dtype, precision), normalize, ids in itertools.product(
        args.k, PRECISIONS, args.normalize, args.ids
    ):
        if dtype not in args.dtype:
            continue
        described = dict(dtype=dtype, precision=precision if dtype == "fp32" else "-",
                         normalize=normalize, ids=ids, k=k)  # fmt: skip
        counts = {backward: candidate_count(k, dtype, precision, backward)
                  for backward in (False, True)}  # fmt: skip
        for index in range(max(counts.values()) if args.candidates == "all" else 1):
            tiles = candidate_tiles(index)
            for launch in embedding_launches(args.n, k, dtype, precision, normalize, ids, tiles):
                backward = launch.role == "backward"
                if index == 0 or (launch.role in ("forward", "backward")
                                  and index < counts[backward]):  # fmt: skip
                    variants.append((dict(described, config=index), launch))
    for dtype, ids in itertools.product(args.dtype, args.ids):
        for launch in logits_launches(args.n, dtype, ids):
            variants.append((dict(dtype=dtype, precision="-", normalize="-", ids=ids, k="-",
                                  config=0), launch))  # fmt: skip
    return variants


def sweep_variants(args) -> list[tuple[dict, Launch]]:
    """A grid of tile sizes for the forward and the backward, launched with NORMALIZE and query
    ids like the launchers (their ``_tile_sizes`` replaced)."""
    variants = []
    for k, dtype, block_m, block_n in itertools.product(
        args.k, [d for d in ("bf16", "fp32") if d in args.dtype], (32, 64, 128), (32, 64, 128)
    ):
        block_k = min(ops._k_pad(k), 64 if dtype == "bf16" else 32)

        def tiles(k_pad, element_size, backward, tf32=False, block_m=block_m,
                  block_n=block_n, block_k=block_k):  # fmt: skip
            warps = 8 if backward or block_m * block_n >= 8192 else 4
            tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
            return (dict(tiles, K_SLICE=min(k_pad, 256), num_stages=2, RESIDENT=False)
                    if backward else tiles)  # fmt: skip

        described = dict(dtype=dtype, precision="tf32" if dtype == "fp32" else "-",
                         normalize=True, ids="qid", k=k, config="sweep")  # fmt: skip
        launches = embedding_launches(args.n, k, dtype, "tf32", True, "qid", tiles)
        for launch in launches:
            if launch.role in ("forward", "backward"):
                variants.append((described, launch))
    return variants


def _merge_roles(roles: list[str]) -> str:
    """``["recompute rows", "recompute cols"]`` -> ``"recompute rows+cols"``."""
    first, *_ = roles[0].split(" ", 1)
    if len(roles) > 1 and all(" " in role and role.split(" ", 1)[0] == first for role in roles):
        return first + " " + "+".join(role.split(" ", 1)[1] for role in roles)
    return "+".join(roles)


def _cache_key(launch: Launch) -> str:
    signature, constexprs, attrs, _ = specialise(launch)
    return repr((launch.kernel.fn.__name__, signature, sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(launch.options.items())))  # fmt: skip


COLUMNS = ["kernel", "role", "config", "dtype", "precision", "normalize", "ids", "k", "K_PAD",
           "BLOCK_M", "BLOCK_N", "BLOCK_K", "K_SLICE", "RESIDENT", "num_warps", "num_stages", "registers",
           "spill_stores", "spill_loads", "spill_bytes", "shared_bytes", "mma", "ptx_wgmma", "ptx_mma_sync",
           "wgmma_shapes", "flops_per_n2", "flops_exec", "flops_note", "l2_bytes_per_n2", "flop_per_l2_byte",
           "specialised", "target", "triton", "date", "error"]  # fmt: skip
TABLE = [("kernel", 20), ("role", 21), ("config", 2), ("dtype", 5), ("precision", 4), ("normalize", 5),
         ("ids", 7), ("k", 5), ("K_PAD", 5), ("BLOCK_M", 4), ("BLOCK_N", 4), ("BLOCK_K", 4), ("K_SLICE", 4),
         ("num_warps", 2), ("num_stages", 2), ("registers", 4), ("spill_bytes", 6),
         ("shared_bytes", 7), ("mma", 17), ("flops_per_n2", 3), ("flops_exec", 5),
         ("flop_per_l2_byte", 5)]  # fmt: skip


def _print_step_flops(totals: dict, fewest: dict) -> None:
    step = sorted({sum(units for units, _ in kernels.values()) for kernels in totals.values()})
    print("GEMM FLOPs per N^2 (2 per multiply-add), forward + backward, default tiles: forward "
          "2k, recompute 0 (2k per side, flagged rows only), backward 2k per k slice (S again) + "
          f"4k: {' / '.join(f'{units}k' for units in step)} (goal: 8k)")  # fmt: skip
    issued: dict = {}
    for (dtype, precision, k), kernels in totals.items():
        executed = sum(flops for _, flops in kernels.values())
        best = executed - kernels["backward"][1] + fewest[(dtype, precision, k)]
        issued.setdefault((dtype, precision), []).append(
            f"k={k}: {executed / k:.2f}k" + (f" ({best / k:.2f}k)" if best < executed else "")
        )
    print("  issued with k padded (in brackets: with the autotuner's fewest-FLOP backward):")
    for (dtype, precision), values in issued.items():
        print(f"    {dtype} {precision}: {', '.join(values)}")


def print_table(rows: list[dict], step_totals: bool = True) -> None:
    header = {"precision": "prec", "normalize": "norm", "BLOCK_M": "BM", "BLOCK_N": "BN",
              "BLOCK_K": "BK", "num_warps": "W", "num_stages": "S", "registers": "regs",
              "spill_bytes": "spill", "shared_bytes": "smem", "flops_per_n2": "F/N2",
              "flops_exec": "exec", "flop_per_l2_byte": "F/B"}  # fmt: skip
    print("  ".join(f"{header.get(key, key):<{width}}" for key, width in TABLE))
    for row in rows:
        print("  ".join(f"{str(row.get(key, '') if row.get(key) is not None else ''):<{width}}"
                        for key, width in TABLE))  # fmt: skip
    # GEMM FLOPs per N^2 of a training step: the forward, the recomputations (0 unless a row
    # is flagged), the two backward launches. They do not depend on NORMALIZE or the ids.
    totals: dict = {}
    fewest: dict = {}  # the fewest FLOPs among the backward's configurations
    for row in rows:
        if row["kernel"].startswith("_logits") or row["error"] or row["flops_exec"] is None:
            continue
        problem = (row["dtype"], row["precision"], row["k"])
        if row["role"] == "backward":
            fewest[problem] = min(fewest.get(problem, row["flops_exec"]), row["flops_exec"])
        if row["config"] != 0:
            continue
        per_kernel = totals.setdefault(problem, {})
        launches = len(row["role"].split("+"))
        units = 0 if row["flops_per_n2"] == "0" else int(row["flops_per_n2"].rstrip("k"))
        per_kernel[row["role"]] = (launches * units, launches * row["flops_exec"])
    print()
    if step_totals:
        _print_step_flops(totals, fewest)
    spills = [row for row in rows if row.get("spill_bytes")]
    print(f"variants with spills: {len(spills)} of {len(rows)}")
    for r in spills:
        print(
            f"  {r['kernel']} ({r['role']}) {r['dtype']} {r['precision']} k={r['k']} "
            f"normalize={r['normalize']} ids={r['ids']}: {r['registers']} registers, "
            f"{r['spill_stores']} + {r['spill_loads']} bytes spilled (stores + loads)"
        )
    by_mma: dict = {}
    for row in rows:
        if row["mma"] not in (None, "-"):
            by_mma.setdefault(row["mma"], set()).add(
                f"{row['kernel']} {row['dtype']}"
                f"{'/' + row['precision'] if row['dtype'] == 'fp32' else ''}"
            )
    print("GEMM instructions (per tl.dot, in order):")
    for kind, where in sorted(by_mma.items()):
        print(f"  {kind}: {', '.join(sorted(where))}")
    not_wgmma = sorted(
        {
            f"{row['kernel']} {row['dtype']}"
            for row in rows
            if row["dtype"] in ("bf16", "fp16") and "mma.sync" in (row["mma"] or "")
        }
    )
    print(f"half-precision GEMMs not on wgmma: {', '.join(not_wgmma) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--n", type=int, default=32768, help="rows = columns of the problem")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--normalize", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--ids", nargs="+", choices=list(IDS), default=["none", "qid+did"])
    parser.add_argument(
        "--sweep", action="store_true", help="a grid of tile sizes, not the launched ones"
    )
    parser.add_argument(
        "--candidates", choices=["all", "default"], default="all",
        help="every configuration the autotuner may time (default), or only the default tiles",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="write the table as CSV here")
    args = parser.parse_args()
    args.normalize = [value == "on" for value in args.normalize]
    variants = sweep_variants(args) if args.sweep else launched_variants(args)
    stamp = {"target": "sm_90a (compiled, not run)", "triton": triton.__version__,
             "date": datetime.date.today().isoformat()}  # fmt: skip
    # Launches of one variant that compile the same (the recomputation for the rows and for the
    # columns) share a row; identical compiles across variants are compiled once.
    groups: dict = {}
    for described, launch in variants:
        key = _cache_key(launch)
        groups.setdefault((repr(described), key), (described, launch, key, []))[3].append(
            launch.role
        )
    rows, failed, reports = [], False, {}
    for described, launch, key, roles in groups.values():
        arguments = launch.arguments
        row = {
            "kernel": launch.kernel.fn.__name__,
            "role": _merge_roles(roles),
            **described,
            **{name: arguments.get(name) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "K_SLICE")},
            "K_PAD": ops._k_pad(arguments["k"]) if "k" in arguments else None,
            "RESIDENT": int(arguments["RESIDENT"]) if "RESIDENT" in arguments else None,
        }
        try:
            if key not in reports:
                reports[key] = compile_report(launch)
            report = dict(reports[key])
            gemms = 0 if report["mma"] == "-" else report["mma"].count("+") + 1
            per_n2, note, executed = flops(launch, gemms)
            moved = l2_bytes(launch)
            row.update(report, spill_bytes=report["spill_stores"] + report["spill_loads"],
                       flops_per_n2=per_n2, flops_exec=executed, flops_note=note,
                       l2_bytes_per_n2=None if moved is None else round(moved, 1),
                       flop_per_l2_byte=None if moved is None else round(executed / moved, 1))  # fmt: skip
            too_big = row["shared_bytes"] > SHARED_MEMORY_LIMIT
            row["error"] = "shared memory over 227 KiB" if too_big else ""
        except Exception as error:  # noqa: BLE001 - reported per configuration
            reports[key] = None
            row.update(registers=None, spill_bytes=None, shared_bytes=None,
                       error=repr(error)[:200].replace("\n", " "))  # fmt: skip
        failed |= bool(row["error"]) and not args.sweep
        row = {**{column: row.get(column) for column in COLUMNS if column != "error"}, **stamp,
               "error": row["error"]}  # fmt: skip
        rows.append(row)
        # One line per variant, the error last (tests/test_compile.py reads these lines).
        shown = ("kernel", "role", "config", "dtype", "precision", "normalize", "ids", "k",
                 "K_PAD", "BLOCK_M", "BLOCK_N", "BLOCK_K", "K_SLICE", "num_warps", "num_stages", "registers",
                 "spill_bytes", "shared_bytes", "mma", "flops_per_n2", "error")  # fmt: skip
        print(", ".join(f"{key}={row[key] if row[key] is not None else ''}" for key in shown),
              flush=True)  # fmt: skip
    print()
    print_table(rows, step_totals=not args.sweep)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
