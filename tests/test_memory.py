"""The blocked CPU path never holds the N x N matrix: peak memory measured in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/status"
)


def matrix_bytes(n: int) -> int:
    """One fp32 N x N matrix (256 MiB at N = 8192, 1 GiB at N = 16384)."""
    return n * n * 4


# Peak resident memory of forward + backward, minus the resident memory just before it (inputs
# and their gradient buffers already allocated). Linux's per-process high-water mark (VmHWM) is
# reset to the current size first (clear_refs 5); ru_maxrss is no good here: a child inherits
# its parent's.
MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    import gcl_ops
    from gcl_ops.reference import naive_gcl_loss

    n, k, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(n, k, generator=generator, requires_grad=True)
    doc = torch.randn(n, k, generator=generator, requires_grad=True)
    weights = torch.rand(n, generator=generator)
    ids = torch.randint(0, n // 2, (n,), generator=generator)
    loss_fn = naive_gcl_loss if impl == "naive" else gcl_ops.gcl_loss
    # Warm up on a slice (loads kernels, allocates query.grad and doc.grad at full size).
    loss_fn(query[:64], doc[:64], weights[:64], 10.0, query_ids=ids[:64]).backward()

    def status_bytes(field):
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS")
    loss = loss_fn(query, doc, weights, 10.0, query_ids=ids)
    loss.backward()
    print(json.dumps({"extra_bytes": status_bytes("VmHWM") - before, "loss": loss.item()}))
    """
)


def peak_extra_bytes(n: int, k: int, impl: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(n), str(k), impl],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.slow
def test_blocked_path_peak_memory_is_far_below_one_matrix() -> None:
    # k = 64 keeps the O(N k) gradients small, so the N^2 term (if any) would dominate.
    n, k = 8192, 64
    blocked = peak_extra_bytes(n, k, "torch")
    naive = peak_extra_bytes(n, k, "naive")
    # The measurement sees a materialised matrix: the naive loss holds several of them.
    assert naive > 2 * matrix_bytes(n), f"naive path used only {naive / 2**20:.0f} MiB"
    assert blocked < matrix_bytes(n) / 8, (
        f"blocked path used {blocked / 2**20:.0f} MiB extra at N={n}, k={k}; "
        f"one N x N fp32 matrix is {matrix_bytes(n) / 2**20:.0f} MiB"
    )


@pytest.mark.slow
def test_blocked_path_at_16k_by_512_stays_far_below_one_matrix() -> None:
    # The size: the two (N, k) fp32 gradients alone are 64 MiB of the measured extra.
    n, k = 16384, 512
    blocked = peak_extra_bytes(n, k, "torch")
    assert blocked < matrix_bytes(n) / 4, (
        f"blocked path used {blocked / 2**20:.0f} MiB extra at N={n}, k={k}; "
        f"one N x N fp32 matrix is {matrix_bytes(n) / 2**20:.0f} MiB"
    )
