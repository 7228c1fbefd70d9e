"""The recipe study: which training settings decide whether GCL's weights beat the CLIP loss.

``recipe_study.yaml`` holds the synthetic dataset's options, the base trainer settings and the
recipes (each the base plus its changes). Every recipe is trained for each weight kind and seed
on one dataset, its final checkpoint evaluated on the four splits; each recipe's rows are saved as
soon as it finishes, so a rerun skips the recipes already done::

    python benchmarks/recipe_study.py                          # every recipe not yet run
    python benchmarks/recipe_study.py --only base shuffled     # some of them (e.g. two lanes
    python benchmarks/recipe_study.py --only batch_256 --threads 1   # of one thread each)
    python benchmarks/recipe_study.py --report                 # table and plot, no training

Results: ``results/recipe_study/<recipe>.csv`` (one row per kind, seed, split, metric),
``results/recipe_study.csv`` (mean and std per recipe, kind, split, metric),
``results/recipe_study.md`` (the table), ``results/recipe_study.png`` and
``results/recipe_study.json`` (the settings and the hardware).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

import gcl_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, hardware  # noqa: E402
from gcl_vs_clip import grouped_bars, result_rows, summarise, train_and_evaluate  # noqa: E402

from reference_trainer.config import build_config  # noqa: E402
from reference_trainer.evaluate import evaluate_model  # noqa: E402
from reference_trainer.marqo import SPLITS, open_dataset  # noqa: E402
from reference_trainer.model import create_model  # noqa: E402
from reference_trainer.synthetic import make_synthetic  # noqa: E402

STUDY = Path(__file__).resolve().parent / "recipe_study.yaml"
RECIPE_KEYS = ("kinds", "constant_from")  # a recipe's keys that are not trainer settings
TABLE_METRICS = ("NDCG@10", "mERR")
UNTRAINED = "untrained"  # the reference row: the base model at its random initialisation
KIND_ORDER = (UNTRAINED, *gcl_ops.WEIGHT_KINDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(STUDY), help="the study file (default: %(default)s)")
    parser.add_argument("--only", nargs="+", help="run these recipes only (default: all)")
    parser.add_argument("--data", default="runs/recipe_study/data",
                        help="the dataset, generated there if missing (default: %(default)s)")  # fmt: skip
    parser.add_argument("--work", default="runs/recipe_study", help="run directories")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--report", action="store_true", help="table and plot only")
    args = parser.parse_args()
    study = yaml.safe_load(Path(args.study).read_text())
    recipes: dict[str, dict] = study["recipes"]
    unknown = sorted(set(args.only or ()) - set(recipes))
    if unknown:
        parser.error(f"no such recipe: {', '.join(unknown)} (the study has {', '.join(recipes)})")
    out = Path(args.out)
    rows_dir = out / "recipe_study"
    if not args.report:
        if args.threads:
            torch.set_num_threads(args.threads)
        data = ensure_dataset(Path(args.data), study["synthetic"])
        if not (rows_dir / f"{UNTRAINED}.csv").exists():
            save_rows(evaluate_untrained(study, data), rows_dir / f"{UNTRAINED}.csv")
        for name in args.only or recipes:
            run_recipe(name, study, data, Path(args.work) / name, rows_dir / f"{name}.csv")
    report(study, rows_dir, out)


def ensure_dataset(path: Path, options: dict) -> Path:
    """The study's dataset at ``path``: generated (seed 0) when missing, written beside it first
    and renamed, so that concurrent lanes never read half a dataset."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make_synthetic(partial, layout="huggingface", seed=0, **options)
        partial.rename(path)
    return path


def recipe_settings(study: dict, name: str) -> tuple[dict, list[str]]:
    """A recipe's trainer settings (the base, then its changes) and its weight kinds."""
    recipe = study["recipes"][name] or {}
    settings = {**study["base"], **{k: v for k, v in recipe.items() if k not in RECIPE_KEYS}}
    return settings, list(recipe.get("kinds", study["kinds"]))


def run_recipe(name: str, study: dict, data: Path, work: Path, rows_file: Path) -> None:
    """Train and evaluate the recipe's runs (kind, seed) that ``rows_file`` does not hold yet,
    saving the rows after each."""
    settings, kinds = recipe_settings(study, name)
    rows = read_rows(rows_file) if rows_file.exists() else []
    done = {(row["kind"], int(row["seed"])) for row in rows}
    missing = [(kind, seed) for kind in kinds for seed in range(study["seeds"])
               if (kind, seed) not in done]  # fmt: skip
    if not missing:
        print(f"{name}: done before, skipped")
        return
    dataset = open_dataset(data)
    for kind, seed in missing:
        started = time.perf_counter()
        shutil.rmtree(work / f"{kind}_{seed}", ignore_errors=True)
        config = build_config(
            None, [], **settings, data=str(data), out=str(work / f"{kind}_{seed}"),
            weight_kind=kind, seed=seed, progress=False,
        )  # fmt: skip
        results = train_and_evaluate(config, dataset, max_queries=2000)
        rows += result_rows(results, recipe=name, kind=kind, seed=seed)
        ndcg = "  ".join(f"{s}: {results[s]['NDCG@10']:.4f}" for s in SPLITS)
        print(f"{name} {kind} seed {seed}: NDCG@10  {ndcg}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        save_rows(rows, rows_file)


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [{**row, "value": float(row["value"])} for row in csv.DictReader(f)]


def evaluate_untrained(study: dict, data: Path) -> list[dict]:
    """The base model at its random initialisation, per seed: what training starts from (query
    and title share words, so even a random text tower ranks above chance)."""
    dataset = open_dataset(data)
    rows = []
    for seed in range(study["seeds"]):
        torch.manual_seed(seed)
        results = evaluate_model(create_model(study["base"]["model"]), dataset, max_queries=2000,
                                 progress=False)  # fmt: skip
        rows += result_rows(results, recipe=UNTRAINED, kind=UNTRAINED, seed=seed)
    return rows


def save_rows(rows: list[dict], path: Path) -> None:
    """Write the rows at once (a partial file, then a rename): a killed run leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.rename(path)


def load_rows(study: dict, rows_dir: Path) -> dict[str, list[dict]]:
    """Each finished recipe's rows, the constant rows borrowed where a recipe says so."""
    rows: dict[str, list[dict]] = {}
    for name in [UNTRAINED, *study["recipes"]]:
        path = rows_dir / f"{name}.csv"
        if path.exists():
            rows[name] = read_rows(path)
    for name, recipe in study["recipes"].items():
        source = (recipe or {}).get("constant_from")
        if name in rows and source in rows:
            rows[name] += [r for r in rows[source] if r["kind"] == "constant"]
    return rows


def report(study: dict, rows_dir: Path, out: Path) -> None:
    rows = load_rows(study, rows_dir)
    if not rows:
        print("no recipe has been run yet")
        return
    summary = [
        {"recipe": name, **cell} for name, recipe_rows in rows.items()
        for cell in summarise(recipe_rows)
    ]  # fmt: skip
    with (out / "recipe_study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    table = markdown_table(summary, list(rows))
    (out / "recipe_study.md").write_text(table)
    print(table)
    settings = {name: recipe_settings(study, name)[0] for name in rows if name != UNTRAINED}
    meta = {"study": study, "settings": settings, "hardware": hardware()}
    (out / "recipe_study.json").write_text(json.dumps(meta, indent=2))
    plot(summary, list(rows), out / "recipe_study.png", study)


def markdown_table(summary: list[dict], recipes: list[str]) -> str:
    """A row per recipe and weighting, a column per split: mean +- std over the seeds and, for
    the GCL weightings, the difference to the same recipe's CLIP loss (constant weights)."""
    cell = {(s["recipe"], s["kind"], s["split"], s["metric"]): s for s in summary}
    lines = []
    for metric in TABLE_METRICS:
        lines += [f"\n{metric}, mean +- std over the seeds (difference to the recipe's CLIP loss); "
                  "untrained: the model before training\n",
                  "| recipe | weights | " + " | ".join(SPLITS) + " |",
                  "| --- | --- |" + " --- |" * len(SPLITS)]  # fmt: skip
        for name in recipes:
            for kind in [k for k in KIND_ORDER if (name, k, SPLITS[0], metric) in cell]:
                parts = []
                for split in SPLITS:
                    value, clip = (
                        cell[name, kind, split, metric],
                        cell.get((name, "constant", split, metric)),
                    )
                    text = f"{value['mean']:.3f} +- {value['std']:.3f}"
                    if kind not in ("constant", UNTRAINED) and clip is not None:
                        text += f" ({value['mean'] - clip['mean']:+.3f})"
                    parts.append(text)
                lines.append(f"| {name} | {kind} | " + " | ".join(parts) + " |")
    return "\n".join(lines).lstrip() + "\n"


def plot(summary: list[dict], recipes: list[str], png: Path, study: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(s["recipe"], s["kind"], s["split"], s["metric"]): s for s in summary}
    kinds = [kind for kind in KIND_ORDER if any(s["kind"] == kind for s in summary)]
    fig, axes = plt.subplots(len(TABLE_METRICS), len(SPLITS), figsize=(18, 7), sharey="row")
    for row, metric in enumerate(TABLE_METRICS):
        for column, split in enumerate(SPLITS):
            series = {
                kind: [cell.get((name, kind, split, metric)) for name in recipes] for kind in kinds
            }
            grouped_bars(axes[row][column], recipes, series, rotation=40)
            axes[row][column].set_title(f"{split}: {metric}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="weights", loc="center right")
    base = study["base"]
    fig.suptitle(f"Recipe study: the CLIP loss (constant) vs GCL weights, {base['model']}, synthetic "
                 f"data, base {base['steps']} steps x {base['batch_size']}, mean +- std over "
                 f"{study['seeds']} seeds")  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.94, 1))
    fig.savefig(png, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
