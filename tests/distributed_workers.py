"""Worker processes for tests/test_distributed.py (spawned with torch.multiprocessing; gloo).

Every rank builds the same global batch from a seed, takes its slice, runs the distributed loss
and saves what it computed for the parent process to compare with one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import gcl_ops
from gcl_ops.distributed import distributed_gcl_loss
from gcl_ops.grad_cache import cached_step


def global_batch(world: int, n_local: int, k: int = 12, fields: int = 2, seed: int = 0):
    """The whole batch, identical on every rank: fields (N, k), weights, duplicate ids."""
    generator = torch.Generator().manual_seed(seed)
    n = world * n_local
    base = torch.randn(n, k, generator=generator, dtype=torch.float64)
    tensors = [
        base + 0.8 * torch.randn(n, k, generator=generator, dtype=torch.float64)
        for _ in range(fields)
    ]
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * 10
    query_ids = torch.randint(0, n // 2, (n,), generator=generator)
    doc_ids = torch.randint(0, n // 2, (n,), generator=generator)
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)
    return tensors, weights, query_ids, doc_ids, upstream


def global_negatives(world: int, h_local: int, n: int, k: int = 12, seed: int = 1):
    """Hard negatives ``(W * h_local, k)`` and their ids (some equal to a document id)."""
    generator = torch.Generator().manual_seed(seed)
    negatives = torch.randn(world * h_local, k, generator=generator, dtype=torch.float64)
    return negatives, torch.randint(0, n, (world * h_local,), generator=generator)


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def loss_worker(rank: int, world: int, store: str, out: str, case: dict) -> None:
    """The distributed loss (single- or multi-field) on this rank's slice; saves value and grads."""
    _init(rank, world, store)
    try:
        n_local, reduction = case["n_local"], case["reduction"]
        fields, weights, query_ids, doc_ids, upstream = global_batch(
            world, n_local, fields=case["fields"]
        )
        rows = slice(rank * n_local, (rank + 1) * n_local)
        dtype = torch.float32 if case["impl"] == "triton" else torch.float64
        leaves = [f[rows].to(dtype).requires_grad_() for f in fields]
        scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        options = dict(
            query_ids=query_ids[rows], doc_ids=doc_ids[rows], reduction=reduction, impl=case["impl"]
        )
        h_local = case.get("h_local")
        if h_local:  # this rank's hard negatives, a leaf of their own
            negatives, negative_ids = global_negatives(world, h_local, world * n_local)
            own = slice(rank * h_local, (rank + 1) * h_local)
            leaves.append(negatives[own].to(dtype).requires_grad_())
            options.update(negatives=leaves[-1], negative_ids=negative_ids[own])
        if case["fields"] == 2:
            loss = distributed_gcl_loss(
                leaves[0], leaves[1], weights[rows].to(dtype), scale, **options
            )
        else:
            loss = gcl_ops.multi_field_gcl_loss(
                leaves[:1], leaves[1:], weights[rows], scale, distributed=True, **options
            )
        if reduction == "none":
            loss.backward(upstream[rows].to(loss.dtype))
        else:
            loss.backward()
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in leaves], "scale_grad": scale.grad},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


class TwoTowers(torch.nn.Module):
    """A query tower, a document tower and the logit scale, as in a CLIP model."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        )
        self.doc = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        )
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.query if tower == "query" else self.doc)(x), dim=-1)


def ddp_cached_step_worker(rank: int, world: int, store: str, out: str, case: dict) -> None:
    """DDP + gradient caching + the distributed loss; saves every parameter's gradient."""
    _init(rank, world, store)
    try:
        n_local = case["n_local"]
        fields, weights, query_ids, _, _ = global_batch(world, n_local)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
        model = TwoTowers()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        criterion = gcl_ops.GCLLoss(distributed=True)

        def loss_fn(embeddings):
            return criterion(embeddings[0], embeddings[1], model.logit_scale.exp(),
                             weights[rows].float(), query_ids=query_ids[rows])  # fmt: skip

        inputs = [fields[0][rows].float(), fields[1][rows].float()]
        encoders = [lambda x: ddp("query", x), lambda x: ddp("doc", x)]

        # Count DDP's gradient all-reduces (one per bucket per synchronised backward).
        calls = {"count": 0}

        def counting_allreduce(state, bucket):
            calls["count"] += 1
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        # Without no_sync every re-encoding's backward all-reduces (the count is sensitive) ...
        cached_step(encoders, inputs, loss_fn, case["chunk_size"])
        calls_without_no_sync, calls["count"] = calls["count"], 0
        model.zero_grad(set_to_none=True)
        # ... with it, only the last one does.
        loss = cached_step(encoders, inputs, loss_fn, case["chunk_size"], no_sync=ddp.no_sync)
        torch.save({"loss": loss, "grads": {name: p.grad for name, p in model.named_parameters()},
                    "allreduce_calls": calls["count"], "calls_without_no_sync": calls_without_no_sync},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def run(worker, world: int, tmp: Path, case: dict) -> list[dict]:
    """Spawn ``world`` ranks of ``worker`` and return what each saved."""
    store = tmp / "store"
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(
        worker, args=(world, str(store), str(out), case), nprocs=world, join=True
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
