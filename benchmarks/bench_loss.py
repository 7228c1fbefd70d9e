"""Throughput and peak memory of the GCL loss: gcl_ops against naive PyTorch, torch.compile of it,
open_clip's ClipLoss and Inf-CL, for forward, backward and forward + backward.

    python benchmarks/bench_loss.py --n 4096 16384 32768 65536 --k 512 --dtype bf16
    python benchmarks/bench_loss.py --quick          # small CPU sizes (the demo)

Rows are appended to ``benchmarks/results/loss_<device>.csv`` with the hardware line (device,
torch and triton versions, date). FLOP/s count 8 N^2 k per forward + backward (2 N^2 k per
matmul: the forward's and three in the backward: the cost of a design that recomputes
the similarity tiles in backward).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows, hardware, peak_memory_mb, time_ms  # noqa: E402

import gcl_ops  # noqa: E402
from gcl_ops.reference import naive_gcl_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _open_clip_loss() -> Callable | None:
    try:
        from open_clip.loss import ClipLoss
    except ImportError:
        return None
    clip = ClipLoss()
    return lambda q, d, w, t: clip(q, d, t)  # unweighted: the cost of the plain CLIP loss


def _inf_cl_loss() -> Callable | None:
    """Inf-CL's tiled loss (one direction per call), when installed and on CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None
    return lambda q, d, w, t: 0.5 * (cal_inf_loss(q, d, scale=t) + cal_inf_loss(d, q, scale=t))


def providers(device: str) -> dict[str, Callable]:
    found: dict[str, Callable | None] = {
        "gcl_ops": lambda q, d, w, t: gcl_ops.gcl_loss(q, d, w, t, normalize=False, validate=False),
        "naive": lambda q, d, w, t: naive_gcl_loss(q, d, w, t, normalize=False),
        "torch.compile": torch.compile(
            lambda q, d, w, t: naive_gcl_loss(q, d, w, t, normalize=False), dynamic=False
        ) if device == "cuda" else None,
        "open_clip": _open_clip_loss(),
        "inf_cl": _inf_cl_loss(),
    }  # fmt: skip
    return {name: fn for name, fn in found.items() if fn is not None}


def measure(name: str, fn: Callable, n: int, k: int, dtype: torch.dtype, device: str,
            repeats: int) -> list[dict]:  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.nn.functional.normalize(
        torch.randn(n, k, device=device, generator=generator), dim=-1
    )
    doc = torch.nn.functional.normalize(
        query + torch.randn(n, k, device=device, generator=generator), dim=-1
    )
    query, doc = query.to(dtype).requires_grad_(), doc.to(dtype).requires_grad_()
    weights = gcl_ops.score_to_weight(
        torch.randint(1, 101, (n,), device=device, generator=generator).float()
    )
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def forward() -> None:
        state["loss"] = fn(query, doc, weights, scale)

    def backward() -> None:
        state["loss"].backward()

    def forward_backward() -> None:
        fn(query, doc, weights, scale).backward()

    def forward_then_backward() -> None:
        forward()
        backward()

    rows = []
    # (mode, timed call, untimed set-up before each call, call whose peak memory is recorded)
    modes = (
        ("fwd", forward, None, forward),
        ("bwd", backward, forward, forward_then_backward),
        ("fwd+bwd", forward_backward, None, forward_backward),
    )
    for mode, run, setup, whole in modes:
        row = dict(provider=name, mode=mode, n=n, k=k, dtype=str(dtype).replace("torch.", ""))
        try:
            median, low, high = time_ms(run, device, repeats=repeats, setup=setup)
            peak = peak_memory_mb(whole, device)
            flops = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode] * n * n * k
            row.update(ms=round(median, 4), ms_p20=round(low, 4), ms_p80=round(high, 4),
                       tflops=round(flops / median / 1e9, 2),
                       peak_mib=None if peak is None else round(peak, 1), status="ok")  # fmt: skip
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            # Out of memory also comes as cuBLAS' ALLOC_FAILED or from a compiled graph; any
            # other failure is recorded too (and printed), so that one provider's failure at
            # a size does not end the run.
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            oom = isinstance(error, torch.cuda.OutOfMemoryError) or any(
                text in message for text in ("out of memory", "ALLOC_FAILED")
            )
            status = "out of memory" if oom else f"failed: {type(error).__name__}: {message}"
            row.update(ms=math.nan, ms_p20=math.nan, ms_p80=math.nan, tflops=math.nan,
                       peak_mib=None, status=status)  # fmt: skip
        finally:
            state.clear()
            query.grad = doc.grad = scale.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--providers", nargs="+", default=None, help="default: all available")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: N = 1024, 2048, k = 256, fp32, 3 repeats")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to")
    parser.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.dtype, args.repeats = [1024, 2048], 256, "fp32", 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        sys.exit("half precision is benchmarked on the GPU only; use --dtype fp32 on the CPU")
    available = providers(device)
    chosen = {
        name: fn
        for name, fn in available.items()
        if args.providers is None or name in args.providers
    }
    info = hardware()
    out = args.out or RESULTS / f"loss_{'gpu' if device == 'cuda' else 'cpu'}.csv"
    print(f"{info['device']} | torch {info['torch']} | triton {info['triton']} | {info['date']}")
    print(f"{'provider':>14} {'mode':>8} {'N':>7} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>9}")
    for n in args.n:
        for name, fn in chosen.items():
            rows = measure(name, fn, n, args.k, dtype, device, args.repeats)
            for row in rows:
                peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
                status = "" if row["status"] == "ok" else row["status"]
                print(f"{name:>14} {row['mode']:>8} {n:>7} {row['ms']:>10.2f} "
                      f"{row['tflops']:>8.2f} {peak:>9} {status}")  # fmt: skip
            if not args.no_save:  # (per provider: a later failure keeps what was measured)
                append_rows(out, [{**row, **info} for row in rows])
    if not args.no_save:
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
