"""Regression tests of kernel defects: the TF32 setting's newer API and autocast, fp16 gradients
that underflow, the recomputation threshold under flushed denormals, int64 tile origins of a
transposed logits matrix, frozen towers, k padded to a multiple of 16, value checks under CUDA
graph capture, opt-in autotuning. Without a GPU the Triton kernels run under the interpreter
(conftest.py); every comparison is against float64."""

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
from gcl_ops import _checks, contrastive, launchers, tiling
from gcl_ops.reference import naive_gcl_stats

# ------------------------------------------------------------------------------------------
# The fp32 matmul setting: torch.backends.cuda.matmul.fp32_precision comes first.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_newer_fp32_precision_api(impl, restore_matmul_precision) -> None:
    x = torch.zeros(2, 2)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):  # (the legacy getter refuses once the newer one is set)
        torch.get_float32_matmul_precision()
    assert launchers.allow_tf32()
    # The loss and its gradients run under the newer setting.
    query, doc, _ = make_problem(20, 20, 16, 0, with_ids=False, seed=3)
    query = query.float().to(DEVICE).requires_grad_()
    loss = gcl_ops.gcl_loss(query, doc.float().to(DEVICE), logit_scale=20.0, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all()
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not launchers.allow_tf32()
    # "none" defers to the legacy setting.
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    for legacy, expected in (("highest", "ieee"), ("high", "tf32")):
        torch.set_float32_matmul_precision(legacy)
        assert launchers.kernel_flags(x, launchers.allow_tf32())["INPUT_PRECISION"] == expected


def test_autocast_runs_fp32_gemms_in_tf32(restore_matmul_precision, monkeypatch) -> None:
    # Under autocast the Triton path's fp32 GEMMs (forward, recomputation, backward) use TF32
    # unless the newer setting says "ieee"; outside autocast the user's setting decides
    # (legacy "highest" here: IEEE). Each run's launches carry the precision they were given.
    kernels = {name: _CountingKernel(getattr(launchers, name))
               for name in ("_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel")}  # fmt: skip
    for name, counter in kernels.items():
        monkeypatch.setattr(launchers, name, counter)
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

    fit = launchers._fit_int32_offsets
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
@pytest.mark.parametrize("strategy", tiling.STRATEGIES)
def test_frozen_tower_gets_no_gradient_pass(
    impl, strategy, frozen, monkeypatch, restore_matmul_precision
) -> None:
    monkeypatch.setenv("GCL_OPS_BACKWARD", strategy)
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # (IEEE fp32 runs the split backward only)
    counter = _CountingKernel(launchers._stats_bwd_kernel)
    monkeypatch.setattr(launchers, "_stats_bwd_kernel", counter)
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
    torch.testing.assert_close(one[trained], both[trained], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(one[2], both[2], rtol=1e-6, atol=1e-7)  # d scale still there
    if impl == "triton":  # both: one launch per side (split) or one with atomics; one side: one
        assert len(launches_both) == (2 if strategy == "split" else 1)
        assert [launch["OTHER_GRAD"] for launch in launches_both] == (
            [False, False] if strategy == "split" else [True]
        )
        (launch,) = counter.launches
        assert launch["SCALE_GRAD"] and not launch["OTHER_GRAD"]


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
# Autotuning is opt-in; value checks stay out of CUDA graph capture; k padded to 16.
# ------------------------------------------------------------------------------------------


def test_autotuning_is_opt_in(monkeypatch) -> None:
    monkeypatch.setattr(tiling, "INTERPRETING", False)  # (as on a GPU)
    monkeypatch.delenv("GCL_OPS_AUTOTUNE", raising=False)
    assert not tiling.autotuning()
    monkeypatch.setenv("GCL_OPS_AUTOTUNE", "1")
    assert tiling.autotuning()
    tiles = tiling.forward_tiles("sm90", "half", 512)
    configs = tiling.candidates(tiles)
    assert configs[0] == tiles and {c["num_stages"] for c in configs} == {2, 3, 4}


class _RecordingAutotuner:
    """Stands in for ``triton.autotune`` (the interpreter times nothing): records the
    configurations and keys it was built with, launches the first configuration."""

    built: list = []

    def __init__(self, configs, key, reset_to_zero):
        self.configs, self.key, self.reset_to_zero = configs, key, reset_to_zero
        _RecordingAutotuner.built.append(self)

    def __call__(self, kernel):
        self.kernel = kernel
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            config = self.configs[0]
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            return self.kernel[grid](*args, **kwargs, **config.kwargs, **options)

        return launch


@pytest.mark.skipif(DEVICE != "cpu", reason="replaces the autotuner, as on the interpreter")
def test_autotuned_launches_zero_only_real_outputs(monkeypatch) -> None:
    # With GCL_OPS_AUTOTUNE=1 each kernel goes through triton.autotune over the candidates of
    # its default tiles; the outputs it zeroes between timed runs are the ones the kernel adds
    # to, never a placeholder that holds an input (such as the backward's scalars).
    monkeypatch.setattr(tiling, "autotuning", lambda: True)
    monkeypatch.setattr(launchers.triton, "autotune", _RecordingAutotuner)
    launchers._autotuner.cache_clear()
    _RecordingAutotuner.built.clear()
    query, doc, ids = make_problem(30, 45, 24, 7, with_ids=True, seed=4)
    q, d = query.float().requires_grad_(), doc.float().requires_grad_()
    t = torch.tensor(20.0, requires_grad=True)
    stats = contrastive.gcl_stats(q, d, t, offset=7, impl="triton", **ids)
    (torch.cat(stats) * torch.linspace(-1.0, 1.0, 105)).sum().backward()
    want = contrastive.gcl_stats(query, doc, 20.0, offset=7, impl="torch", **ids)
    for got, expected in zip(stats, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    zeroed = sorted(tuple(tuner.reset_to_zero) for tuner in _RecordingAutotuner.built)
    assert zeroed == [("grad_own_ptr",), ("grad_own_ptr", "scale_part_ptr"),
                      ("row_sum_ptr", "col_sum_ptr", "pos_ptr")]  # fmt: skip
    assert all(
        {c.num_stages for c in tuner.configs} >= {2, 3, 4} for tuner in _RecordingAutotuner.built
    )
    launchers._autotuner.cache_clear()


def test_value_checks_are_skipped_while_a_cuda_graph_is_captured(monkeypatch) -> None:
    # Reading values back synchronises, which CUDA refuses inside a capture
    # (tests/test_gpu.py captures and replays the loss for real).
    assert _checks.should_validate(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _checks.should_validate(True)


@pytest.mark.parametrize("k", [9, 16, 33])
def test_widths_are_padded_to_multiples_of_16(k) -> None:
    # Zero columns change neither dot products nor norms; the gradient keeps its width.
    x = torch.randn(5, k)
    padded = launchers._padded(x)
    assert padded.shape == (5, tiling.padded_width(k)) and padded.shape[1] % 16 == 0
    assert torch.equal(padded[:, :k], x) and not padded[:, k:].any()
    assert (padded is x) == (k % 16 == 0)
    query, doc, _ = make_problem(20, 20, k, 0, with_ids=False, seed=k)
    q = query.float().to(DEVICE).requires_grad_()
    loss = gcl_ops.gcl_loss(q, doc.float().to(DEVICE), logit_scale=10.0, impl="triton")
    loss.backward()
    assert q.grad.shape == (20, k) and q.grad.is_contiguous()


@pytest.mark.parametrize(
    ("capability", "name"),
    [((8, 0), "sm80"), ((8, 6), "sm89"), ((8, 9), "sm89"), ((9, 0), "sm90"), ((10, 0), "sm100"),
     ((12, 0), "sm100")],
)  # fmt: skip
def test_each_gpu_gets_its_architectures_tiles(capability, name, monkeypatch) -> None:
    # 8.6 / 8.9 (A10, L4, L40, RTX) have 99 KiB of shared memory per block, not the A100's 163:
    # resident operands must fit it.
    monkeypatch.setattr(tiling, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert tiling.architecture(torch.device("cuda")) == name
    for k in (64, 512, 1024):
        for precision in ("half", "tf32"):
            tiles = tiling.forward_tiles(name, precision, k)
            if tiles["RESIDENT"]:
                element = 2 if precision == "half" else 8
                width = tiles["K_MAIN"] + tiles["K_TAIL"]
                rows = tiles["BLOCK_M"] + tiles["num_stages"] * tiles["BLOCK_N"]
                assert element * width * rows <= tiling.SHARED_MEMORY[name], (name, k, precision)
