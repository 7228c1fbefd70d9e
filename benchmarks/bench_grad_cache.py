"""Largest batch and time per sample of a multi-field GCL training step (query text vs product
title + image) with open_clip, with and without gradient caching.

    python benchmarks/bench_grad_cache.py                           # ViT-B-32 on the GPU
    python benchmarks/bench_grad_cache.py --model ViT-B-32 --batches 16 32 --device cpu

For each batch size (doubling, or those given) it runs full steps (forward, backward, AdamW) in
bf16 autocast, first without caching until the GPU runs out of memory, then with
``gcl_ops.grad_cache.cached_step`` (chunks of ``--chunk``). Weights are random (no download).
Rows go to ``benchmarks/results/grad_cache_<device>.csv`` with the hardware line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows, hardware, synchronize  # noqa: E402

import gcl_ops  # noqa: E402
from gcl_ops.grad_cache import cached_step  # noqa: E402


def make_step(model, optimizer, device: str, cached: bool, chunk: int):
    criterion = gcl_ops.MultiFieldGCLLoss(rhs_gamma=[0.5, 0.5])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def loss_fn(embeddings):
        weights = gcl_ops.score_to_weight(
            torch.full((embeddings[0].shape[0],), 90.0, device=device)
        )
        return criterion(embeddings[:1], embeddings[1:], model.logit_scale.exp(), weights)

    encoders = [model.encode_text, model.encode_text, model.encode_image]

    def step(query_tokens, title_tokens, images) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            if cached:
                loss = cached_step(encoders, [query_tokens, title_tokens, images], loss_fn, chunk)
            else:
                embeddings = [
                    encode(x) for encode, x in zip(encoders, (query_tokens, title_tokens, images))
                ]
                loss = loss_fn(embeddings)
                loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def measure(model, optimizer, batch: int, device: str, cached: bool, chunk: int, repeats: int):
    """(seconds per step, peak GiB) or None when the batch does not fit."""
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple) else image_size
    context, vocab = model.context_length, model.vocab_size
    query = torch.randint(0, vocab, (batch, context), device=device)
    title = torch.randint(0, vocab, (batch, context), device=device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    step = make_step(model, optimizer, device, cached, chunk)
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(query, title, images)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step(query, title, images)
        synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        return seconds, peak
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="*", default=None,
                        help="batch sizes (default: 256, 512, ... until out of memory, to 65536)")  # fmt: skip
    parser.add_argument("--chunk", type=int, default=256, help="rows per encoder call when caching")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no larger batch once they are spent")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.model == "gcl-tiny":  # the reference trainer's small config
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from reference_trainer.model import register_model_configs

        register_model_configs()
    model = open_clip.create_model(args.model, pretrained=None).to(args.device)
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    info = hardware()
    batches = args.batches or [256 * 2**i for i in range(9)]
    rows = []
    for cached in (False, True):
        for batch in batches:
            if args.time_budget and time.perf_counter() - started > args.time_budget * (
                0.5 if not cached else 1.0
            ):  # (half the budget for each way)
                break
            result = measure(model, optimizer, batch, args.device, cached, args.chunk, args.repeats)
            row = dict(
                model=args.model,
                cached=cached,
                chunk=args.chunk if cached else None,
                batch=batch,
                **info,
            )
            if result is None:
                rows.append(
                    dict(
                        row, seconds=None, ms_per_sample=None, peak_gib=None, status="out of memory"
                    )
                )
                print(f"cached={cached!s:5} batch {batch:6d}: out of memory")
                break
            seconds, peak = result
            rows.append(dict(row, seconds=round(seconds, 4), ms_per_sample=round(seconds / batch * 1e3, 4),
                             peak_gib=None if peak is None else round(peak, 2), status="ok"))  # fmt: skip
            peak_text = "" if peak is None else f", peak {peak:.1f} GiB"
            print(f"cached={cached!s:5} batch {batch:6d}: {seconds:.3f} s/step, "
                  f"{seconds / batch * 1e3:.3f} ms/sample{peak_text}")  # fmt: skip
    if not args.no_save:
        out = args.out or RESULTS / f"grad_cache_{'gpu' if args.device == 'cuda' else 'cpu'}.csv"
        append_rows(out, rows)


if __name__ == "__main__":
    main()
