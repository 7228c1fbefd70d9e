"""Compile the fused-loss kernels for GPUs we cannot run, as gcl_ops launches them, and report per
variant what ptxas and the IR say (registers, spills, shared memory, occupancy, wgmma or not) and
a traffic model: GEMM FLOPs, L2 bytes and atomics per similarity entry, and the time they imply
at N = 32,768 from the GPU's published peaks.

    python benchmarks/static_tile_check.py                        # sm_90 and sm_80, every width
    python benchmarks/static_tile_check.py --arch sm90 --k 512 --dtype bf16 --n 32768
    python benchmarks/static_tile_check.py --write                # the committed tables

What is compiled is what launches: the launchers of ``gcl_ops.launchers`` are *called* on
``meta`` tensors (``(N, k)`` queries and documents, offset 0) with every kernel replaced by a
recorder, ``tiling.architecture`` answering for the target and the grid sized for its SMs. Each
argument is then specialised as ``JITFunction.run`` does on a GPU (an integer equal to 1 becomes
a constant; integers divisible by 16 and 16-byte aligned pointers get ``tt.divisibility = 16``)
and compiled with ``triton.compile(ASTSource(...), GPUTarget("cuda", cc, 32))``; registers and
spills come from ptxas (``TRITON_DUMP_PTXAS_LOG``). Widths that are not multiples of 16 are
compiled as launched: padded to one (``tiling.padded_width``). ``--n`` (default 32768 and
1001, which nothing divides, compiled for the heaviest variant only: normalised, with ids)
changes only the sizes' divisibility and the grid.

Variants: per architecture, width, precision (fp32 on IEEE FMAs and on TF32, bf16, fp16),
``NORMALIZE`` on and off, no ids and query + document ids: the forward, the exact recomputation
(launched for rows and columns; it returns at once where nothing is flagged), the backward of
each strategy (``split``: the documents' launch, which also sums d t, and the queries' launch;
``atomic``: one launch), then the logits kernels. ``--candidates`` adds the autotuner's
configurations (``GCL_OPS_AUTOTUNE=1``) of the forward and the backward.

The model (``tiling.traffic``, which also picks the default backward strategy), per entry of the
``N x M`` similarity (``per_n2`` columns), as the tiles issue it: GEMM FLOPs, L2 bytes (operand
tiles per tile, the gradient GEMM's reloads, fp32 atomic adds at 8 bytes) and atomics.
``est_ms`` at N = 32,768: ``max(FLOPs / rate, L2 bytes / L2 bandwidth)`` from ``tiling.PEAKS``:
the published dense rates (H100 SXM: 989 TFLOP/s bf16/fp16, 494 TF32, 67 fp32 FMA; A100 SXM:
312, 156, 19.5; L40S: 362, 183, 91.6; B200: 2,250, 1,100, 80), half of them where a GEMM falls
back from wgmma to mma.sync on Hopper, and an assumed L2 bandwidth of about twice HBM (7, 4, 2
and 16 TB/s). The model ignores latency, the exponentials and the tail effects of the grid.

Exits with status 1 if a launched default fails to compile, needs more shared memory than a
block may have, or spills. Needs triton's bundled ptxas (Linux x86-64) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import io
import itertools
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints its own ptxas -v (captured below)
# A cache of its own: a kernel found in a cache is not compiled, and ptxas prints nothing.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="static_tile_check_"))

from gcl_ops import launchers, tiling  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    capability: int
    sms: int
    shared_per_block: int  # bytes a block may have
    shared_per_sm: int
    wgmma: bool


#: The GPUs compiled for (their peaks: ``tiling.PEAKS``).
GPUS = {
    "sm90": Gpu("H100 SXM", 90, 132, 232448, 233472, True),
    "sm80": Gpu("A100 SXM", 80, 108, 166912, 167936, False),
    "sm89": Gpu("L40S", 89, 142, 101376, 102400, False),
    "sm100": Gpu("B200", 100, 148, 232448, 233472, False),
}
HEADLINE_N = 32768
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: (dtype, the fp32 matmul setting the launcher reads): half GEMMs ignore the setting.
PRECISIONS = (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "-"), ("fp16", "-"))
IDS = {"none": (False, False), "qid+did": (True, True)}
WIDTHS = (16, 64, 72, 128, 300, 512, 520, 768, 1000, 1024)
KERNELS = ("_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel",
           "_logits_stats_kernel", "_logits_grad_kernel")  # fmt: skip
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                torch.int8: "i8", torch.bool: "i1"}  # fmt: skip


# ------------------------------------------------------------------------------------------
# Recording the launches
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    role: str
    arguments: dict  # parameter name -> value, as the launcher passed it
    options: dict  # launch options (num_warps, num_stages)
    grid: tuple


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the call instead of launching."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.arg_names)
            arguments = {
                **dict(zip(names, args)),
                **{k: v for k, v in kwargs.items() if k in names},
            }
            options = {key: value for key, value in kwargs.items() if key not in names}
            shape = grid(arguments) if callable(grid) else grid
            self.launches.append(Launch(self.kernel, _role(self.kernel, arguments, self.launches),
                                        arguments, options, tuple(shape)))  # fmt: skip

        return launch


def _role(kernel, arguments: dict, earlier: list[Launch]) -> str:
    """Which launch of a training step: the split backward launches the documents' side first."""
    name = kernel.fn.__name__
    if name == "_stats_bwd_kernel":
        if arguments["OTHER_GRAD"]:
            return "backward atomic"
        first = not any(launch.role.startswith("backward") for launch in earlier)
        return "backward docs" if first else "backward queries"
    return {"_stats_fwd_kernel": "forward", "_online_lse_kernel": "recompute",
            "_logits_stats_kernel": "logits forward", "_logits_grad_kernel": "logits backward"}[name]  # fmt: skip


@contextlib.contextmanager
def recording(launches: list[Launch], arch: str, precision: str, tiles=None):
    with contextlib.ExitStack() as stack:
        for name in KERNELS:
            stack.enter_context(mock.patch.object(
                launchers, name, _Recorder(getattr(launchers, name), launches)))  # fmt: skip
        stack.enter_context(mock.patch.object(tiling, "architecture", lambda device: arch))
        stack.enter_context(mock.patch.object(launchers, "_sm_count", lambda d: GPUS[arch].sms))
        stack.enter_context(mock.patch.object(tiling, "INTERPRETING", False))
        stack.enter_context(mock.patch.object(tiling, "autotuning", lambda: False))
        stack.enter_context(mock.patch.object(
            launchers, "allow_tf32", lambda autocast=False: precision == "tf32"))  # fmt: skip
        for name, replacement in (tiles or {}).items():
            stack.enter_context(mock.patch.object(tiling, name, replacement))
        yield


def embedding_launches(arch, n, k, dtype, precision, normalize, ids, strategy, tiles=None):
    """The launches of one forward and one backward (``strategy``) of the embedding form."""
    meta = dict(device="meta")
    query, doc = (torch.empty(n, k, dtype=DTYPES[dtype], **meta) for _ in range(2))
    scale = torch.empty((), dtype=torch.float32, **meta)
    has_qid, has_did = IDS[ids]
    query_ids = torch.empty(n, dtype=torch.int64, **meta) if has_qid else None
    doc_ids = torch.empty(n, dtype=torch.int64, **meta) if has_did else None
    launches: list[Launch] = []
    with recording(launches, arch, precision, tiles):
        stats = launchers.stats_forward(query, doc, scale, query_ids, doc_ids, 0, normalize)
        grads = [torch.empty_like(x) for x in stats[:3]]
        launchers.stats_backward(
            query, doc, scale, query_ids, doc_ids, stats.neg_row, stats.neg_col, *grads, 0,
            normalize, row_parts=stats.row_parts, col_parts=stats.col_parts, strategy=strategy,
        )  # fmt: skip
    return launches


def logits_launches(arch: str, n: int, dtype: str, ids: str) -> list[Launch]:
    meta = dict(device="meta")
    logits = torch.empty(n, n, dtype=DTYPES[dtype], **meta)
    has_qid, has_did = IDS[ids]
    query_ids = torch.empty(n, dtype=torch.int64, **meta) if has_qid else None
    doc_ids = torch.empty(n, dtype=torch.int64, **meta) if has_did else None
    launches: list[Launch] = []
    with recording(launches, arch, "ieee"):
        neg_row, neg_col, pos = launchers.logits_forward(logits, query_ids, doc_ids)
        grads = [torch.empty_like(x) for x in (neg_row, neg_col, pos)]
        launchers.logits_backward(logits, query_ids, doc_ids, neg_row, neg_col, *grads)
    return launches


# ------------------------------------------------------------------------------------------
# Specialisation, as JITFunction.run does it, and the compile
# ------------------------------------------------------------------------------------------


def _specialise_scalar(value) -> tuple[str, str]:
    if value is None:
        return "constexpr", ""
    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, float):
        return "fp32", ""
    if value == 1:
        return "constexpr", ""
    kind = "i32" if -(2**31) <= value < 2**31 else "i64"
    return kind, "D" if value % 16 == 0 else ""


def specialise(launch: Launch) -> tuple[dict, dict, dict, str]:
    """``(signature, constexprs, attrs, summary)`` for ``ASTSource``."""
    signature, constexprs, attrs, ones, divisible = {}, {}, {}, [], []
    for index, param in enumerate(launch.kernel.params):
        name, value = param.name, launch.arguments[param.name]
        if param.is_constexpr:
            signature[name], constexprs[(index,)] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):  # allocations are 256-byte aligned; views move
            kind = "*" + TRITON_TYPES[value.dtype]
            attribute = "D" if (value.storage_offset() * value.element_size()) % 16 == 0 else ""
        else:
            kind, attribute = _specialise_scalar(value)
        if kind == "constexpr":
            signature[name], constexprs[(index,)] = "constexpr", value if value is None else 1
            ones += [name] if value == 1 else []
            continue
        signature[name] = kind
        if attribute == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
            divisible += [] if kind.startswith("*") else [name]
    return (
        signature,
        constexprs,
        attrs,
        f"=1: {' '.join(ones) or '-'}; %16: {' '.join(divisible) or '-'}",
    )


def _mma_kinds(ttgir: str) -> list[str]:
    """The instruction of each dot in the Triton GPU IR, in order."""
    kinds = []
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            kinds.append("wgmma")
        elif "ttng.tc_gen5_mma " in line:
            kinds.append("tcgen05")
        elif re.search(r"= tt\.dot ", line):
            kinds.append("mma.sync" if "#mma" in line else "fma")
    return kinds


def compile_report(launch: Launch, gpu: Gpu) -> dict:
    signature, constexprs, attrs, summary = specialise(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    options = {key: value for key, value in launch.options.items()}
    with contextlib.redirect_stdout(log):  # the ptxas log (TRITON_DUMP_PTXAS_LOG, set above)
        compiled = triton.compile(source, target=GPUTarget("cuda", gpu.capability, 32),
                                  options=options)  # fmt: skip
    log = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    shared = compiled.metadata.shared
    warps = compiled.metadata.num_warps
    by_registers = 65536 // (math.ceil(registers / 8) * 8 * 32 * warps)
    by_shared = gpu.shared_per_sm // max(shared + 1024, 1)  # (1 KiB reserved per block)
    return {
        "num_warps": warps,
        "num_stages": compiled.metadata.num_stages,
        "registers": registers,
        "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
        "shared_bytes": shared,
        "blocks_per_sm": min(by_registers, by_shared, 64 // warps),
        "mma": "+".join(_mma_kinds(compiled.asm["ttgir"])) or "-",
        "specialised": summary,
    }


# ------------------------------------------------------------------------------------------
# The traffic model
# ------------------------------------------------------------------------------------------


def traffic(launch: Launch) -> dict | None:
    """``tiling.traffic`` of one launch (None for the kernels without GEMMs)."""
    a, name = launch.arguments, launch.kernel.fn.__name__
    if name not in ("_stats_fwd_kernel", "_stats_bwd_kernel"):
        return None
    backward = name == "_stats_bwd_kernel"
    tiles = {key: a.get(key) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_OWN", "BLOCK_OTHER",
                                         "BLOCK_K", "K_MAIN", "K_TAIL", "RESIDENT")}  # fmt: skip
    element = a["own_ptr" if backward else "rows_ptr"].element_size()
    if not backward:
        return tiling.traffic(tiles, a["k"], element, backward=False)
    splits, other = launch.grid[1], a["BLOCK_OTHER"]
    share = splits / (other * triton.cdiv(a["n_other"], other)) if splits > 1 else 0.0
    return tiling.traffic(tiles, a["k"], element, backward=True, other_grad=a["OTHER_GRAD"],
                          slices=launch.grid[2], split_share=share)  # fmt: skip


# ------------------------------------------------------------------------------------------
# Variants and the table
# ------------------------------------------------------------------------------------------


def variants(args) -> list[tuple[dict, Launch]]:
    found = []
    for arch, n, k, (dtype, precision), normalize, ids in itertools.product(
        args.arch, args.n, args.k, PRECISIONS, args.normalize, args.ids
    ):
        if dtype not in args.dtype or (precision not in args.precision and dtype == "fp32"):
            continue
        if n % 16 and (not normalize or ids != "qid+did") and len(args.n) > 1:
            continue  # (sizes nothing divides: the heaviest variant only)
        described = dict(arch=arch, n=n, k=k, dtype=dtype, precision=precision,
                         normalize=normalize, ids=ids)  # fmt: skip
        configs = [("default", None)]
        if args.candidates:
            configs += [(f"candidate {index}", _candidate_tiles(index)) for index in (1, 2)]
        for config, tiles in configs:
            for strategy in tiling.STRATEGIES:
                if precision == "ieee" and strategy == "atomic":  # (split only)
                    continue
                recomputes = 0
                for launch in embedding_launches(arch, n, k, dtype, precision, normalize, ids,
                                                 strategy, tiles):  # fmt: skip
                    backward = launch.role.startswith("backward")
                    recomputes += launch.role == "recompute"
                    if not backward and strategy != tiling.STRATEGIES[0]:  # forward: once
                        continue
                    # (the recomputation of the columns compiles as that of the rows)
                    if launch.role == "recompute" and (config != "default" or recomputes > 1):
                        continue
                    found.append(
                        (
                            dict(described, config=config, strategy=strategy if backward else "-"),
                            launch,
                        )
                    )
    for arch, n, dtype, ids in itertools.product(args.arch, args.n, args.dtype, args.ids):
        for launch in logits_launches(arch, n, dtype, ids):
            found.append((dict(arch=arch, n=n, k="-", dtype=dtype, precision="-", normalize="-",
                               ids=ids, config="default", strategy="-"), launch))  # fmt: skip
    return found


def _candidate_tiles(index: int) -> dict:
    """Replacements of ``tiling.forward_tiles`` / ``backward_tiles`` answering with the autotuner's
    ``index``-th configuration."""

    def replaced(function):
        return lambda *args, **kwargs: _candidate(function(*args, **kwargs), index)

    return {name: replaced(getattr(tiling, name)) for name in ("forward_tiles", "backward_tiles")}


def _candidate(tiles: dict, index: int) -> dict:
    """The autotuner's ``index``-th configuration of ``tiles`` (``tiling.candidates``)."""
    slices = tiles.pop("slices", None)
    candidate = tiling.candidates(tiles)[index]
    return candidate if slices is None else dict(candidate, slices=slices)


COLUMNS = ["arch", "kernel", "role", "strategy", "config", "n", "k", "dtype", "precision",
           "normalize", "ids", "BLOCK_M", "BLOCK_N", "BLOCK_K", "K_MAIN", "K_TAIL", "slices",
           "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "blocks_per_sm",
           "mma", "flops_per_n2", "l2_bytes_per_n2", "atomics_per_n2", "est_ms_n32768",
           "specialised", "triton", "date", "error"]  # fmt: skip


def table_row(described: dict, launch: Launch, reports: dict) -> dict:
    a = launch.arguments
    row = dict(described, kernel=launch.kernel.fn.__name__, role=launch.role,
               BLOCK_M=a.get("BLOCK_M", a.get("BLOCK_OWN")),
               BLOCK_N=a.get("BLOCK_N", a.get("BLOCK_OTHER")), BLOCK_K=a.get("BLOCK_K"),
               K_MAIN=a.get("K_MAIN"), K_TAIL=a.get("K_TAIL"),
               slices=launch.grid[2] if len(launch.grid) > 2 else None,
               triton=triton.__version__, date=datetime.date.today().isoformat(), error="")  # fmt: skip
    gpu = GPUS[described["arch"]]
    key = repr((row["arch"], specialise(launch)[:3], sorted(launch.options.items()),
                launch.kernel.fn.__name__))  # fmt: skip
    try:
        if key not in reports:
            reports[key] = compile_report(launch, gpu)
        row.update(reports[key])
        if row["shared_bytes"] > gpu.shared_per_block:
            row["error"] = "shared memory over the block limit"
        model = traffic(launch)
        if model is not None:
            precision = tiling.precision_class(DTYPES[row["dtype"]], row["precision"] == "tf32")
            hopper_mma_sync = gpu.wgmma and "mma.sync" in row["mma"]
            seconds = tiling.estimate_seconds(described["arch"], precision, model,
                                              float(HEADLINE_N) ** 2, hopper_mma_sync)  # fmt: skip
            row.update(flops_per_n2=round(model["flops"]), l2_bytes_per_n2=round(model["l2"], 2),
                       atomics_per_n2=round(model["atomics"], 4),
                       est_ms_n32768=round(1e3 * seconds, 3))  # fmt: skip
    except Exception as error:  # noqa: BLE001 - reported per configuration
        reports[key] = {}
        row["error"] = repr(error)[:200].replace("\n", " ")
    return {column: row.get(column) for column in COLUMNS}


def _variant(row: dict) -> tuple:
    """What identifies a row of the table (as text, as the CSV holds it)."""
    return tuple(str(row[key]) for key in ("kernel", "role", "strategy", "config", "n", "k",
                                           "dtype", "precision", "normalize", "ids"))  # fmt: skip


def step_estimates(rows: list[dict]) -> list[str]:
    """Per architecture, precision, width and strategy: forward + backward, estimated."""
    totals: dict = {}
    for r in rows:
        if r["config"] != "default" or r["est_ms_n32768"] is None or r["n"] != HEADLINE_N:
            continue
        if r["normalize"] is not True or r["ids"] != "none":
            continue
        for strategy in tiling.STRATEGIES:
            if r["strategy"] in ("-", strategy):
                key = (r["arch"], r["dtype"], r["precision"], r["k"], strategy)
                flops, ms = totals.get(key, (0, 0.0))
                totals[key] = (flops + r["flops_per_n2"], ms + r["est_ms_n32768"])
    return [f"{arch} {dtype}{'/' + prec if prec != '-' else ''} k={k} {strategy}: "
            f"{flops / k:.1f}k FLOPs per N^2, est. {ms:.1f} ms at N = {HEADLINE_N}"
            for (arch, dtype, prec, k, strategy), (flops, ms) in sorted(totals.items())]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(GPUS), default=list(GPUS))
    parser.add_argument("--k", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--n", type=int, nargs="+", default=[HEADLINE_N, 1001])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--precision", nargs="+", choices=["ieee", "tf32"], default=["ieee", "tf32"],
                        help="of fp32: IEEE (FMA) and/or TF32 GEMMs")  # fmt: skip
    parser.add_argument("--normalize", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--ids", nargs="+", choices=list(IDS), default=list(IDS))
    parser.add_argument("--candidates", action="store_true", help="also the autotuner's configs")
    parser.add_argument("--write", action="store_true",
                        help="write benchmarks/results/static_tiles_<arch>.csv")  # fmt: skip
    parser.add_argument("--merge", action="store_true",
                        help="with --write: replace only these variants' rows in the table")  # fmt: skip
    args = parser.parse_args()
    args.normalize = [value == "on" for value in args.normalize]
    reports: dict = {}
    rows = []
    for described, launch in variants(args):
        row = table_row(described, launch, reports)
        rows.append(row)
        print(", ".join(f"{key}={row[key] if row[key] is not None else ''}" for key in COLUMNS
                        if key not in ("specialised", "triton", "date")), flush=True)  # fmt: skip
    print()
    for line in step_estimates(rows):
        print(line)
    failed = [r for r in rows if r["error"] or (r["config"] == "default" and r["spill_bytes"])]
    print(f"defaults that spill or fail: {len(failed)} of {len(rows)} variants")
    for r in failed:
        print(f"  {r['arch']} {r['kernel']} ({r['role']}) {r['dtype']}/{r['precision']} "
              f"k={r['k']} n={r['n']}: {r['spill_bytes']} B spilled {r['error']}")  # fmt: skip
    for arch in args.arch:
        not_wgmma = sorted({f"{r['kernel']} {r['dtype']}/{r['precision']}" for r in rows
                            if r["arch"] == arch and GPUS[arch].wgmma and r["precision"] != "ieee"
                            and "mma.sync" in (r["mma"] or "")})  # fmt: skip
        if GPUS[arch].wgmma:
            print(f"{arch}: tensor-core GEMMs not on wgmma: {', '.join(not_wgmma) or 'none'}")
    if args.write:
        for arch in args.arch:
            path = RESULTS / f"static_tiles_{arch}.csv"
            new = [r for r in rows if r["arch"] == arch]
            if args.merge and path.exists():
                with open(path, newline="") as f:
                    kept = list(csv.DictReader(f))
                replaced = {_variant(r) for r in new}
                new = [r for r in kept if _variant(r) not in replaced] + new
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(new)
            print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
