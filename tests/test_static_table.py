"""The committed Hopper compile table (``benchmarks/results/static_tiles_sm90.csv``, written by
``benchmarks/static_tile_check.py``) describes what the launchers launch today, and what it says
holds: no configuration that can launch spills registers, every half-precision GEMM of the
embedding form is on wgmma. A change of the tile candidates without regenerating the table
fails here (regenerate it with ``python benchmarks/static_tile_check.py --out ...``)."""

from __future__ import annotations

import csv
import pathlib

import pytest

from gcl_ops import ops

TABLE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results/static_tiles_sm90.csv"
ELEMENT_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2}
TILE_COLUMNS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "K_SLICE", "RESIDENT", "num_warps", "num_stages")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with open(TABLE, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def gpu_candidates(monkeypatch):
    """``ops._tile_candidates`` as it answers on a GPU (not the interpreter's small tiles)."""
    monkeypatch.setattr(ops, "_INTERPRETING", False)
    return ops._tile_candidates


def test_no_launched_configuration_spills(rows) -> None:
    assert rows, "the table is empty"
    spilling = [
        f"{r['kernel']} {r['dtype']}/{r['precision']} k={r['k']} config={r['config']}: "
        f"{r['spill_bytes']} bytes"
        for r in rows
        if r["error"] or int(r["spill_bytes"] or 0) > 0
    ]
    assert not spilling, "\n".join(spilling)


def test_every_half_precision_gemm_is_wgmma(rows) -> None:
    embedding = [r for r in rows if r["dtype"] in ("bf16", "fp16") and r["mma"] != "-"]
    assert {r["kernel"] for r in embedding} == {
        "_stats_fwd_kernel", "_online_lse_kernel", "_stats_bwd_kernel",
    }  # fmt: skip
    for r in embedding:
        assert set(r["mma"].split("+")) == {"wgmma"}, r
        assert int(r["ptx_mma_sync"]) == 0 and int(r["ptx_wgmma"]) > 0, r


def test_table_lists_the_current_candidates(rows, gpu_candidates) -> None:
    # Per kernel, dtype, precision and width: one row per autotuner candidate (for each
    # NORMALIZE / ids variant), in the order and with the tiles _tile_candidates gives now.
    for kernel, backward in (("_stats_fwd_kernel", False), ("_stats_bwd_kernel", True)):
        problems = {(r["dtype"], r["precision"], int(r["k"])) for r in rows
                    if r["kernel"] == kernel}  # fmt: skip
        assert len(problems) >= 12, problems  # 4 dtype/precision pairs x several widths
        for dtype, precision, k in problems:
            candidates = gpu_candidates(
                ops._k_pad(k), ELEMENT_SIZES[dtype], backward, precision == "tf32"
            )
            listed = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype
                      and r["precision"] == precision and int(r["k"]) == k]  # fmt: skip
            assert {int(r["config"]) for r in listed} == set(range(len(candidates))), (
                kernel, dtype, precision, k,
            )  # fmt: skip
            for r in listed:
                want = candidates[int(r["config"])]
                got = {name: int(r[name]) for name in TILE_COLUMNS if r[name]}
                assert got == {name: want[name] for name in got}, (kernel, dtype, k, r["config"])


def test_the_8k_backward_is_among_the_candidates(rows) -> None:
    # At k = 512 in bf16 and fp16, some spill-free backward candidate recomputes S only once:
    # forward 2k + backward 6k = 8k FLOPs per N^2.
    for dtype in ("bf16", "fp16"):
        backward = [r for r in rows if r["kernel"] == "_stats_bwd_kernel" and r["dtype"] == dtype
                    and r["k"] == "512"]  # fmt: skip
        assert any(r["flops_per_n2"] == "6k" and r["spill_bytes"] == "0" for r in backward)
