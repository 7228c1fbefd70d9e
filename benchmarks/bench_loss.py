"""Throughput and peak memory of the GCL loss: gcl_ops (each backward strategy, and its PyTorch
path) against naive PyTorch, torch.compile of it, open_clip's ClipLoss, Inf-CL and memeff, for
forward, backward and forward + backward.

    python benchmarks/bench_loss.py --n 4096 16384 32768 65536 --k 512 --dtype bf16
    python benchmarks/bench_loss.py --dtype fp32 --tf32        # fp32 inputs, TF32 GEMMs
    python benchmarks/bench_loss.py --quick                    # small CPU sizes (the demo)

Rows are appended to ``benchmarks/results/loss_<device>.csv`` (or ``--out``) with the hardware
line (device, torch and triton versions, date). FLOP/s count 8 N^2 k per forward + backward
(the forward's GEMM and three in the backward), whatever a provider really issues. Inf-CL and
memeff run where they are installed (``scripts/gpu_check.sh --fetch-wheels``) and on CUDA.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows, hardware, peak_memory_mb, time_ms  # noqa: E402

import gcl_ops  # noqa: E402
from gcl_ops import tiling  # noqa: E402
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
    """Inf-CL's tiled loss (one direction per call; the scale applied outside, so that no
    process group is needed for its gradient), when installed and on CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None
    head = 256  # its kernels take widths that are multiples of a power of two up to 256

    def loss(q, d, w, t):
        width = math.gcd(q.shape[1], head)
        return 0.5 * (
            cal_inf_loss(t * q, d, head_dim=width) + cal_inf_loss(t * d, q, head_dim=width)
        )

    return loss


def _memeff_loss() -> Callable | None:
    """memeff's CLIP loss (both directions, unit-norm inputs, open_clip's gradients with
    ``stable=False``; its temperature is a float, so the scale gets no gradient), on CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        import memeff
    except ImportError:
        return None
    return lambda q, d, w, t: memeff.MemoryEfficientCLIPLoss(
        temperature=1.0 / float(t), normalized_inputs=True, stable=False
    )(q, d)


def _gcl_ops(strategy: str | None = None, impl: str = "auto") -> Callable:
    def loss(q, d, w, t):
        if strategy is not None:  # (read by the backward too, which runs after this call)
            os.environ["GCL_OPS_BACKWARD"] = strategy
        return gcl_ops.gcl_loss(q, d, w, t, normalize=False, validate=False, impl=impl)

    return loss


def providers(device: str, compile_backend: str = "inductor") -> dict[str, Callable]:
    naive = lambda q, d, w, t: naive_gcl_loss(q, d, w, t, normalize=False)  # noqa: E731
    found: dict[str, Callable | None] = {
        "gcl_ops": _gcl_ops("split"),
        "gcl_ops atomic": _gcl_ops("atomic"),
        "gcl_ops torch path": _gcl_ops(impl="torch"),
        "naive": naive,
        "torch.compile": torch.compile(naive, dynamic=False, backend=compile_backend),
        "open_clip": _open_clip_loss(),
        "inf_cl": _inf_cl_loss(),
        "memeff": _memeff_loss(),
    }
    if device != "cuda":  # the CPU: the fused kernels under the interpreter (the GPU kit's dry run)
        found["gcl_ops"] = _gcl_ops("split", "triton" if tiling.INTERPRETING else "auto")
        if not tiling.INTERPRETING:
            found.pop("gcl_ops atomic")
            found.pop("gcl_ops torch path")
        else:
            found["gcl_ops atomic"] = _gcl_ops("atomic", "triton")
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
        precision = (
            "tf32"
            if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32"
            else ""
        )
        row = dict(provider=name, mode=mode, n=n, k=k,
                   dtype=str(dtype).replace("torch.", "") + (f"/{precision}" if precision else ""))  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--providers", nargs="+", default=None, help="default: all available")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: N = 1024, 2048, k = 256, fp32, 3 repeats")  # fmt: skip
    parser.add_argument("--tf32", action="store_true", help="fp32 GEMMs in TF32 (--dtype fp32)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (the GPU kit's dry run: eager)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to")
    parser.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.k, args.dtype, args.repeats = [1024, 2048], 256, "fp32", 3
        args.providers = args.providers or ["gcl_ops", "naive", "open_clip"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        sys.exit("half precision is benchmarked on the GPU only; use --dtype fp32 on the CPU")
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"
    available = providers(device, args.compile_backend)
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
