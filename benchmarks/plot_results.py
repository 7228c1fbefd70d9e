"""Plots of the CSVs in benchmarks/results/: one PNG per CSV, next to it.

python benchmarks/plot_results.py            # every loss_*.csv and metrics_*.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def hardware_line(rows: list[dict]) -> str:
    last = rows[-1]
    return f"{last['device']} | torch {last['torch']} | {last['date']}"


def plot_loss(path: Path) -> Path:
    """Time of forward + backward against N, one line per provider (the last run of each)."""
    rows = [r for r in read(path) if r["status"] == "ok"]
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["mode"] == "fwd+bwd":
            series[row["provider"]][int(row["n"])] = float(row["ms"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for provider, points in sorted(series.items()):
        sizes = sorted(points)
        axis.plot(sizes, [points[n] for n in sizes], marker="o", label=provider)
    axis.set(xscale="log", yscale="log", xlabel="batch size N", ylabel="forward + backward (ms)")
    k, dtype = rows[-1]["k"], rows[-1]["dtype"]
    axis.set_title(f"GCL loss, k = {k}, {dtype}\n{hardware_line(rows)}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    out = path.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def plot_metrics(path: Path) -> Path:
    """One bar per (library, stage), log-scale milliseconds."""
    rows = read(path)
    labels = [f"{r['library']} ({r['runs_on']}): {r['stage']}" for r in rows]
    times = [float(r["ms"]) for r in rows]
    colours = {"gcl_ops": "tab:blue", "ranx": "tab:orange", "torchmetrics": "tab:green"}
    figure, axis = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    axis.barh(labels, times, color=[colours.get(r["library"], "tab:gray") for r in rows])
    axis.set(xscale="log", xlabel="milliseconds (log scale)")
    axis.invert_yaxis()
    for y, value in enumerate(times):
        axis.text(
            value,
            y,
            f" {value:,.0f} ms" if value >= 10 else f" {value:.1f} ms",
            va="center",
            fontsize=8,
        )
    queries, depth = rows[-1]["queries"], rows[-1]["depth"]
    axis.set_title(f"Ranking metrics, {int(queries):,} queries x {depth} results\n{hardware_line(rows)}",
                   fontsize=9)  # fmt: skip
    out = path.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main() -> None:
    for path in sorted(RESULTS.glob("loss_*.csv")):
        print(plot_loss(path))
    for path in sorted(RESULTS.glob("metrics_*.csv")):
        print(plot_metrics(path))


if __name__ == "__main__":
    main()
