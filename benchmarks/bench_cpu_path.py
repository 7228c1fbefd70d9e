"""The blocked PyTorch path (``impl="torch"``) against naive PyTorch on a CPU: forward, backward
and forward + backward times, and the peak extra resident memory of each.

    python benchmarks/bench_cpu_path.py --n 8192 16384 --k 512 --threads 2 --rounds 5
    python benchmarks/bench_cpu_path.py --baseline /path/to/old/blockwise.py   # before/after

The implementations run interleaved, round after round (``--rounds``), so that load from other
processes on a shared machine hits them alike; the report is the median over rounds (and the
spread, max/min). ``--baseline`` loads another copy of ``gcl_ops/blockwise.py`` (say, the one
before a change, ``git show HEAD:gcl_ops/blockwise.py > /tmp/old_blockwise.py``) and runs the
loss through it as ``torch-baseline``. Memory: a fresh subprocess per implementation reads
Linux's per-process high-water mark (VmHWM), as ``tests/test_memory.py`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gcl_ops  # noqa: E402
from gcl_ops import ops  # noqa: E402
from gcl_ops.reference import naive_gcl_loss  # noqa: E402


def _load_reference(path: str):
    spec = importlib.util.spec_from_file_location("baseline_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _reference(module):
    """Run ``gcl_ops``'s PyTorch path through ``module`` (a copy of ``gcl_ops.blockwise``)."""
    if module is None:
        yield
        return
    saved = ops.blockwise
    ops.blockwise = module
    try:
        yield
    finally:
        ops.blockwise = saved


def loss_functions(baseline) -> dict[str, Callable]:
    def blocked(module):
        def run(q, d, w, t, **ids):
            with _reference(module):
                return gcl_ops.gcl_loss(q, d, w, t, impl="torch", **ids)

        return run

    functions = {"naive": naive_gcl_loss, "torch": blocked(None)}
    if baseline is not None:
        functions["torch-baseline"] = blocked(baseline)
    return functions


def time_round(fn: Callable, inputs: tuple, ids: dict) -> tuple[float, float]:
    """Seconds of one forward and of one backward."""
    q, d, w, t = inputs
    q.grad = d.grad = None
    start = time.perf_counter()
    loss = fn(q, d, w, t, **ids)
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return middle - start, end - middle


MEASURE = """
import json, sys
import torch
sys.path.insert(0, sys.argv[5])
import bench_cpu_path as bench
n, k, name, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
baseline = bench._load_reference(sys.argv[6]) if len(sys.argv) > 6 else None
torch.set_num_threads(threads)
fn = bench.loss_functions(baseline)[name]
q, d, w, t = bench.make_inputs(n, k)
fn(q[:64], d[:64], w[:64], t).backward()  # warm-up: kernels, and .grad at full size

from common import process_status_kib, reset_peak_rss
assert reset_peak_rss(), "needs Linux: /proc/self/clear_refs"
before = process_status_kib("VmRSS")
fn(q, d, w, t).backward()
print(json.dumps({"extra_mib": (process_status_kib("VmHWM") - before) / 2**10}))
"""


def make_inputs(n: int, k: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(n, k, generator=generator, requires_grad=True)
    d = torch.randn(n, k, generator=generator, requires_grad=True)
    w = torch.rand(n, generator=generator)
    return q, d, w, 20.0


def peak_extra_mib(n: int, k: int, name: str, threads: int, baseline: str | None) -> float:
    argv = [
        sys.executable,
        "-c",
        MEASURE,
        str(n),
        str(k),
        name,
        str(threads),
        str(Path(__file__).parent),
    ]
    result = subprocess.run(
        argv + ([baseline] if baseline else []), capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ids", action="store_true", help="with duplicate query ids")
    parser.add_argument("--baseline", help="another copy of gcl_ops/blockwise.py to compare")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = _load_reference(args.baseline) if args.baseline else None
    functions = loss_functions(baseline)
    for n in args.n:
        inputs = make_inputs(n, args.k)
        ids = {"query_ids": torch.randint(0, n // 2, (n,))} if args.ids else {}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in functions}
        for fn in functions.values():  # warm-up
            time_round(fn, tuple(x[:256] if isinstance(x, torch.Tensor) else x for x in inputs), {})
        for _ in range(args.rounds):
            for name, fn in functions.items():
                times[name].append(time_round(fn, inputs, ids))
        print(f"N={n} k={args.k} fp32 threads={args.threads} rounds={args.rounds}"
              f"{' ids' if args.ids else ''}: median seconds (max/min over rounds)")  # fmt: skip
        naive_total = statistics.median(f + b for f, b in times["naive"])
        for name, samples in times.items():
            cells = []
            for label, values in (("fwd", [f for f, _ in samples]), ("bwd", [b for _, b in samples]),
                                  ("fwd+bwd", [f + b for f, b in samples])):  # fmt: skip
                cells.append(
                    f"{label} {statistics.median(values):7.3f} ({max(values) / min(values):.2f})"
                )
            total = statistics.median(f + b for f, b in samples)
            memory = (
                ""
                if args.no_memory
                else (
                    f"  peak extra {peak_extra_mib(n, args.k, name, args.threads, args.baseline):7.1f} MiB"
                )
            )
            print(
                f"  {name:15s} "
                + "  ".join(cells)
                + f"  = {total / naive_total:.2f}x naive"
                + memory
            )


if __name__ == "__main__":
    main()
