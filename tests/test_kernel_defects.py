"""Regression tests for the kernel defects of issue 9 (sections 1 and 2): the TF32 setting's
newer API, fp16 gradients that underflow, the recomputation threshold under flushed denormals,
int64 tile origins of a transposed logits matrix, and frozen towers. Without a GPU the Triton kernels
run under the interpreter (conftest.py); every comparison is against float64."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from params import DEVICE, IMPLS
from test_stats import MARGINS, make_problem

import gcl_ops
from gcl_ops import contrastive, ops
from gcl_ops._triton import triton
from gcl_ops.reference import naive_gcl_stats

# ------------------------------------------------------------------------------------------
# The fp32 matmul setting: torch.backends.cuda.matmul.fp32_precision comes first.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_newer_fp32_precision_api(impl, restore_matmul_precision) -> None:
    x = torch.zeros(2, 2)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):  # what the flags used to call
        torch.get_float32_matmul_precision()
    assert ops._kernel_flags(x)["INPUT_PRECISION"] == "tf32"
    # The loss and its gradients run under the newer setting.
    query, doc, _ = make_problem(20, 20, 16, 0, with_ids=False, seed=3)
    query = query.float().to(DEVICE).requires_grad_()
    loss = gcl_ops.gcl_loss(query, doc.float().to(DEVICE), logit_scale=20.0, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all()
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert ops._kernel_flags(x)["INPUT_PRECISION"] == "ieee"
    # "none" defers to the legacy setting.
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    for legacy, expected in (("highest", "ieee"), ("high", "tf32")):
        torch.set_float32_matmul_precision(legacy)
        assert ops._kernel_flags(x)["INPUT_PRECISION"] == expected


def test_autocast_runs_fp32_gemms_in_tf32(restore_matmul_precision, monkeypatch) -> None:
    # Under autocast the Triton path's fp32 GEMMs (forward, recomputation, backward) use TF32
    # unless the newer setting says "ieee"; outside autocast the user's setting decides
    # (legacy "highest" here: IEEE). Each run's launches carry the precision they were given.
    monkeypatch.setenv("GCL_OPS_AUTOTUNE", "0")  # (launches through the recorded kernels)
    kernels = {name: _CountingKernel(getattr(ops, name))
               for name in ("_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel")}  # fmt: skip
    for name, counter in kernels.items():
        monkeypatch.setattr(ops, name, counter)
    query, doc, ids = make_problem(24, 24, 16, 0, with_ids=True, seed=9)
    weights = torch.rand(24, dtype=torch.float64).float().to(DEVICE)
    # PyTorch's defaults: the newer setting "none" (deferring), the legacy one "highest" (set
    # first: setting it also sets the newer one, to "ieee").
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"

    def run(autocast: bool) -> tuple[set, list[torch.Tensor]]:
        for counter in kernels.values():
            counter.launches.clear()
        q, d = query.float().to(DEVICE).requires_grad_(), doc.float().to(DEVICE).requires_grad_()
        scale = torch.tensor(30.0, device=DEVICE, requires_grad=True)
        ids_here = {name: value.to(DEVICE) for name, value in ids.items()}
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = gcl_ops.gcl_loss(q, d, weights, scale, impl="triton", **ids_here)
            grads = torch.autograd.grad(loss, (q, d, scale))
        launched = [kwargs for counter in kernels.values() for kwargs in counter.launches]
        assert {"_stats_fwd_kernel", "_stats_bwd_kernel"} <= {
            name for name, counter in kernels.items() if counter.launches
        }  # fmt: skip
        return {kwargs["INPUT_PRECISION"] for kwargs in launched}, [loss, *grads]

    ieee_precision, ieee = run(autocast=False)
    assert ieee_precision == {"ieee"}
    autocast_precision, under_autocast = run(autocast=True)
    assert autocast_precision == {"tf32"}
    # The same numbers as TF32 asked for outside autocast (to the atomics' last bits on a GPU).
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    tf32_precision, tf32 = run(autocast=False)
    assert tf32_precision == {"tf32"}
    for got, want in zip(under_autocast, tf32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # An explicit "ieee" is kept under autocast too.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    kept_precision, kept = run(autocast=True)
    assert kept_precision == {"ieee"}
    for got, want in zip(kept, ieee):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# fp16 backward: dS is rescaled per row before its cast to fp16.
# ------------------------------------------------------------------------------------------


def _stats_gradients(query, doc, scale, upstream, impl, dtype):
    """``(d query, d doc)`` of ``sum_s <upstream_s, stat_s>`` over the statistics, as float64."""
    q = query.detach().to(device=DEVICE, dtype=dtype).requires_grad_()
    d = doc.detach().to(device=DEVICE, dtype=dtype).requires_grad_()
    if impl == "naive":
        stats = naive_gcl_stats(q, d, scale)
    else:
        stats = contrastive.gcl_stats(q, d, scale, impl=impl)
    total = sum((u.to(DEVICE, s.dtype) * s).sum() for u, s in zip(upstream, stats))
    return [g.double().cpu() for g in torch.autograd.grad(total, (q, d))]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def test_fp16_gradients_with_a_loss_scale() -> None:
    # As under a GradScaler: the upstream gradient times 2^16, the gradients divided by 2^16
    # afterwards, against float64 on the same fp16-rounded inputs.
    generator = torch.Generator().manual_seed(0)
    n, k, loss_scale = 48, 32, 2.0**16
    query, doc, _ = make_problem(n, n, k, 0, with_ids=False, seed=7)
    query, doc = query.half().double(), doc.half().double()
    weights = torch.rand(n, generator=generator, dtype=torch.float64)

    def gradients(impl, dtype):
        q = query.detach().to(device=DEVICE, dtype=dtype).requires_grad_()
        d = doc.detach().to(device=DEVICE, dtype=dtype).requires_grad_()
        loss = gcl_ops.gcl_loss(q, d, weights.to(DEVICE, dtype), 30.0, impl=impl)
        (loss * loss_scale).backward()
        return [g.grad.double().cpu() / loss_scale for g in (q, d)]

    truth = gradients("torch", torch.float64)
    for got, want in zip(gradients("triton", torch.float16), truth):
        assert _relative_error(got, want) < 2e-3


def test_fp16_gradient_terms_below_the_fp16_range() -> None:
    # Documents of norm 2^14.5 (normalised away): dS_ij = t dZ_ij / |d_j| ~ 1e-8 sits below fp16's
    # smallest subnormal (6e-8) and flushed to 0 in the cast before the rescaling, while the
    # query gradient t sum_j dZ_ij d^_j ~ 1e-3 is a normal fp16 number.
    generator = torch.Generator().manual_seed(1)
    n, k = 40, 32
    query, doc, _ = make_problem(n, n, k, 0, with_ids=False, seed=11)
    query = query / query.norm(dim=1, keepdim=True)
    doc = 2.0**15 * doc / doc.norm(dim=1, keepdim=True) / math.sqrt(2)
    query, doc = query.half().double(), doc.half().double()
    upstream = [2e-3 * torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(3)]
    want, _ = _stats_gradients(query, doc, 10.0, upstream, "naive", torch.float64)
    got, _ = _stats_gradients(query, doc, 10.0, upstream, "triton", torch.float16)
    assert float(want.abs().max()) > 1e-3  # far above fp16's smallest normal, 6e-5
    assert _relative_error(got, want) < 1e-2


# ------------------------------------------------------------------------------------------
# The recomputation threshold covers denormals flushed by ex2.approx.ftz.
# ------------------------------------------------------------------------------------------


def test_tiny_sum_covers_flushed_denormals() -> None:
    # The most terms a fixed-shift sum may have: each is at most e^SHIFT_HEADROOM, and the sum
    # must stay below fp32's largest number.
    fp32 = torch.finfo(torch.float32)
    max_terms = fp32.max / math.exp(contrastive.SHIFT_HEADROOM)
    assert 2**35 < max_terms < 2**36  # as the comment on SHIFT_HEADROOM says
    # Each of them may be flushed to 0 below the smallest normal (2^-126): a kept sum must be
    # large enough that all of that together is under 1e-6 of it.
    flushed_mass = max_terms * fp32.smallest_normal
    # And small enough that an ordinary sum (at least one term e^-46 = exp(Z_max - shift) when
    # the largest negative is 110 below the bound) is not recomputed.
    assert flushed_mass / 1e-6 <= contrastive.TINY_SUM <= math.exp(-46)


# ------------------------------------------------------------------------------------------
# The logits kernels: a transposed matrix (strides (1, N)); tile origins are int64.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transposed_logits(dtype) -> None:
    n = 45
    generator = torch.Generator().manual_seed(n)
    logits = 20 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    logits.diagonal().add_(15.0)
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    ids = {"query_ids": torch.randint(0, n // 3, (n,), generator=generator)}
    upstream = torch.randn(n, generator=generator, dtype=torch.float64)

    def run(impl, run_dtype, transposed):
        stored = logits.T.contiguous() if transposed else logits
        z = stored.to(device=DEVICE, dtype=run_dtype).requires_grad_()
        matrix = z.T if transposed else z  # strides (1, N): the column stride is N
        assert matrix.is_contiguous() != transposed
        loss = gcl_ops.gcl_loss_from_logits(
            matrix, weights.to(DEVICE), reduction="none", impl=impl,
            **{name: value.to(DEVICE) for name, value in ids.items()},
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, z, upstream.to(DEVICE, loss.dtype))
        grad = grad.T if transposed else grad
        return loss.detach().double().cpu(), grad.double().cpu()

    truth = run("torch", torch.float64, False)
    baseline = run("torch", dtype, True)
    got = run("triton", dtype, True)
    for g, b, t in zip(got, baseline, truth):
        allowed = 2 * float((b - t).abs().max()) + MARGINS[dtype] * max(1.0, float(t.abs().max()))
        assert float((g - t).abs().max()) <= allowed


_OFFSETS_CHECK = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gcl_ops.kernels.logits import _logits_grad_kernel, _logits_stats_kernel
for kernel in (_logits_stats_kernel, _logits_grad_kernel):
    names = list(kernel.arg_names)
    types = {n: "*fp32" for n in names if n.endswith("_ptr")}
    types.update(qid_ptr="*i64", did_ptr="*i64")
    constants = dict(BLOCK_M=64, BLOCK_N=64, HAS_QID=False, HAS_DID=False)
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
    body = ttir.split("tt.func public", 1)[1].split("\\n", 1)[1]
    for stride in (n for n in names if n.startswith("stride_")):
        uses = [line.strip() for line in body.splitlines() if re.search(rf"%{stride}\\b", line)]
        print(stride, uses)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas is Linux-only")
def test_logits_kernel_tile_origins_are_int64() -> None:
    # Compile (no GPU needed) for sm_90 and read the Triton IR: every stride is widened to i64
    # for the tile's origin (row_start stride_n + col_start stride_m, which passes 2^31 in a
    # large matrix); offsets within a tile stay int32, kept in range by _fit_int32_offsets.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _OFFSETS_CHECK], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot compile for sm_90 here: {result.stderr[-300:]}")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6, result.stdout  # stats: stride_n, stride_m; grad: and stride_g*
    for line in lines:
        uses = ast.literal_eval(line.split(" ", 1)[1])
        assert any(re.search(r"arith.extsi .* : i32 to i64", use) for use in uses), line


def test_int32_offsets_copy_only_odd_layouts() -> None:
    # Meta tensors: strides without storage. A tile spans (127 rows, 63 columns) of the logits
    # and (0 rows: int64, k - 1 columns) of an embedding matrix.
    def strided(size, stride):
        return torch.empty_strided(size, stride, device="meta")

    fit = ops._fit_int32_offsets
    dense = strided((50_000, 50_000), (50_000, 1))
    assert fit(dense, 128, 64) is dense  # 127 * 50,000 + 63: a contiguous matrix never copies
    transposed = strided((50_000, 50_000), (1, 50_000))
    assert fit(transposed, 128, 64) is transposed  # the origin is int64; within a tile, 3.2e6
    wide_rows = strided((64, 64), (2**25, 1))  # rows 2^25 elements apart: 127 * 2^25 > 2^31
    assert fit(wide_rows, 128, 64).is_contiguous()
    k_major = strided((2**22, 1024), (1, 2**22))  # an (N, k) view of a (k, N) matrix
    assert fit(k_major, 0, 1024).is_contiguous()  # (k - 1) N passes 2^31
    assert fit(strided((2**22, 1024), (1024, 1)), 0, 1024).stride() == (1024, 1)


# ------------------------------------------------------------------------------------------
# Frozen towers: no gradient pass for an input that does not need one.
# ------------------------------------------------------------------------------------------


class _CountingKernel:
    """Stands in for a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frozen", ["doc", "query"])
def test_frozen_tower_gets_no_gradient_pass(impl, frozen, monkeypatch) -> None:
    monkeypatch.setenv("GCL_OPS_AUTOTUNE", "0")  # (on a GPU the autotuner launches its own)
    counter = _CountingKernel(ops._stats_bwd_kernel)
    monkeypatch.setattr(ops, "_stats_bwd_kernel", counter)
    query, doc, ids = make_problem(30, 30, 24, 0, with_ids=True, seed=5)
    weights = torch.rand(30, dtype=torch.float64)

    def gradients(trainable: tuple[bool, bool]):
        q = query.float().to(DEVICE).requires_grad_(trainable[0])
        d = doc.float().to(DEVICE).requires_grad_(trainable[1])
        scale = torch.tensor(15.0, device=DEVICE, requires_grad=True)
        ids_here = {name: value.to(DEVICE) for name, value in ids.items()}
        loss = gcl_ops.gcl_loss(q, d, weights.float().to(DEVICE), scale, impl=impl, **ids_here)
        loss.backward()
        return q.grad, d.grad, scale.grad

    both = gradients((True, True))
    launches_both = list(counter.launches)
    counter.launches.clear()
    one = gradients((frozen == "doc", frozen == "query"))
    trained = 0 if frozen == "doc" else 1
    assert one[1 - trained] is None
    torch.testing.assert_close(one[trained], both[trained], rtol=0, atol=0)
    torch.testing.assert_close(one[2], both[2], rtol=1e-6, atol=1e-7)  # d scale still there
    if impl == "triton":  # one fused launch each time, the frozen side's GEMM switched off
        assert len(launches_both) == 1 and len(counter.launches) == 1
        assert launches_both[0]["NEED_QUERY"] and launches_both[0]["NEED_DOC"]
        launch = counter.launches[0]
        assert launch["SCALE_GRAD"]
        assert (launch["NEED_QUERY"], launch["NEED_DOC"]) == (frozen == "doc", frozen == "query")


# ------------------------------------------------------------------------------------------
# d logit_scale at large logits: the backward's P = exp(Z - lse) without fp32 roundings of Z
# or lse at |Z| ~ 300 (each up to 1.5e-5, summed t-fold into d t).
# ------------------------------------------------------------------------------------------


def test_scale_gradient_at_large_logits() -> None:
    # The example hypothesis found: max |Z| = 316, normalised, k = 2; d t was 8.6e-5 off
    # against 2.0e-6 for a naive fp32 computation (allowed 8.4e-5), 6.6e-6 since.
    from test_stats import check_against_definition

    query, doc, ids = make_problem(14, 33, 2, 0, with_ids=False, seed=1)
    check_against_definition("triton", query, doc, 316.0, torch.float32, offset=0, **ids)


# ------------------------------------------------------------------------------------------
# Autotuning large problems: the candidates are timed on the leading block, once per key.
# ------------------------------------------------------------------------------------------


class _RecordingAutotuner:
    """Stands in for ``triton.autotune`` of a kernel (the interpreter times nothing): records the
    problem size of each launch and launches the default tiles, or ``tiles`` as its choice
    (``best_config``, as triton's autotuner keeps it)."""

    def __init__(self, which: str, calls: list, tiles: dict | None = None):
        backward = which == "backward"
        self.kernel = ops._stats_bwd_kernel if backward else ops._stats_fwd_kernel
        self.which, self.calls, self.backward, self.tiles = which, calls, backward, tiles
        self.best_config = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            self.calls.append((self.which, named["n_rows"], named["n_cols"]))
            tiles = self.tiles or ops._tile_sizes(ops._k_pad(named["k"]), 4, self.backward)
            options = {name: tiles[name] for name in ("num_warps", "num_stages") if name in tiles}
            self.best_config = triton.Config(
                {name: v for name, v in tiles.items() if name not in options}, **options
            )
            return self.kernel[grid](*args, **kwargs, **tiles)

        return launch


@pytest.mark.skipif(DEVICE != "cpu", reason="replaces the autotuner, as on the interpreter")
def test_large_problems_are_tuned_on_their_leading_block(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(ops, "_autotuning", lambda: True)
    monkeypatch.setattr(ops, "_autotuned", lambda which: _RecordingAutotuner(which, calls))
    monkeypatch.setattr(ops, "_TUNE_ENTRIES", 1600)  # 30 x 90 = 2700 entries: a "large" problem
    monkeypatch.setattr(ops, "_TUNED_ON_LEADING_BLOCK", set())
    query, doc, ids = make_problem(30, 90, 24, 41, with_ids=True, seed=2)
    scale = torch.tensor(20.0, dtype=torch.float64)

    def stats_and_grads(impl: str):
        q, d = query.float().requires_grad_(), doc.float().requires_grad_()
        t = scale.float().requires_grad_()
        stats = gcl_ops.contrastive.gcl_stats(q, d, t, offset=41, impl=impl, **ids)
        upstream = torch.linspace(-1.0, 1.0, 150)
        loss = (torch.cat(stats) * upstream).sum()
        return [*stats, *torch.autograd.grad(loss, (q, d, t))]

    got = stats_and_grads("triton")
    # The leading block (30 rows x 1600 // 30 = 53 columns) first, then the problem itself.
    assert calls == [("forward", 30, 53), ("forward", 30, 90),
                     ("backward", 30, 53), ("backward", 30, 90)]  # fmt: skip
    calls.clear()
    again = stats_and_grads("triton")
    assert calls == [("forward", 30, 90), ("backward", 30, 90)]  # tuned once per key
    want = stats_and_grads("torch")
    for g, a, w in zip(got, again, want):
        torch.testing.assert_close(g, a, rtol=0, atol=0)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # The backward called without the forward's parts (they are then derived from neg_row,
    # neg_col) tunes on the leading block too, and agrees with the call that has them.
    calls.clear()
    monkeypatch.setattr(ops, "_TUNED_ON_LEADING_BLOCK", set())
    q, d, t = query.float(), doc.float(), scale.float()
    neg_row, neg_col, pos, row_parts, col_parts = ops._triton_stats_forward(q, d, t, **ids,
                                                                            offset=41, normalize=True)  # fmt: skip
    upstream = [torch.linspace(-1.0, 1.0, len(x)) for x in (neg_row, neg_col, pos)]
    arguments = (q, d, t, ids["query_ids"], ids["doc_ids"], neg_row, neg_col, *upstream, 41, True)
    without_parts = ops._triton_stats_backward(*arguments)
    assert calls[-2:] == [("backward", 30, 53), ("backward", 30, 90)]
    with_parts = ops._triton_stats_backward(*arguments, row_parts=row_parts, col_parts=col_parts)
    for a, b in zip(without_parts, with_parts):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="replaces the autotuner, as on the interpreter")
def test_launches_during_graph_capture_reuse_the_autotuners_tiles(monkeypatch) -> None:
    # Nothing is timed while a CUDA graph is captured; the launches then take the tiles the
    # autotuner chose for the same problem before (the warm-up steps), whose kernel is compiled
    # and loaded already, not the defaults, which would compile inside the capture.
    chosen = {
        "forward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
        "backward": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, K_SLICE=16, RESIDENT=False,
                         num_warps=4, num_stages=2),
    }  # fmt: skip
    autotuners = {which: _RecordingAutotuner(which, [], tiles) for which, tiles in chosen.items()}
    launches = {"forward": _CountingKernel(ops._stats_fwd_kernel),
                "backward": _CountingKernel(ops._stats_bwd_kernel)}  # fmt: skip
    monkeypatch.setattr(ops, "_stats_fwd_kernel", launches["forward"])
    monkeypatch.setattr(ops, "_stats_bwd_kernel", launches["backward"])
    monkeypatch.setattr(ops, "_autotuned", autotuners.__getitem__)
    monkeypatch.setattr(ops, "_CHOSEN_TILES", {})
    query, doc, ids = make_problem(30, 45, 24, 7, with_ids=True, seed=4)

    def stats_and_grads():
        q, d = query.float().requires_grad_(), doc.float().requires_grad_()
        t = torch.tensor(20.0, requires_grad=True)
        stats = gcl_ops.contrastive.gcl_stats(q, d, t, offset=7, impl="triton", **ids)
        loss = (torch.cat(stats) * torch.linspace(-1.0, 1.0, 105)).sum()
        return [*stats, *torch.autograd.grad(loss, (q, d, t))]

    monkeypatch.setattr(ops, "_autotuning", lambda: True)
    tuned = stats_and_grads()  # the warm-up: the autotuner chooses
    assert all(not counter.launches for counter in launches.values())
    monkeypatch.setattr(ops, "_autotuning", lambda: False)
    for capturing in (True, False):
        monkeypatch.setattr(ops, "_capturing", lambda capturing=capturing: capturing)
        got = stats_and_grads()
        for which, counter in launches.items():
            (launch,) = counter.launches
            counter.launches.clear()
            k_pad = ops._k_pad(24)
            want = chosen[which] if capturing else ops._tile_sizes(k_pad, 4, which == "backward")
            assert {name: launch[name] for name in want} == want, (which, capturing)
        if capturing:  # the same tiles as the warm-up: the same arithmetic
            for g, w in zip(got, tuned):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
