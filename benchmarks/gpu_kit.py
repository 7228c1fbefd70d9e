"""The GPU kit: every GPU number of gcl-ops in one command, in at most 9 minutes on one H100/H200.

    bash scripts/gpu_check.sh OUT               # the wrapper (installs carried wheels first)
    python benchmarks/gpu_kit.py run OUT        # every part, each in its own time box
    python benchmarks/gpu_kit.py run OUT --dry-run   # the same code at tiny sizes on a CPU
    python benchmarks/gpu_kit.py part NAME OUT  # one part (what ``run`` starts per part)

Parts, in order (``PARTS``: name, seconds on a GPU):
1. ``environment``: the GPU, driver, torch / triton / Python versions, commit, date;
2. ``gpu_tests``: ``tests/test_gpu.py`` and every GPU-marked test (pytest ``-m gpu``);
3. ``correctness``: the loss and its gradients at N = 4,096, k = 512 in bf16, fp16, TF32 and
   IEEE fp32 (``impl="triton"``) against the float64 PyTorch path, both backward strategies,
   and a CUDA graph capture and replay of a training step;
4. ``loss``: ``benchmarks/bench_loss.py`` at N = 4,096 ... 65,536, k = 512, bf16 and TF32:
   gcl_ops (split, atomic, its PyTorch path), naive, torch.compile, open_clip, Inf-CL, memeff;
5. ``largest_n``: the largest batch the fused loss runs (bf16, k = 512), doubling from 65,536
   while the next size's projected time fits the box;
6. ``metrics``: ``benchmarks/bench_metrics.py``, 100,000 queries x 100 on the GPU and the CPU;
7. ``grad_cache``: ``benchmarks/bench_grad_cache.py`` with open_clip ViT-B-32 multi-field: the
   largest batch without and with gradient caching, and the time per sample of each;
8. ``st_negatives``: ``benchmarks/bench_sentence_transformers.py`` with hard negatives: GCLLoss
   against MNRL and CachedGCLLoss against CMNRL (symmetric), 1,024 pairs x 7 negatives, a step
   (where the machine has sentence-transformers, whose dependencies are too large to carry);
9. ``trainer``: the reference trainer, ViT-B-32 multi-field, 50 steps on synthetic data.

Each part runs in its own process under a timeout: a failure or a time-out loses only that part,
and every part writes its rows (CSV / JSON, with the hardware line) under OUT as soon as they
exist. ``run`` ends with a summary table (``summary.json``) and the loss plot. ``--dry-run`` runs
every part on the CPU at tiny sizes (the Triton kernels under the interpreter; what needs CUDA is
recorded as skipped), so that CI keeps the kit working until a GPU runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
#: (name, seconds on a GPU); the dry run gives each part ``DRY_RUN_SECONDS``.
PARTS = (
    ("environment", 15),
    ("gpu_tests", 110),
    ("correctness", 40),
    ("loss", 120),
    ("largest_n", 60),
    ("metrics", 25),
    ("grad_cache", 50),
    ("st_negatives", 70),
    ("trainer", 50),
)
DRY_RUN_SECONDS = 240


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")


def _hardware() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import hardware

    info = hardware()
    info["commit"] = os.environ.get("GCL_OPS_COMMIT") or _git("rev-parse", "--short", "HEAD")
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------


def environment(out: Path, dry: bool) -> dict:
    import torch

    info = _hardware()
    info.update(python=platform.python_version(), cuda=torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True)  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip()
        except OSError:
            info["nvidia_smi"] = "not found"
    for module in ("open_clip", "inf_cl", "memeff", "pytest", "hypothesis", "pyarrow"):
        try:
            info[f"has_{module}"] = __import__(module).__name__ == module
        except ImportError:
            info[f"has_{module}"] = False
    _write_json(out / "environment.json", info)
    return info


def gpu_tests(out: Path, dry: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-rs", "-s", f"--junitxml={out / 'gpu_tests.xml'}", str(ROOT / "tests")]  # fmt: skip
    if dry:
        command.append("--collect-only")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(result.stdout + result.stderr)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": result.returncode, "summary": summary}


def correctness(out: Path, dry: bool) -> dict:
    import torch

    import gcl_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k = (96, 40) if dry else (4096, 512)
    generator = torch.Generator(device=device).manual_seed(0)
    doc = torch.randn(n, k, device=device, generator=generator)
    query = 0.5 * doc + torch.randn(n, k, device=device, generator=generator)
    weights = torch.rand(n, device=device, generator=generator) * 10
    ids = torch.randint(0, n // 2, (n,), device=device, generator=generator)

    def loss_and_grads(q, d, impl):
        q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
        scale = torch.tensor(50.0, device=device, dtype=torch.float64 if q.dtype == torch.float64
                             else torch.float32, requires_grad=True)  # fmt: skip
        loss = gcl_ops.gcl_loss(q, d, weights.to(q.dtype if q.dtype == torch.float64 else
                                                 torch.float32), scale, query_ids=ids, impl=impl)  # fmt: skip
        return [loss.detach(), *torch.autograd.grad(loss, (q, d, scale))]

    rows = []
    cases = (("bf16", torch.bfloat16, "ieee", 1e-2), ("fp16", torch.float16, "ieee", 2e-3),
             ("tf32", torch.float32, "tf32", 5e-3), ("ieee", torch.float32, "ieee", 1e-4))  # fmt: skip
    for name, dtype, precision, tolerance in cases:
        torch.backends.cuda.matmul.fp32_precision = precision
        q, d = query.to(dtype), doc.to(dtype)
        truth = loss_and_grads(q.double(), d.double(), "torch")
        for strategy in ("split", "atomic"):
            os.environ["GCL_OPS_BACKWARD"] = strategy
            got = loss_and_grads(q, d, "triton")
            errors = {part: float((g.double() - t).abs().max() / t.abs().max().clamp_min(1e-30))
                      for part, g, t in zip(("loss", "query", "doc", "scale"), got, truth)}  # fmt: skip
            rows.append(dict(case=name, strategy=strategy, n=n, k=k, tolerance=tolerance,
                             ok=all(e < tolerance for e in errors.values()), **errors))  # fmt: skip
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    os.environ.pop("GCL_OPS_BACKWARD")
    rows.append(_graph_capture(query, doc, weights, ids) if device == "cuda" else
                dict(case="cuda graph", ok=None, note="skipped: needs CUDA"))  # fmt: skip
    _write_json(out / "correctness.json", rows)
    failed = [r["case"] + " " + r.get("strategy", "") for r in rows if r["ok"] is False]
    return {"checked": len(rows), "failed": failed}


def _graph_capture(query, doc, weights, ids) -> dict:
    """A training step (loss, backward) captured in a CUDA graph and replayed on new inputs,
    against the same step run eagerly."""
    import torch

    import gcl_ops

    q, d = query.bfloat16().clone().requires_grad_(), doc.bfloat16().clone().requires_grad_()
    scale = torch.tensor(30.0, device="cuda", requires_grad=True)

    def step():
        q.grad = d.grad = scale.grad = None
        loss = gcl_ops.gcl_loss(q, d, weights, scale, query_ids=ids)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    with torch.no_grad():
        q.copy_(doc)
        d.copy_(query)
    graph.replay()
    replayed = [loss.clone(), q.grad.clone(), d.grad.clone()]
    eager = [step().detach(), q.grad, d.grad]
    error = max(float((a.float() - b.float()).abs().max()) for a, b in zip(replayed, eager))
    return dict(case="cuda graph", ok=error < 1e-2, max_abs_difference=error)


def loss(out: Path, dry: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_loss

    csv = out / "loss_gpu.csv"
    if dry:
        bench_loss.main(["--n", "48", "--k", "32", "--dtype", "fp32", "--repeats", "1",
                         "--compile-backend", "eager", "--out", str(csv)])  # fmt: skip
    else:
        sizes = ["4096", "16384", "32768", "65536"]
        for extra in (["--dtype", "bf16"], ["--dtype", "fp32", "--tf32"]):
            bench_loss.main(["--n", *sizes, "--k", "512", "--repeats", "5", "--out", str(csv),
                             *extra])  # fmt: skip
    return {"rows": sum(1 for _ in csv.open()) - 1}


def largest_n(out: Path, dry: bool) -> dict:
    import torch

    import gcl_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k, budget = (64, 32, 30.0) if dry else (65536, 512, 45.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impl = "auto" if device == "cuda" else "triton"
    rows, started, last = [], time.perf_counter(), None
    while True:
        row = dict(n=n, k=k, dtype=str(dtype).replace("torch.", ""))
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(n, k, device=device, dtype=dtype, generator=generator).requires_grad_()
            d = torch.randn(n, k, device=device, dtype=dtype, generator=generator).requires_grad_()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            gcl_ops.gcl_loss(q, d, logit_scale=20.0, validate=False, impl=impl).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            last = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            row.update(status="ok", seconds=round(last, 3), peak_gib=peak and round(peak, 2))
        except torch.cuda.OutOfMemoryError:
            row.update(status="out of memory")
        finally:
            q = d = None
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        _write_json(out / "largest_n.json", rows)
        remaining = budget - (time.perf_counter() - started)
        if row["status"] != "ok" or 4.5 * last > remaining or (dry and n >= 128):
            break  # (the next size costs about 4x: stop where it would not finish in the box)
        n *= 2
    fits = [r["n"] for r in rows if r["status"] == "ok"]
    return {"largest_fitting_n": max(fits) if fits else None, "tried": [r["n"] for r in rows]}


def metrics(out: Path, dry: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_metrics

    queries = "2000" if dry else "100000"
    bench_metrics.main(["--queries", queries, "--skip", "ranx", "torchmetrics", "--repeats", "3",
                        "--out", str(out / "metrics_gpu.csv")])  # fmt: skip
    return {"queries": int(queries)}


def grad_cache(out: Path, dry: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_grad_cache

    if dry:
        argv = ["--model", "gcl-tiny", "--device", "cpu", "--batches", "8", "16", "--chunk", "8",
                "--repeats", "1"]  # fmt: skip
    else:
        argv = ["--model", "ViT-B-32", "--time-budget", "40", "--repeats", "2"]
    bench_grad_cache.main([*argv, "--out", str(out / "grad_cache_gpu.csv")])
    return {"csv": "grad_cache_gpu.csv"}


def st_negatives(out: Path, dry: bool) -> dict:
    import importlib.util

    # sentence-transformers imports scipy, scikit-learn and datasets (pyarrow): too large to carry
    # as wheels, so this part runs where the GPU machine has them.
    if importlib.util.find_spec("sentence_transformers") is None:
        return {"skipped": "sentence-transformers is not installed on this machine"}
    sizes = (["--device", "cpu", "--batches", "16", "--negatives", "1", "--steps", "1",
              "--hidden", "16"] if dry else
             ["--device", "cuda", "--batches", "1024", "--negatives", "7", "--steps", "3"])  # fmt: skip
    losses = ["gcl_uncached", "mnrl_sym", "gcl", "cmnrl_sym"]
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_sentence_transformers.py"), *sizes,
               "--modes", "step", "--losses", *losses, "--out", str(out / "st_negatives_gpu.csv")]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    return {"csv": "st_negatives_gpu.csv", "losses": losses}


def trainer(out: Path, dry: bool) -> dict:
    import csv

    data, run = out / "trainer_data", out / "trainer_run"
    generate = [sys.executable, "-m", "reference_trainer", "make-synthetic", str(data),
                "layout=huggingface", "queries_per_set=40", "products_per_set=200"]  # fmt: skip
    subprocess.run(generate, cwd=ROOT, check=True, capture_output=True)
    options = (["model=gcl-tiny", "steps=3", "batch_size=16", "device=cpu"] if dry else
               ["model=ViT-B-32", "steps=50", "batch_size=256", "num_workers=4"])  # fmt: skip
    train = [sys.executable, "-m", "reference_trainer", "train", "--data", str(data), "--out",
             str(run), *options, "progress=false", "log_every=1"]  # fmt: skip
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    (out / "trainer.log").write_text(result.stdout + result.stderr)
    result.check_returncode()
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    throughput = [float(r["samples_per_s"]) for r in rows[len(rows) // 2 :]]  # (warm steps)
    summary = {
        "steps": len(rows),
        "samples_per_s": round(sorted(throughput)[len(throughput) // 2], 1),
    }
    _write_json(out / "trainer.json", summary)
    return summary


PART_FUNCTIONS = {name: globals()[name] for name, _ in PARTS}


# ------------------------------------------------------------------------------------------
# Running the parts
# ------------------------------------------------------------------------------------------


def run(out: Path, dry: bool, only: list[str] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get("PYTHONPATH")])))  # fmt: skip
    if dry:
        env["TRITON_INTERPRET"] = "1"
    summary = []
    for name, seconds in PARTS:
        if only and name not in only:
            continue
        box = DRY_RUN_SECONDS if dry else seconds
        command = [sys.executable, __file__, "part", name, str(out)] + (["--dry-run"] * dry)
        started = time.perf_counter()
        print(f"== {name} (at most {box} s)", flush=True)
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=box)  # fmt: skip
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
            log = result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            status = f"timed out after {box} s"
            log = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(
                errors="replace"
            )
        (out / f"{name}.log").write_text(log)
        result_file = out / f"{name}.result.json"
        details = json.loads(result_file.read_text()) if result_file.exists() else {}
        summary.append(dict(part=name, status=status, seconds=round(time.perf_counter() - started, 1),
                            **{"result": details}))  # fmt: skip
        print(f"   {status} in {summary[-1]['seconds']} s: {details}", flush=True)
        if status != "ok":
            print("   " + "\n   ".join(log.strip().splitlines()[-8:]), flush=True)
        _write_json(out / "summary.json", summary)
    _plot(out)
    print(f"\n{'part':<12} {'status':<28} {'seconds':>8}  result")
    for row in summary:
        print(f"{row['part']:<12} {row['status']:<28} {row['seconds']:>8}  {row['result']}")
    return 0 if all(row["status"] == "ok" for row in summary) else 1


def _plot(out: Path) -> None:
    csv = out / "loss_gpu.csv"
    if csv.exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            import plot_results

            print(f"plot: {plot_results.plot_loss(csv)}")
        except Exception as error:  # noqa: BLE001 - a plot must not fail the kit
            print(f"plot failed: {error!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="every part, each in its own time box")
    run_parser.add_argument("out", type=Path)
    run_parser.add_argument("--dry-run", action="store_true")
    run_parser.add_argument("--only", nargs="+", choices=[name for name, _ in PARTS])
    part_parser = commands.add_parser("part", help="one part, in this process")
    part_parser.add_argument("name", choices=[name for name, _ in PARTS])
    part_parser.add_argument("out", type=Path)
    part_parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.command == "run":
        return run(args.out, args.dry_run, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    details = PART_FUNCTIONS[args.name](args.out, args.dry_run)
    _write_json(args.out / f"{args.name}.result.json", details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
