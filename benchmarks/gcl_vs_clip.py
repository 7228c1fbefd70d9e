"""The experiment the GCL paper is about, on synthetic MarqoGS-10M-shaped data: does weighting
pairs by their graded relevance (GCL) beat the CLIP loss (constant weights)?

For each score-to-weight kind (``constant`` = CLIP, ``inverse``, ``piecewise``) and each seed, train
the tiny open_clip model with the same recipe (the demo's config file: steps, batch, schedule),
evaluate the four splits and write every row, the mean and spread per kind, and a plot:

    python benchmarks/gcl_vs_clip.py                      # 3 kinds x 3 seeds, ~20 min on 2 cores
    python benchmarks/gcl_vs_clip.py --seeds 5 --steps 600
    python benchmarks/gcl_vs_clip.py --batch-size 256 --set chunk_size=64 --tag b256 \
        --synthetic docs_per_query=24           # another recipe, on an easier dataset

Results: ``benchmarks/results/gcl_vs_clip.csv`` (one row per kind, seed, split, metric),
``gcl_vs_clip_summary.csv`` (mean, std), ``gcl_vs_clip.json`` (settings and hardware),
``gcl_vs_clip.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, hardware  # noqa: E402

from reference_trainer.config import TrainConfig, build_config  # noqa: E402
from reference_trainer.evaluate import METRICS, evaluate_model  # noqa: E402
from reference_trainer.marqo import SPLITS, MarqoGS, open_dataset  # noqa: E402
from reference_trainer.model import load_trained  # noqa: E402
from reference_trainer.synthetic import make_synthetic  # noqa: E402
from reference_trainer.train import train  # noqa: E402

KINDS = ("constant", "inverse", "piecewise")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "reference_trainer" / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kinds", nargs="+", default=list(KINDS), help="weight kinds (default: %(default)s)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per kind (default 3)")
    parser.add_argument(
        "--config", default=str(DEMO_CONFIG), help="trainer config file (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default: the config's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    parser.add_argument("--data", help="existing dataset directory (default: generate one, seed 0)")
    parser.add_argument(
        "--max-queries", type=int, default=2000, help="evaluation queries per split"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="trainer config overrides for every run, applied last "
        "(e.g. chunk_size=64 max_docs_per_query=4 max_logit_scale=50)",
    )
    parser.add_argument(
        "--synthetic",
        nargs="+",
        default=["docs_per_query=100"],
        metavar="KEY=VALUE",
        help="make_synthetic options for the generated dataset "
        "(default: %(default)s; e.g. noise=1.0 query_id_dtype=int64)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument("--tag", default="gcl_vs_clip", help="file name stem of the results")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot and table from the saved summary CSV")  # fmt: skip
    args = parser.parse_args()
    if args.plot_only:
        with (Path(args.out) / f"{args.tag}_summary.csv").open() as f:
            summary = [
                {**row, "mean": float(row["mean"]), "std": float(row["std"])}
                for row in csv.DictReader(f)
            ]
        trainer = json.loads((Path(args.out) / f"{args.tag}.json").read_text())["trainer"]
        kinds = list(dict.fromkeys(row["kind"] for row in summary))
        recipe = (trainer["steps"], trainer["batch_size"], int(summary[0]["seeds"]))
        plot(summary, kinds, Path(args.out) / f"{args.tag}.png", *recipe)
        print_table(summary, kinds)
        return

    work = Path(tempfile.mkdtemp(prefix="gcl_vs_clip_"))
    synthetic = {key: yaml.safe_load(value) for key, value in
                 (item.split("=", 1) for item in args.synthetic)}  # fmt: skip
    data = (
        Path(args.data)
        if args.data
        else make_synthetic(work / "data", layout="huggingface", seed=0, **synthetic)
    )
    dataset = open_dataset(data)
    print(f"data: {dataset.describe()}")

    rows = []
    for kind in args.kinds:
        for seed in range(args.seeds):
            started = time.perf_counter()
            config = build_config(
                args.config, args.set, data=str(data), out=str(work / f"{kind}_{seed}"),
                weight_kind=kind, seed=seed, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, checkpoint_every=0, progress=False,
            )  # fmt: skip
            results = train_and_evaluate(config, dataset, args.max_queries)
            seconds = time.perf_counter() - started
            rows += result_rows(results, kind=kind, seed=seed)
            summary = "  ".join(f"{s}: {results[s]['NDCG@10']:.4f}" for s in SPLITS)
            print(f"{kind:>10} seed {seed}: NDCG@10  {summary}  ({seconds:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{args.tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kind", "seed", "split", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    with (out / f"{args.tag}_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kind", "split", "metric", "mean", "std", "seeds"])
        writer.writeheader()
        writer.writerows(summary)
    settings = {key: value for key, value in vars(args).items() if key not in ("out",)}
    meta = {"settings": settings, "data": dataset.describe(), "hardware": hardware(),
            "trainer": {k: v for k, v in config.to_dict().items() if k not in ("data", "out", "seed", "weight_kind")}}  # fmt: skip
    (out / f"{args.tag}.json").write_text(json.dumps(meta, indent=2))
    plot(summary, args.kinds, out / f"{args.tag}.png", config.steps, config.batch_size, args.seeds)
    print_table(summary, args.kinds)


def train_and_evaluate(
    config: TrainConfig, dataset: MarqoGS, max_queries: int
) -> dict[str, dict[str, float]]:
    """Train one run and evaluate its final checkpoint: ``{split: {metric: value}}``."""
    checkpoint = train(config)
    return evaluate_model(
        load_trained(checkpoint), dataset, max_queries=max_queries, progress=False
    )


def result_rows(results: dict[str, dict[str, float]], **labels: Any) -> list[dict]:
    """One row per split and metric of one run's ``{split: {metric: value}}``, after ``labels``
    (e.g. ``kind``, ``seed``): the long format of the results CSVs."""
    return [
        {**labels, "split": split, "metric": metric, "value": results[split][metric]}
        for split in SPLITS for metric in METRICS
    ]  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["split"], row["metric"]), []).append(row["value"])
    return [
        {"kind": kind, "split": split, "metric": metric, "mean": statistics.fmean(values),
         "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)}
        for (kind, split, metric), values in groups.items()
    ]  # fmt: skip


def print_table(summary: list[dict], kinds: list[str]) -> None:
    cell = {(s["kind"], s["split"], s["metric"]): s for s in summary}
    print(f"\n{'kind':>10} {'metric':>8} " + " ".join(f"{split:>18}" for split in SPLITS))
    for kind in kinds:
        for metric in ("NDCG@10", "mERR", "mRBP9"):
            values = [cell[kind, split, metric] for split in SPLITS]
            print(
                f"{kind:>10} {metric:>8} "
                + " ".join(f"{v['mean']:.4f} +- {v['std']:.4f}".rjust(18) for v in values)
            )


def plot(
    summary: list[dict], kinds: list[str], png: Path, steps: int, batch_size: int, seeds: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(s["kind"], s["split"], s["metric"]): s for s in summary}
    metrics = ("NDCG@10", "mERR", "mRBP9")
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 3.8))
    for ax, metric in zip(axes, metrics):
        series = {kind: [cell[kind, split, metric] for split in SPLITS] for kind in kinds}
        grouped_bars(ax, list(SPLITS), series)
        ax.set_title(metric)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="weights", loc="center right")
    fig.suptitle(f"GCL weights vs CLIP loss (constant), synthetic data, tiny model, {steps} steps x "
                 f"{batch_size}, mean +- std over {seeds} seeds")  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def grouped_bars(ax, groups: list[str], series: dict[str, list[dict | None]], rotation=0) -> None:
    """A bar group per name in ``groups``, in it a bar per series (its ``mean``, an error bar of
    its ``std``); a None leaves that bar out."""
    width = 0.8 / len(series)
    for i, (label, cells) in enumerate(series.items()):
        found = [(x, c) for x, c in enumerate(cells) if c is not None]
        ax.bar([x + i * width for x, _ in found], [c["mean"] for _, c in found], width,
               yerr=[c["std"] for _, c in found], capsize=2, label=label)  # fmt: skip
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels(groups, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


if __name__ == "__main__":
    main()
