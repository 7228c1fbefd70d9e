"""benchmarks/recipe_study.py on a tiny study: every recipe trained per kind and seed, the rows
saved per recipe and skipped on a rerun, a recipe's constant rows borrowed where it says so, and
the table's differences computed from the saved means."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from reference_trainer.config import build_config
from reference_trainer.evaluate import METRICS
from reference_trainer.marqo import SPLITS

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def recipe_study():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("recipe_study", BENCHMARKS / "recipe_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["recipe_study.py", *args])
    module.main()


def test_a_tiny_study_end_to_end(recipe_study, tmp_path, monkeypatch, capsys) -> None:
    study = {
        "synthetic": {"queries_per_set": 6, "products_per_set": 20, "docs_per_query": 4,
                      "shards_per_split": 1, "image_size": 16},
        "kinds": ["constant", "inverse"],
        "seeds": 2,
        "base": {"model": "gcl-tiny", "steps": 2, "batch_size": 8, "warmup_steps": 1,
                 "device": "cpu"},
        "recipes": {
            "base": {},
            "weighted": {"loss_normalization": "weights", "kinds": ["inverse"],
                         "constant_from": "base"},
        },
    }  # fmt: skip
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(study))
    out = tmp_path / "results"
    paths = ["--study", str(study_file), "--data", str(tmp_path / "data"),
             "--work", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    run(recipe_study, monkeypatch, *paths)

    with (out / "recipe_study" / "base.csv").open() as f:
        base_rows = list(csv.DictReader(f))
    assert len(base_rows) == 2 * 2 * len(SPLITS) * len(METRICS)
    assert {(r["kind"], r["seed"]) for r in base_rows} == {
        (kind, str(seed)) for kind in ("constant", "inverse") for seed in (0, 1)
    }
    with (out / "recipe_study" / "weighted.csv").open() as f:
        assert {r["kind"] for r in csv.DictReader(f)} == {"inverse"}
    with (out / "recipe_study" / "untrained.csv").open() as f:
        untrained = list(csv.DictReader(f))
    assert {(r["kind"], r["seed"]) for r in untrained} == {("untrained", "0"), ("untrained", "1")}

    # The summary: means over the seeds; "weighted" carries base's constant rows.
    with (out / "recipe_study.csv").open() as f:
        summary = {(r["recipe"], r["kind"], r["split"], r["metric"]): r for r in csv.DictReader(f)}
    for kind in ("constant", "inverse"):
        values = [float(r["value"]) for r in base_rows
                  if r["kind"] == kind and r["split"] == "in_domain" and r["metric"] == "NDCG@10"]  # fmt: skip
        assert float(summary["base", kind, "in_domain", "NDCG@10"]["mean"]) == pytest.approx(
            sum(values) / len(values)
        )
    assert (
        summary["weighted", "constant", "zero_shot", "mERR"]["mean"]
        == summary["base", "constant", "zero_shot", "mERR"]["mean"]
    )

    # The table shows constant -> inverse and their difference for each recipe and split.
    table = (out / "recipe_study.md").read_text()
    clip = float(summary["base", "constant", "novel_query", "NDCG@10"]["mean"])
    gcl = float(summary["base", "inverse", "novel_query", "NDCG@10"]["mean"])
    lines = table.splitlines()
    base_line = next(line for line in lines if line.startswith("| base | inverse |"))
    assert f"({gcl - clip:+.3f})" in base_line.split("|")[4]  # the novel_query column
    untrained_line = next(line for line in lines if line.startswith("| untrained | untrained |"))
    mean = float(summary["untrained", "untrained", "in_domain", "NDCG@10"]["mean"])
    assert untrained_line.split("|")[3].strip().startswith(f"{mean:.3f} +- ")
    assert (out / "recipe_study.png").stat().st_size > 0

    # A rerun trains nothing: each recipe's rows are kept.
    before = (out / "recipe_study" / "base.csv").stat().st_mtime_ns
    capsys.readouterr()
    run(recipe_study, monkeypatch, *paths)
    assert "base: done before, skipped" in capsys.readouterr().out
    assert (out / "recipe_study" / "base.csv").stat().st_mtime_ns == before

    # Another kind for a recipe: only its runs are trained, the rows before are kept.
    study["recipes"]["base"] = {"kinds": ["constant", "inverse", "piecewise"]}
    study_file.write_text(yaml.safe_dump(study))
    run(recipe_study, monkeypatch, *paths)
    with (out / "recipe_study" / "base.csv").open() as f:
        extended = list(csv.DictReader(f))
    assert extended[: len(base_rows)] == base_rows
    assert {(r["kind"], r["seed"]) for r in extended[len(base_rows) :]} == {
        ("piecewise", "0"),
        ("piecewise", "1"),
    }

    with pytest.raises(SystemExit):
        run(recipe_study, monkeypatch, *paths, "--only", "nonesuch")
    assert "no such recipe: nonesuch" in capsys.readouterr().err


def test_the_demo_trains_the_study_winner(recipe_study) -> None:
    # The demo's config is the winning recipe (its settings and a GCL weighting it was run with),
    # and the demo's dataset is the study's.
    study = yaml.safe_load((BENCHMARKS / "recipe_study.yaml").read_text())
    settings, kinds = recipe_study.recipe_settings(study, study["winner"])
    demo = build_config(ROOT / "reference_trainer" / "configs" / "tiny.yaml", [], data="d", out="o")
    assert {key: getattr(demo, key) for key in settings} == settings
    assert demo.weight_kind in kinds and demo.weight_kind != "constant"
    demo_script = (ROOT / "scripts" / "demo.sh").read_text()
    make_synthetic = next(line for line in demo_script.splitlines() if "make-synthetic" in line)
    for key, value in study["synthetic"].items():
        assert f"{key}={value}" in make_synthetic.split(), key
