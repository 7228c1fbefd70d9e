"""torch.compile sees the fused loss as opaque custom ops: no graph break, same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from params import DEVICE, IMPLS

import gcl_ops


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("multi_field", [False, True], ids=["single", "multi-field"])
def test_compiled_training_step_has_no_graph_break(impl: str, multi_field: bool) -> None:
    torch.manual_seed(0)
    text_tower = torch.nn.Linear(12, 16).to(DEVICE)
    image_tower = torch.nn.Linear(20, 16).to(DEVICE)
    logit_scale = torch.nn.Parameter(torch.tensor(2.5, device=DEVICE))
    text, image = torch.randn(33, 12, device=DEVICE), torch.randn(33, 20, device=DEVICE)
    weights = torch.rand(33, device=DEVICE) * 10
    query_ids = torch.randint(0, 20, (33,), device=DEVICE)
    loss_fn = gcl_ops.MultiFieldGCLLoss(impl=impl) if multi_field else gcl_ops.GCLLoss(impl=impl)

    def step() -> torch.Tensor:
        query = F.normalize(text_tower(text), dim=-1)
        doc = F.normalize(image_tower(image), dim=-1)
        if multi_field:
            return loss_fn([query], [doc, doc * 0.5 + query * 0.5], logit_scale.exp(), weights,
                           query_ids=query_ids)  # fmt: skip
        return loss_fn(query, doc, logit_scale.exp(), weights, query_ids=query_ids)

    parameters = [*text_tower.parameters(), *image_tower.parameters(), logit_scale]

    def loss_and_grads(fn) -> list[torch.Tensor]:
        loss = fn()
        return [loss.detach(), *torch.autograd.grad(loss, parameters)]

    eager = loss_and_grads(step)
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward without
    # code generation, which keeps the test fast on a CPU.
    compiled = loss_and_grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu() -> None:
    # The interpreter skips the GPU compiler; compile the launched configurations for sm_90a and
    # sm_80 with triton's bundled ptxas (in a process without TRITON_INTERPRET), at widths that
    # need padding and a batch no size of which 16 divides, and check that none spills.
    import importlib.util
    import os
    import pathlib
    import subprocess
    import sys

    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is None:
        pytest.skip("triton is not installed")
    ptxas = pathlib.Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no ptxas")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "static_tile_check.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script), "--arch", "sm90", "sm80", "--k", "72", "520", "--n", "1001",
         "--dtype", "bf16", "fp32", "--normalize", "on", "--ids", "qid+did"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("arch=")]
    compiled = {line.split(", ")[1].removeprefix("kernel=") for line in reports}
    assert compiled == {
        "_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel",
        "_logits_stats_kernel", "_logits_grad_kernel",
    }  # fmt: skip
    assert {line.split(", ")[0] for line in reports} == {"arch=sm80", "arch=sm90"}
    assert all(line.endswith("error=") and "spill_bytes=0," in line for line in reports), "\n".join(
        reports
    )
