"""Compile the fused-loss kernels for Hopper (sm_90a) without a GPU and report, from ptxas,
registers, spills and shared memory per tile configuration.

    python benchmarks/static_tile_check.py                    # the configurations gcl_ops launches
    python benchmarks/static_tile_check.py --sweep --k 512    # a grid of tile sizes
    python benchmarks/static_tile_check.py --out results/static_tiles.csv

Exits with status 1 if a launched configuration fails to compile or needs more shared memory
than an H100 gives one block (227 KiB). Spills are reported, not failed: they cost speed only.
A GPU measurement (benchmarks/bench_loss.py) is the real test; this is what can be checked
without one. Needs triton's bundled ptxas (Linux x86-64 wheels) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")

from gcl_ops import contrastive  # noqa: E402

SHARED_MEMORY_LIMIT = 232448  # bytes per block on H100 / H200 (227 KiB)
ELEMENT_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
POINTER_TYPES = {
    "inv_rows_ptr": "*fp32", "inv_cols_ptr": "*fp32", "row_qid_ptr": "*i64", "row_did_ptr": "*i64",
    "col_qid_ptr": "*i64", "col_did_ptr": "*i64", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
    "row_sum_ptr": "*fp32", "col_sum_ptr": "*fp32", "pos_ptr": "*fp32", "neg_row_ptr": "*fp32",
    "neg_col_ptr": "*fp32", "grad_neg_row_ptr": "*fp32", "grad_neg_col_ptr": "*fp32",
    "grad_pos_ptr": "*fp32", "scale_partials_ptr": "*fp32", "redo_ptr": "*i8", "lse_ptr": "*fp32",
    "qid_ptr": "*i64", "did_ptr": "*i64", "col_max_ptr": "*fp32",
}  # fmt: skip


def ptxas_report(kernel, element: str, constants: dict, num_warps: int) -> dict:
    """Compile ``kernel`` with ``constants`` for sm_90a and read ptxas's resource line."""
    names = list(inspect.signature(kernel.fn).parameters)
    element_pointer = f"*{element}"
    types = dict(POINTER_TYPES, rows_ptr=element_pointer, cols_ptr=element_pointer,
                 grad_rows_ptr=element_pointer, logits_ptr=element_pointer,
                 grad_ptr=element_pointer)  # fmt: skip
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})  # fmt: skip
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
        "shared_bytes": compiled.metadata.shared,
    }


def launch_configurations(k_values: list[int]):
    """(kernel, dtype, constants, num_warps) exactly as the launchers in gcl_ops pick them."""
    flags = dict(NORMALIZE=True, HAS_QID=True, HAS_DID=True, INPUT_PRECISION="tf32", UPCAST=False)
    for k_pad, element in itertools.product(sorted({contrastive._k_pad(k) for k in k_values}),
                                            ELEMENT_SIZES):  # fmt: skip
        forward = contrastive._tile_sizes(k_pad, ELEMENT_SIZES[element], backward=False)
        backward = contrastive._tile_sizes(k_pad, ELEMENT_SIZES[element], backward=True)
        for kernel, tiles, extra in (
            (contrastive._stats_fwd_kernel, forward, {}),
            (contrastive._online_lse_kernel, forward, {}),
            (contrastive._stats_bwd_kernel, backward, {"K_PAD": k_pad, "SCALE_GRAD": True}),
        ):
            tiles = dict(tiles)
            num_warps = tiles.pop("num_warps")
            yield kernel, element, {**tiles, **flags, **extra}, num_warps
    for element in ELEMENT_SIZES:
        for kernel in (contrastive._logits_stats_kernel, contrastive._logits_grad_kernel):
            constants = dict(BLOCK_M=128 if kernel is contrastive._logits_stats_kernel else 64,
                             BLOCK_N=64, HAS_QID=True, HAS_DID=True)  # fmt: skip
            yield kernel, element, constants, 4


def sweep_configurations(k_values: list[int]):
    flags = dict(NORMALIZE=True, HAS_QID=True, HAS_DID=False, INPUT_PRECISION="tf32", UPCAST=False)
    for k_pad, element, block_m, block_n in itertools.product(
        sorted({contrastive._k_pad(k) for k in k_values}),
        ("bf16", "fp32"),
        (32, 64, 128),
        (32, 64, 128),
    ):
        block_k = min(k_pad, 64 if element == "bf16" else 32)
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **flags)
        yield contrastive._stats_fwd_kernel, element, tiles, 8 if block_m * block_n >= 8192 else 4
        yield contrastive._stats_bwd_kernel, element, dict(tiles, K_PAD=k_pad, SCALE_GRAD=True), 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument(
        "--sweep", action="store_true", help="a grid of tile sizes, not the launched ones"
    )
    parser.add_argument("--out", default=None, help="write the table as CSV here")
    args = parser.parse_args()
    configurations = sweep_configurations(args.k) if args.sweep else launch_configurations(args.k)
    rows, failed = [], False
    for kernel, element, constants, num_warps in configurations:
        sizes = {key: constants.get(key) for key in ("K_PAD", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
        row = {"kernel": kernel.fn.__name__, "dtype": element, "num_warps": num_warps, **sizes}
        stamp = {"target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                 "date": datetime.date.today().isoformat()}  # fmt: skip
        try:
            row.update(ptxas_report(kernel, element, constants, num_warps), error="")
            too_big = row["shared_bytes"] > SHARED_MEMORY_LIMIT
            row["error"] = "shared memory over 227 KiB" if too_big else ""
        except Exception as error:  # noqa: BLE001 - reported per configuration
            row.update(registers=None, spill_bytes=None, shared_bytes=None, error=repr(error)[:200])
        failed |= bool(row["error"]) and not args.sweep
        rows.append({**row, **stamp})
        print(", ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
