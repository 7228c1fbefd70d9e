"""On a GPU (skipped without CUDA): large shapes against the blocked PyTorch path on the same GPU
in fp32 (the naive loss does not fit at these sizes), both backward strategies, the precision
settings, CUDA graph capture, and a measurement of how far the backward's recomputed cosines
(the other tile orientation) are from the forward's."""

from __future__ import annotations

import math

import pytest
import torch

import gcl_ops
from gcl_ops import launchers, tiling
from gcl_ops._triton import tl, triton
from gcl_ops.kernels.tiles import _cosine_tile

pytestmark = pytest.mark.gpu

TOLERANCES = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _batch(n: int, k: int, m: int | None = None, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    m = n if m is None else m
    doc = torch.randn(m, k, device="cuda", generator=generator)
    query = 0.5 * doc[:n] + torch.randn(n, k, device="cuda", generator=generator)
    weights = torch.rand(n, device="cuda", generator=generator) * 10
    ids = torch.randint(0, n // 2, (n,), device="cuda", generator=generator)
    return query, doc, weights, ids


def _loss_and_grads(query, doc, weights, ids, dtype, impl):
    q = query.to(dtype).requires_grad_()
    d = doc.to(dtype).requires_grad_()
    scale = torch.tensor(50.0, device="cuda", requires_grad=True)
    loss = gcl_ops.gcl_loss(q, d, weights, scale, query_ids=ids, impl=impl)
    return [loss.detach().float(), *(g.float() for g in torch.autograd.grad(loss, (q, d, scale)))]


@pytest.mark.parametrize("n", [4096, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", tiling.STRATEGIES)
def test_large_batches_match_the_pytorch_path(n, dtype, strategy, monkeypatch,
                                              restore_matmul_precision) -> None:  # fmt: skip
    monkeypatch.setenv("GCL_OPS_BACKWARD", strategy)
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # (IEEE fp32 is tested below)
    query, doc, weights, ids = _batch(n, 512)
    # The reference sees the same rounded inputs, in fp32.
    want = _loss_and_grads(query.to(dtype).float(), doc.to(dtype).float(), weights, ids,
                           torch.float32, "torch")  # fmt: skip
    got = _loss_and_grads(query, doc, weights, ids, dtype, "triton")
    for name, g, w in zip(("loss", "query", "doc", "scale"), got, want):
        error = float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert error < TOLERANCES[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", tiling.STRATEGIES)
def test_hard_negatives_match_the_pytorch_path(dtype, strategy, monkeypatch,
                                               restore_matmul_precision) -> None:  # fmt: skip
    # 4096 pairs and 7 hard negatives per row (28,672 more columns), some of them false
    # negatives by id: the rectangular kernels against the PyTorch path on the same inputs.
    monkeypatch.setenv("GCL_OPS_BACKWARD", strategy)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    n, h = 4096, 7
    query, columns, weights, _ = _batch(n, 256, m=n * (1 + h))
    doc, negatives = columns[:n], columns[n:]
    doc_ids = torch.arange(n, device="cuda")
    negative_ids = torch.randint(0, 8 * n, (n * h,), device="cuda")

    def loss_and_grads(impl: str, as_dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [x.to(as_dtype).requires_grad_() for x in (query, doc, negatives)]
        scale = torch.tensor(30.0, device="cuda", requires_grad=True)
        loss = gcl_ops.gcl_loss(
            leaves[0], leaves[1], weights, scale, doc_ids=doc_ids, negatives=leaves[2],
            negative_ids=negative_ids, reduction="weighted_mean", impl=impl,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, (*leaves, scale))
        return [loss.detach().float(), *(g.float() for g in grads)]

    rounded = [x.to(dtype).float() for x in (query, doc, negatives)]
    query, doc, negatives = rounded
    want = loss_and_grads("torch", torch.float32)
    got = loss_and_grads("triton", dtype)
    for name, g, w in zip(("loss", "query", "doc", "negatives", "scale"), got, want):
        error = float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert error < TOLERANCES[dtype], f"{name}: relative error {error:.2e}"


def test_offsets_beyond_int32() -> None:
    # 2^21 + 5 columns of width 1024: column offsets pass 2^31 elements.
    n, m, k = 64, 2**21 + 5, 1024
    generator = torch.Generator(device="cuda").manual_seed(1)
    doc = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=generator)
    query = doc[m - n :] + 0.5 * torch.randn(
        n, k, device="cuda", dtype=torch.bfloat16, generator=generator
    )
    got = gcl_ops.contrastive.gcl_stats(query, doc, 20.0, offset=m - n, impl="triton")
    want = gcl_ops.contrastive.gcl_stats(
        query.float(), doc.float(), 20.0, offset=m - n, impl="torch"
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_fp32_matmul_precision_setting(precision: str) -> None:
    query, doc, weights, ids = _batch(2048, 256, seed=2)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = _loss_and_grads(query, doc, weights, ids, torch.float32, "triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    want = _loss_and_grads(
        query.double(), doc.double(), weights.double(), ids, torch.float64, "torch"
    )
    tolerance = 2e-5 if precision == "highest" else 5e-3  # TF32 keeps 10 mantissa bits
    for g, w in zip(got, want):
        error = float((g.double() - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert error < tolerance


def test_triton_is_the_default_on_cuda(restore_matmul_precision) -> None:
    query, doc, weights, ids = _batch(256, 64)
    assert gcl_ops.contrastive.resolve_backend("auto", query.bfloat16()) == "triton"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert gcl_ops.contrastive.resolve_backend("auto", query) == "triton"
    # IEEE fp32 would run the kernels' GEMMs on the FMA units: cuBLAS (the PyTorch path) instead,
    # and a warning where Triton is asked for explicitly.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert gcl_ops.contrastive.resolve_backend("auto", query) == "torch"
    launchers._warn_ieee_once.cache_clear()
    with pytest.warns(UserWarning, match="FMA units"):
        assert gcl_ops.contrastive.resolve_backend("triton", query) == "triton"


def test_cuda_graph_capture_and_replay() -> None:
    # The loss (with the default validate=True) and its backward captured in a CUDA graph after
    # a warm-up on a side stream, replayed on new inputs copied into the captured buffers.
    query, doc, weights, ids = _batch(2048, 256, seed=4)
    q = query.bfloat16().requires_grad_()
    d = doc.bfloat16().requires_grad_()
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
    new_query, new_doc, _, _ = _batch(2048, 256, seed=5)
    with torch.no_grad():
        q.copy_(new_query)
        d.copy_(new_doc)
    graph.replay()
    torch.cuda.synchronize()
    want = _loss_and_grads(new_query.bfloat16().float(), new_doc.bfloat16().float(), weights,
                           ids, torch.float32, "torch")  # fmt: skip
    for name, g, w in zip(("loss", "query", "doc", "scale"),
                          (loss, q.grad, d.grad, scale.grad), want):  # fmt: skip
        error = float((g.float() - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert error < TOLERANCES[torch.bfloat16], f"{name}: relative error {error:.2e}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensors_on_another_device_than_the_current_one(dtype: torch.dtype) -> None:
    # Triton launches on the current device: the kernels must switch to the tensors' (cuda:1).
    generator = torch.Generator().manual_seed(3)
    query, doc = (torch.randn(300, 64, generator=generator) for _ in range(2))
    weights = torch.rand(300, generator=generator)
    want = _loss_and_grads_on(query, doc, weights, torch.float64, "cpu", "torch")
    torch.cuda.set_device(0)
    got = _loss_and_grads_on(query, doc, weights, dtype, "cuda:1", "triton")
    assert torch.cuda.current_device() == 0
    logits = (query @ doc.T).to("cuda:1", dtype).requires_grad_()
    loss = gcl_ops.gcl_loss_from_logits(logits, weights.to("cuda:1"), impl="triton")
    loss.backward()
    reference = gcl_ops.gcl_loss_from_logits((query @ doc.T).double(), weights.double())
    torch.testing.assert_close(loss.double().cpu(), reference, rtol=1e-2, atol=1e-3)
    for name, g, w in zip(("loss", "query", "doc", "scale"), got, want):
        error = float((g.double().cpu() - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert error < TOLERANCES[dtype], f"{name}: relative error {error:.2e}"


def _loss_and_grads_on(query, doc, weights, dtype, device, impl):
    q = query.to(device, dtype).requires_grad_()
    d = doc.to(device, dtype).requires_grad_()
    scale = torch.tensor(30.0, device=device, dtype=torch.float64 if dtype == torch.float64
                         else torch.float32, requires_grad=True)  # fmt: skip
    loss = gcl_ops.gcl_loss(q, d, weights.to(device, dtype), scale, impl=impl)
    return [loss.detach(), *torch.autograd.grad(loss, (q, d, scale))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_terms_flushed_to_zero_on_the_gpu_are_recomputed(dtype: torch.dtype) -> None:
    # On the GPU tl.exp2 is ex2.approx.ftz: results below fp32's smallest normal (e^-87.3) come
    # out 0 where the interpreter keeps them. At t = 100 the fixed shift is 36; a query at cosine
    # -0.6 from every document has Z - shift = -96 for each negative (e^-96 = 2e-42, subnormal),
    # so its shifted row sum flushes to 0 on the GPU and must be recomputed with an online
    # maximum. The other rows keep ordinary sums; every statistic must match float64.
    n, k = 300, 16
    generator = torch.Generator(device="cuda").manual_seed(3)
    axis = torch.zeros(k, device="cuda")
    axis[0] = 1.0
    doc = axis + 0.01 * torch.randn(n, k, device="cuda", generator=generator)
    query = doc + 0.01 * torch.randn(n, k, device="cuda", generator=generator)
    far = torch.zeros(k, device="cuda")
    far[0], far[1] = -0.6, 0.8
    query[:7] = far + 0.001 * torch.randn(7, k, device="cuda", generator=generator)
    query, doc = query.to(dtype), doc.to(dtype)
    got = gcl_ops.contrastive.gcl_stats(query, doc, 100.0, impl="triton")
    q64 = torch.nn.functional.normalize(query.double(), dim=-1)
    d64 = torch.nn.functional.normalize(doc.double(), dim=-1)
    z = 100.0 * q64 @ d64.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device="cuda")
    masked = z.masked_fill(~off_diagonal, float("-inf"))
    want = (masked.logsumexp(1), masked.logsumexp(0), z.diagonal())
    assert float(want[0][:7].max()) < 36.0 - 87.3 + 8  # those rows' terms are subnormal indeed
    for name, g, w in zip(("neg_row", "neg_col", "pos"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-3, msg=name)


@triton.jit
def _cosines(rows_ptr, cols_ptr, inv_rows_ptr, inv_cols_ptr, out_ptr, k,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """One ``BLOCK_M x BLOCK_N`` tile of ``S`` as every kernel forms it (``_cosine_tile``)."""
    rows, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    cosines = _cosine_tile(
        rows_ptr, cols_ptr, rows, cols, tl.load(inv_rows_ptr + rows), tl.load(inv_cols_ptr + cols),
        k, 1, k, 1, BLOCK_M, BLOCK_N, k, BLOCK_M, BLOCK_N, BLOCK_K, NORMALIZE, INPUT_PRECISION,
        False,
    )  # fmt: skip
    tl.store(out_ptr + rows[:, None] * BLOCK_N + cols[None, :], cosines)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize(("k", "dtype", "tf32"),
                         [(512, torch.bfloat16, False), (128, torch.float16, False),
                          (256, torch.float32, True)], ids=["bf16", "fp16", "tf32"])  # fmt: skip
def test_recomputed_cosines_are_within_two_ulps_of_the_forwards(k, dtype, tf32, normalize) -> None:
    # A measurement: the forward forms S = Q D^T (queries on the GEMM's M side) in its tiles;
    # the backward's documents launch forms S^T = D Q^T in its own. Correctness does not rest on
    # their being equal bitwise (docs/CONTRACT.md: a difference delta costs a relative t delta
    # in P); the bound used there is two ulps. The difference found is printed.
    arch = tiling.architecture(torch.device("cuda"))
    precision = tiling.precision_class(dtype, tf32)
    forward = tiling.forward_tiles(arch, precision, k)
    backward = tiling.backward_tiles(arch, precision, k, "split")
    n, m = forward["BLOCK_M"], forward["BLOCK_N"]
    query, doc, _, _ = _batch(n, k, m, seed=k)
    query, doc = query.to(dtype).contiguous(), doc.to(dtype).contiguous()
    inv_query, inv_doc = 1.0 / query.float().norm(dim=1), 1.0 / doc.float().norm(dim=1)
    precision_flag = "tf32" if tf32 else "ieee"
    sliced = torch.empty(n, m, device="cuda")
    _cosines[(1,)](query, doc, inv_query, inv_doc, sliced, k, n, m, forward["BLOCK_K"],
                   normalize, precision_flag, num_warps=forward["num_warps"])  # fmt: skip
    own, other = backward["BLOCK_OWN"], backward["BLOCK_OTHER"]
    transposed = torch.empty(own, other, device="cuda")
    _cosines[(1,)](doc, query, inv_doc, inv_query, transposed, k, own, other, backward["BLOCK_K"],
                   normalize, precision_flag, num_warps=backward["num_warps"])  # fmt: skip
    a, b = sliced[:other, :own], transposed.T
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(float(a.abs().max())))
    ulps = (a - b).abs().max() / ulp  # in ulps of the tile's largest |S|
    print(f"S^T vs S, {dtype} k={k} normalize={normalize}: {int((a != b).sum())} of {a.numel()} "
          f"entries differ, at most {float(ulps):.1f} ulps")  # fmt: skip
    assert float(ulps) <= 2.0
