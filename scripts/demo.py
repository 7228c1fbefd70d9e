"""The gcl-ops demo: the GCL loss on random embeddings, blocked path against the naive one.

Run through ``bash scripts/demo.sh`` (which sets up ``.venv``), or directly with
``python scripts/demo.py --n 4096 --k 512``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gcl_ops
from gcl_ops.reference import naive_gcl_loss


def timed_forward_backward(loss_fn, query, doc, weights, scale) -> tuple[float, float, float]:
    """(loss, forward seconds, backward seconds) of one call, gradients cleared first."""
    query.grad = doc.grad = None
    start = time.perf_counter()
    loss = loss_fn(query, doc, weights, scale)
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return loss.item(), middle - start, end - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="batch size N (default 4096)")
    parser.add_argument("--k", type=int, default=512, help="embedding width k (default 512)")
    parser.add_argument("--logit-scale", type=float, default=100.0, help="t (default 100)")
    parser.add_argument(
        "--weights",
        default="inverse",
        choices=gcl_ops.WEIGHT_KINDS,
        help="score-to-weight function (default inverse)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="warm calls timed (default 3)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    query = torch.randn(args.n, args.k, device=device, generator=generator)
    # Documents near their query, so that the loss is far from log N.
    doc = 0.5 * query + torch.randn(args.n, args.k, device=device, generator=generator)
    query.requires_grad_(), doc.requires_grad_()
    # MarqoGS-10M-style scores: 101 - position, position 1..100.
    positions = torch.randint(1, 101, (args.n,), device=device, generator=generator)
    weights = gcl_ops.score_to_weight(101 - positions, args.weights)
    scale = torch.tensor(args.logit_scale, device=device, requires_grad=True)

    print(
        f"gcl-ops {gcl_ops.__version__} demo on {device}: N={args.n}, k={args.k}, "
        f"t={args.logit_scale}, weights={args.weights} (mean {weights.mean():.2f})"
    )
    results = {}
    for name, loss_fn in (
        ("gcl_ops.gcl_loss", gcl_ops.gcl_loss),
        ("naive PyTorch", naive_gcl_loss),
    ):
        # The first call pays one-time costs (gcl_ops: the custom ops' first dispatch, about a
        # second on a CPU); the times below are the median of warm calls.
        _, first_forward, first_backward = timed_forward_backward(
            loss_fn, query, doc, weights, scale
        )
        warm = [
            timed_forward_backward(loss_fn, query, doc, weights, scale) for _ in range(args.repeats)
        ]
        loss = warm[-1][0]
        fwd, bwd = (statistics.median(call[index] for call in warm) for index in (1, 2))
        results[name] = (loss, query.grad.double())
        print(
            f"  {name:18s} loss {loss:.6e}   forward {fwd * 1e3:8.1f} ms"
            f"   backward {bwd * 1e3:8.1f} ms   (median of {args.repeats} warm calls)"
        )
        print(
            f"  {'':18s} first call: {(first_forward + first_backward) * 1e3:.0f} ms, one-time set-up included"
        )

    # Ground truth: the definition in float64.
    query64 = query.detach().double().requires_grad_()
    loss64 = naive_gcl_loss(query64, doc.detach().double(), weights.double(), args.logit_scale)
    loss64.backward()
    print(f"  float64 definition loss {loss64.item():.6e}; error of each against it:")
    for name, (loss, grad) in results.items():
        loss_error = abs(loss - loss64.item()) / max(abs(loss64.item()), 1e-300)
        grad_error = ((grad - query64.grad).norm() / query64.grad.norm()).item()
        print(
            f"  {name:18s} loss {loss_error:.1e} relative, query gradient {grad_error:.1e} relative"
        )


if __name__ == "__main__":
    main()
