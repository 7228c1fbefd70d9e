"""The committed compile tables (``benchmarks/results/static_tiles_<arch>.csv``, written by
``benchmarks/static_tile_check.py --write``) describe what the launchers launch today, and what
they say holds: no launched default spills registers or overflows shared memory, on Hopper every
tensor-core GEMM is wgmma, and the traffic model favours the default backward strategy. A change
of the tiles without regenerating the tables fails here."""

from __future__ import annotations

import csv
import pathlib

import pytest

from gcl_ops import tiling

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results"
ARCHITECTURES = ("sm80", "sm90")  # full tables; sm89 and sm100: normalised, with ids only
SUBSET_ARCHITECTURES = ("sm89", "sm100")
WIDTHS = {16, 64, 72, 128, 300, 512, 520, 768, 1000, 1024}
PRECISIONS = {("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "-"), ("fp16", "-")}


def _read(arch: str) -> tuple[str, list[dict]]:
    with open(RESULTS / f"static_tiles_{arch}.csv", newline="") as f:
        return arch, list(csv.DictReader(f))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def table(request) -> tuple[str, list[dict]]:
    return _read(request.param)


@pytest.fixture(scope="module", params=ARCHITECTURES + SUBSET_ARCHITECTURES)
def any_table(request) -> tuple[str, list[dict]]:
    return _read(request.param)


def _precision(row: dict) -> str:
    return "half" if row["dtype"] != "fp32" else row["precision"]


def test_the_table_covers_every_width_precision_and_an_odd_batch(table) -> None:
    arch, rows = table
    embedding = [r for r in rows if r["k"] != "-"]
    assert {int(r["k"]) for r in embedding} >= WIDTHS
    assert {(r["dtype"], r["precision"]) for r in embedding} == PRECISIONS
    assert {"32768", "1001"} <= {r["n"] for r in rows}  # 1001: no size divisible by 16
    roles = {r["role"] for r in embedding}
    assert roles == {"forward", "recompute", "backward docs", "backward queries",
                     "backward atomic"}, roles  # fmt: skip


def test_no_launched_default_spills_or_fails(table) -> None:
    arch, rows = table
    bad = [f"{r['kernel']} ({r['role']}) {r['dtype']}/{r['precision']} k={r['k']} n={r['n']}: "
           f"{r['spill_bytes']} B spilled {r['error']}"
           for r in rows if r["config"] == "default" and (r["error"] or int(r["spill_bytes"] or 0))]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_every_tensor_core_gemm_on_hopper_is_wgmma(table) -> None:
    arch, rows = table
    if arch != "sm90":
        pytest.skip("wgmma is Hopper's")
    gemms = [r for r in rows if r["mma"] not in ("-", "") and r["precision"] != "ieee"]
    assert gemms
    for r in gemms:
        assert set(r["mma"].split("+")) == {"wgmma"}, r


def test_the_table_lists_todays_tiles(any_table) -> None:
    # Every row's tiles are what tiling gives today for its width, precision and strategy.
    arch, rows = any_table
    assert {int(r["k"]) for r in rows if r["k"] != "-"} >= WIDTHS
    for r in rows:
        if r["config"] != "default" or r["k"] == "-":
            continue
        k_pad, precision = tiling.padded_width(int(r["k"])), _precision(r)
        if r["role"] == "forward":
            want = tiling.forward_tiles(arch, precision, k_pad)
            got = dict(BLOCK_M=r["BLOCK_M"], BLOCK_N=r["BLOCK_N"], K_MAIN=r["K_MAIN"])
            want = dict(BLOCK_M=want["BLOCK_M"], BLOCK_N=want["BLOCK_N"], K_MAIN=want["K_MAIN"])
        elif r["role"].startswith("backward"):
            want = tiling.backward_tiles(arch, precision, k_pad, r["strategy"])
            got = dict(BLOCK_OWN=r["BLOCK_M"], BLOCK_OTHER=r["BLOCK_N"], K_MAIN=r["K_MAIN"],
                       K_TAIL=r["K_TAIL"], slices=r["slices"])  # fmt: skip
            want = {name: want[name] for name in got}
        else:
            continue
        assert {name: int(value) for name, value in got.items()} == want, (arch, r)


def test_the_default_strategy_is_the_one_the_model_favours(table) -> None:
    # The backward at N = 32,768 (normalised, no ids), per width and precision: the default
    # strategy (tiling.backward_strategy) is the one whose launches the table estimates fastest
    # (the split backward's two launches against the atomic one; ties go to split).
    arch, rows = table
    totals: dict = {}
    for r in rows:
        if (r["n"] != "32768" or r["config"] != "default" or r["normalize"] != "True"
                or r["ids"] != "none" or not r["role"].startswith("backward")):  # fmt: skip
            continue
        key = (int(r["k"]), _precision(r), r["strategy"])
        totals[key] = totals.get(key, 0.0) + float(r["est_ms_n32768"])
    checked = 0
    for (k, precision, strategy), split in totals.items():
        if strategy != "split" or (k, precision, "atomic") not in totals:
            continue
        atomic = totals[k, precision, "atomic"]
        if abs(split - atomic) <= 2e-3 * max(split, atomic):
            continue  # a tie within the table's rounding
        want = "split" if split < atomic else "atomic"
        assert tiling.backward_strategy(arch, precision, tiling.padded_width(k)) == want, (
            arch, k, precision, split, atomic,
        )  # fmt: skip
        checked += 1
    assert checked >= 2 * len(WIDTHS) - 4
