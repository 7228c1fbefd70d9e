"""The GPU kit's dry run (``scripts/gpu_check.sh OUT --dry-run``): every part's code on a CPU at
tiny sizes, so that the kit works the day a GPU runs it."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_kit_dry_run_passes(tmp_path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path), "--dry-run"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["part"] for row in summary] == [
        "environment", "gpu_tests", "correctness", "loss", "largest_n", "metrics", "grad_cache",
        "st_negatives", "trainer",
    ]  # fmt: skip
    assert all(row["status"] == "ok" for row in summary), summary
    # Each part left its rows, with the hardware line where it writes a table.
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert {"device", "torch", "triton", "date", "commit"} <= set(environment)
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    assert {(r["case"], r.get("strategy")) for r in correctness} >= {
        ("bf16", "split"), ("bf16", "atomic"), ("fp16", "split"), ("tf32", "split"),
        ("ieee", "split"),
    }  # fmt: skip
    assert all(r["ok"] is not False for r in correctness), correctness
    loss_rows = (tmp_path / "loss_gpu.csv").read_text().splitlines()
    assert "device" in loss_rows[0] and len(loss_rows) > 3
    assert (tmp_path / "loss_gpu.png").exists()
    for name in ("largest_n.json", "metrics_gpu.csv", "grad_cache_gpu.csv", "st_negatives_gpu.csv",
                 "trainer.json"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
