"""The distributed loss equals the single-process loss of the global batch (2 and 3 ranks, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_workers import (
    TwoTowers,
    ddp_cached_step_worker,
    global_batch,
    global_negatives,
    loss_worker,
    run,
)
from params import DEVICE

import gcl_ops
from gcl_ops import distributed
from gcl_ops.contrastive import gcl_stats
from gcl_ops.distributed import distributed_gcl_loss, gather_with_grad

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)


def single_process(
    world: int, n_local: int, fields: int, reduction: str, impl: str, h_local: int = 0
):
    tensors, weights, query_ids, doc_ids, upstream = global_batch(world, n_local, fields=fields)
    leaves = [t.clone().requires_grad_() for t in tensors]
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    options = dict(query_ids=query_ids, doc_ids=doc_ids, reduction=reduction, impl=impl)
    if h_local:
        negatives, negative_ids = global_negatives(world, h_local, world * n_local)
        leaves.append(negatives.requires_grad_())
        options.update(negatives=leaves[-1], negative_ids=negative_ids)
    if fields == 2:
        loss = gcl_ops.gcl_loss(leaves[0], leaves[1], weights, scale, **options)
    else:
        loss = gcl_ops.multi_field_gcl_loss(leaves[:1], leaves[1:], weights, scale, **options)
    loss.backward(upstream if reduction == "none" else None)
    return loss.detach(), [x.grad for x in leaves], scale.grad


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    ("reduction", "h_local"),
    [("mean", 0), ("sum", 0), ("none", 0), ("mean", 3), ("weighted_mean", 3), ("none", 3)],
    ids=["mean", "sum", "none", "negatives-mean", "negatives-weighted_mean", "negatives-none"],
)
def test_loss_and_gradients_equal_the_single_process_ones(
    tmp_path, world: int, reduction: str, h_local: int
) -> None:
    # With hard negatives, every rank's are gathered with gradient: the negatives' gradients
    # (each rank its own) are those of one process too.
    n_local = 5
    case = dict(n_local=n_local, reduction=reduction, fields=2, impl="torch", h_local=h_local)
    ranks = run(loss_worker, world, tmp_path, case)
    want_loss, want_grads, want_scale = single_process(
        world, n_local, 2, reduction, "torch", h_local
    )
    if reduction == "none":
        # Per-pair losses and gradients are the single-process slices, unscaled.
        torch.testing.assert_close(torch.cat([r["loss"] for r in ranks]), want_loss)
        scale = 1.0
    else:
        # The mean over ranks is the loss; each rank's gradients are W times its slice (DDP's
        # average over ranks brings them back).
        torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), want_loss)
        scale = world
    for leaf in range(len(want_grads)):
        got = torch.cat([r["grads"][leaf] for r in ranks]) / scale
        torch.testing.assert_close(got, want_grads[leaf], rtol=1e-9, atol=1e-12)
    got_scale = sum(r["scale_grad"] for r in ranks) / scale
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_multi_field_distributed(tmp_path) -> None:
    world, n_local = 2, 6
    case = dict(n_local=n_local, reduction="mean", fields=3, impl="torch")
    ranks = run(loss_worker, world, tmp_path, case)
    want_loss, want_grads, want_scale = single_process(world, n_local, 3, "mean", "torch")
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), want_loss)
    for field in range(3):
        torch.testing.assert_close(
            torch.cat([r["grads"][field] for r in ranks]) / world, want_grads[field]
        )
    torch.testing.assert_close(sum(r["scale_grad"] for r in ranks) / world, want_scale)


@pytest.mark.slow
def test_triton_kernels_distributed(tmp_path, monkeypatch) -> None:
    # The rectangular kernel with an offset, 2 ranks on gloo (CPU tensors), so under the
    # interpreter, which the workers take from the environment (a GPU machine has it unset).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world, n_local = 2, 9
    ranks = run(
        loss_worker,
        world,
        tmp_path,
        dict(n_local=n_local, reduction="mean", fields=2, impl="triton"),
    )
    want_loss, want_grads, want_scale = single_process(world, n_local, 2, "mean", "torch")
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]).mean().double(), want_loss, rtol=1e-5, atol=1e-6
    )
    for field in range(2):
        got = torch.cat([r["grads"][field] for r in ranks]).double() / world
        torch.testing.assert_close(got, want_grads[field], rtol=1e-4, atol=1e-6)
    got_scale = sum(r["scale_grad"] for r in ranks).double() / world
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [2, 3])
def test_ddp_with_gradient_caching(tmp_path, chunk_size: int) -> None:
    # DDP over 2 ranks, each caching its 5 pairs in chunks, with the distributed loss: every
    # parameter's gradient (DDP-averaged) equals full-batch backpropagation on one process.
    world, n_local = 2, 5
    ranks = run(
        ddp_cached_step_worker, world, tmp_path, dict(n_local=n_local, chunk_size=chunk_size)
    )
    fields, weights, query_ids, _, _ = global_batch(world, n_local)
    torch.manual_seed(0)
    model = TwoTowers()
    query, doc = model("query", fields[0].float()), model("doc", fields[1].float())
    loss = gcl_ops.gcl_loss(
        query, doc, weights.float(), model.logit_scale.exp(), query_ids=query_ids
    )
    loss.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach())
    # Gradients were all-reduced once for the step (the tiny model is one DDP bucket), not once
    # per re-encoded chunk as without no_sync.
    chunks = 2 * -(-n_local // chunk_size)
    for rank in ranks:
        assert rank["allreduce_calls"] == 1
        assert rank["calls_without_no_sync"] == chunks
    for name, parameter in model.named_parameters():
        for rank in ranks:
            slack = 1e-5 * float(parameter.grad.abs().max())  # fp32, summed in another order
            torch.testing.assert_close(
                rank["grads"][name], parameter.grad, rtol=1e-5, atol=slack, msg=name
            )


def test_without_a_process_group_it_is_the_plain_loss() -> None:
    tensors, weights, query_ids, doc_ids, _ = global_batch(1, 8)
    args = (tensors[0], tensors[1], weights, 5.0)
    torch.testing.assert_close(
        distributed_gcl_loss(*args, query_ids=query_ids, doc_ids=doc_ids),
        gcl_ops.gcl_loss(*args, query_ids=query_ids, doc_ids=doc_ids),
    )
    assert gather_with_grad(tensors[0]) is tensors[0]


def simulated_ranks(monkeypatch, world: int, n_local: int, reduction: str, impl: str):
    """Every rank's ``distributed_gcl_loss`` in this process, the collectives replaced by what
    they return (the other ranks' documents, ids and partial column statistics, computed from
    the same leaves, so gradients flow to their owners as the collectives' backward sends them).
    Returns the ranks' losses and, per leaf, the sum over ranks of its gradient (what DDP's
    all-reduce adds up before dividing by ``W``), on the CPU. The Triton path runs on
    ``DEVICE`` (the interpreter without a GPU)."""
    tensors, weights, query_ids, doc_ids, upstream = global_batch(world, n_local)
    dtype, device = (torch.float32, DEVICE) if impl == "triton" else (torch.float64, "cpu")
    weights, query_ids, doc_ids, upstream = (
        x.to(device) for x in (weights, query_ids, doc_ids, upstream)
    )
    rows = [slice(r * n_local, (r + 1) * n_local) for r in range(world)]
    queries = [tensors[0][s].to(device, dtype).requires_grad_() for s in rows]
    docs = [tensors[1][s].to(device, dtype).requires_grad_() for s in rows]
    scale = torch.tensor(7.0, dtype=torch.float64, device=device, requires_grad=True)
    qid_parts, did_parts = [query_ids[s] for s in rows], [doc_ids[s] for s in rows]
    all_docs = torch.cat(docs)
    partials = [
        gcl_stats(
            queries[r],
            all_docs,
            scale,
            query_ids=query_ids,
            doc_ids=doc_ids,
            offset=r * n_local,
            impl=impl,
        )[1]  # fmt: skip
        for r in range(world)
    ]
    current = {"rank": 0}

    def gather_with_grad(x, group=None):
        r = current["rank"]
        if x is docs[r]:
            return torch.cat([x if i == r else docs[i] for i in range(world)])
        return torch.stack([x[0] if i == r else partials[i] for i in range(world)])

    def gather_no_grad(x, group=None):
        r = current["rank"]
        if x is qid_parts[r]:
            return query_ids
        if x is did_parts[r]:
            return doc_ids
        return torch.cat([x] * world)

    monkeypatch.setattr(distributed, "world_size", lambda group=None: world)
    monkeypatch.setattr(distributed, "rank", lambda group=None: current["rank"])
    monkeypatch.setattr(distributed, "gather_with_grad", gather_with_grad)
    monkeypatch.setattr(distributed, "gather_no_grad", gather_no_grad)
    losses, total = [], 0.0
    for r in range(world):
        current["rank"] = r
        loss = distributed_gcl_loss(
            queries[r], docs[r], weights[rows[r]].to(dtype), scale, query_ids=qid_parts[r],
            doc_ids=did_parts[r], reduction=reduction, impl=impl,
        )  # fmt: skip
        losses.append(loss.detach())
        total = (
            total + (loss * upstream[rows[r]].to(loss.dtype)).sum()
            if reduction == "none"
            else total + loss
        )
    leaves = [*queries, *docs, scale]
    grads = [g.cpu() for g in torch.autograd.grad(total, leaves)]
    losses = [loss.cpu() for loss in losses]
    return losses, [torch.cat(grads[:world]), torch.cat(grads[world : 2 * world])], grads[-1]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_world_size_scaling_fast(monkeypatch, world: int, reduction: str) -> None:
    # In one process: the mean of the ranks' values is the single-process loss and each rank's
    # gradients are W times its share (so DDP's average gives the single-process gradients);
    # "none" returns the unscaled per-pair slices.
    losses, grads, scale_grad = simulated_ranks(monkeypatch, world, 4, reduction, "torch")
    want_loss, want_grads, want_scale = single_process(world, 4, 2, reduction, "torch")
    if reduction == "none":
        torch.testing.assert_close(torch.cat(losses), want_loss, rtol=1e-10, atol=1e-12)
        divide = 1.0
    else:
        torch.testing.assert_close(torch.stack(losses).mean(), want_loss, rtol=1e-10, atol=1e-12)
        divide = world
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got / divide, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scale_grad / divide, want_scale, rtol=1e-9, atol=1e-12)


def test_world_size_scaling_fast_triton(monkeypatch) -> None:
    # The same through the rectangular kernels with offsets (interpreter without a GPU).
    losses, grads, scale_grad = simulated_ranks(monkeypatch, 2, 9, "mean", "triton")
    want_loss, want_grads, want_scale = single_process(2, 9, 2, "mean", "torch")
    torch.testing.assert_close(torch.stack(losses).mean().double(), want_loss, rtol=1e-5, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double() / 2, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale_grad / 2, want_scale, rtol=1e-4, atol=1e-6)
