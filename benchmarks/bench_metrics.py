"""Ranking metrics at scale: gcl_ops against ranx and torchmetrics, from the same arrays.

    python benchmarks/bench_metrics.py                     # 100,000 queries x 100 results
    python benchmarks/bench_metrics.py --queries 2000      # a quick look

The workload is the one ranx's own comparison uses: every query has 100 retrieved documents
(distinct scores) and 100 judged ones (grades 1..100, MarqoGS-10M's ``score_linear``), half of
them retrieved. Metrics: NDCG@10 and RBP (p = 0.9) for everyone, ERR for gcl_ops too.

Reported (median of repeats, JIT warm-up excluded and reported apart):

* gcl_ops: building ``Qrels`` from the arrays; ``evaluate`` from retrieved indices (lookup +
  metrics); the metric kernels alone from ranked grades; on the GPU as well when present.
* ranx: building its ``Qrels``/``Run`` from DataFrames (its conversion), its warm
  ``evaluate``, and its compiled (numba) kernels alone on prebuilt typed lists.
* torchmetrics: ``RetrievalNormalizedDCG`` on flat (index, score, target) tensors, on a subset
  of queries (it loops over queries in Python), scaled to the full count and marked as such.

Rows go to ``benchmarks/results/metrics_<device>.csv`` with the hardware line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_rows, hardware, time_ms  # noqa: E402

from gcl_ops import metrics as M  # noqa: E402
from gcl_ops.retrieval import Qrels, evaluate  # noqa: E402


def make_workload(num_queries: int, depth: int, judged_per_query: int, seed: int = 0):
    """Arrays: retrieved doc ids (Q, depth) in rank order, their scores, and qrels triples."""
    rng = np.random.default_rng(seed)
    corpus = 10 * depth
    retrieved = np.stack([rng.choice(corpus, depth, replace=False) for _ in range(num_queries)])
    scores = np.sort(rng.random((num_queries, depth)), axis=1)[:, ::-1].copy()
    # Judged: half of the retrieved documents and as many others, grades 1..100.
    judged = np.concatenate(
        [retrieved[:, : judged_per_query // 2],
         np.stack([rng.choice(np.arange(corpus, 2 * corpus), judged_per_query - judged_per_query // 2,
                              replace=False) for _ in range(num_queries)])], axis=1)  # fmt: skip
    rng.permuted(judged, axis=1, out=judged)
    grades = rng.integers(1, 101, size=judged.shape)
    return retrieved, scores, judged, grades


def bench_gcl_ops(retrieved, judged, grades, device: str, repeats: int) -> list[dict]:
    q = np.repeat(np.arange(judged.shape[0]), judged.shape[1])
    rows = []
    build = time_ms(lambda: Qrels.from_arrays(q, judged.reshape(-1), grades.reshape(-1)), "cpu",
                    repeats=max(1, repeats // 2), warmup=1)  # fmt: skip
    rows.append(
        dict(library="gcl_ops", stage="build qrels from arrays", runs_on="cpu", ms=build[0])
    )
    qrels = Qrels.from_arrays(q, judged.reshape(-1), grades.reshape(-1), device=device)
    indices = torch.from_numpy(retrieved).to(device)
    names = ["ndcg@10", "rbp@0.9"]
    for label, metric_names in (
        ("evaluate ndcg@10+rbp", names),
        ("evaluate ndcg@10+rbp+err", names + ["err"]),
    ):
        median = time_ms(
            lambda m=metric_names: evaluate(indices, qrels, m), device, repeats=repeats
        )[0]
        rows.append(dict(library="gcl_ops", stage=label, runs_on=device, ms=median))
    ranked, judged_grades = qrels.lookup(indices), qrels.judged()

    def kernels() -> None:
        M.ndcg(ranked, 10, judged=judged_grades)
        M.rbp(ranked, 0.9, judged=judged_grades)

    median = time_ms(kernels, device, repeats=repeats)[0]
    rows.append(
        dict(library="gcl_ops", stage="metric kernels ndcg@10+rbp", runs_on=device, ms=median)
    )
    if device == "cuda":  # one read of the input: (Q, L) ranked + (Q, R) judged fp32
        bytes_read = (ranked.numel() + judged_grades.numel()) * 4
        copy = time_ms(lambda: (ranked.clone(), judged_grades.clone()), device, repeats=repeats)[0]
        rows.append(dict(library="reference", stage=f"copy of the input ({bytes_read / 1e6:.0f} MB)",
                         runs_on=device, ms=copy))  # fmt: skip
    return rows


def bench_ranx(retrieved, scores, judged, grades, repeats: int) -> list[dict]:
    import pandas as pd
    import ranx
    from ranx.metrics import ndcg, rank_biased_precision

    num_queries = retrieved.shape[0]

    def ids(values: np.ndarray) -> pd.Series:  # ranx wants `object` id columns, not pandas' str
        return pd.Series(values.reshape(-1).astype(str), dtype=object)

    qrels_df = pd.DataFrame({"q_id": ids(np.repeat(np.arange(num_queries), judged.shape[1])),
                             "doc_id": ids(judged), "score": grades.reshape(-1)})  # fmt: skip
    run_df = pd.DataFrame({"q_id": ids(np.repeat(np.arange(num_queries), retrieved.shape[1])),
                           "doc_id": ids(retrieved), "score": scores.reshape(-1)})  # fmt: skip
    rows = []

    def build():
        qrels = ranx.Qrels.from_df(
            qrels_df, q_id_col="q_id", doc_id_col="doc_id", score_col="score"
        )
        run = ranx.Run.from_df(run_df, q_id_col="q_id", doc_id_col="doc_id", score_col="score")
        return qrels, run

    # The first build includes numba compiling ranx's conversion; the second is warm.
    for label in ("build Qrels/Run from DataFrames (first)", "build Qrels/Run from DataFrames"):
        start = time.perf_counter()
        qrels, run = build()
        elapsed = (time.perf_counter() - start) * 1e3
        rows.append(dict(library="ranx", stage=label, runs_on="cpu", ms=elapsed))
    metrics = ["ndcg@10", "rbp.9"]
    start = time.perf_counter()
    ranx.evaluate(qrels, run, metrics)
    first = (time.perf_counter() - start) * 1e3
    warm = time_ms(lambda: ranx.evaluate(qrels, run, metrics), "cpu", repeats=repeats, warmup=0)[0]
    rows.append(dict(library="ranx", stage="evaluate ndcg@10+rbp (warm)", runs_on="cpu", ms=warm))
    rows.append(
        dict(
            library="ranx",
            stage="first evaluate - warm (JIT, caches)",
            runs_on="cpu",
            ms=first - warm,
        )
    )
    qrels_list, run_list = qrels.to_typed_list(), run.to_typed_list()

    def kernels() -> None:
        ndcg(qrels_list, run_list, 10)
        rank_biased_precision(qrels_list, run_list, 0.9)

    kernel = time_ms(kernels, "cpu", repeats=repeats, warmup=1)[0]
    rows.append(
        dict(library="ranx", stage="compiled kernels ndcg@10+rbp", runs_on="cpu", ms=kernel)
    )
    return rows


def bench_torchmetrics(retrieved, scores, judged, grades, subset: int) -> list[dict]:
    from torchmetrics.retrieval import RetrievalNormalizedDCG

    retrieved, scores = retrieved[:subset], scores[:subset]
    qrels = Qrels.from_arrays(np.repeat(np.arange(subset), judged.shape[1]), judged[:subset].reshape(-1),
                              grades[:subset].reshape(-1))  # fmt: skip
    target = qrels.lookup(torch.from_numpy(retrieved))
    indexes = torch.arange(subset).repeat_interleave(retrieved.shape[1])
    metric = RetrievalNormalizedDCG(top_k=10)
    start = time.perf_counter()
    metric(torch.from_numpy(scores.reshape(-1).copy()).float(), target.reshape(-1), indexes=indexes)
    elapsed = (time.perf_counter() - start) * 1e3
    return [dict(library="torchmetrics", stage=f"ndcg@10 on {subset} queries, scaled to all",
                 runs_on="cpu", ms=elapsed, note=f"measured {elapsed:.0f} ms on {subset} queries")]  # fmt: skip


def summarize(rows: list[dict]) -> None:
    """The ratios the targets are stated in (ranx time / gcl_ops time, same CPU)."""
    times = {(r["library"], r["runs_on"], r["stage"]): r["ms"] for r in rows}
    ranx_warm = times.get(("ranx", "cpu", "evaluate ndcg@10+rbp (warm)"))
    ranx_kernels = times.get(("ranx", "cpu", "compiled kernels ndcg@10+rbp"))
    ours_evaluate = times[("gcl_ops", "cpu", "evaluate ndcg@10+rbp")]
    ours_kernels = times[("gcl_ops", "cpu", "metric kernels ndcg@10+rbp")]
    if ranx_warm and ranx_kernels:
        # ranx's kernels match documents to qrels themselves: like for like with our evaluate.
        print(f"ranx warm evaluate    / gcl_ops evaluate:       {ranx_warm / ours_evaluate:6.1f}x")
        print(
            f"ranx compiled kernels / gcl_ops evaluate:       {ranx_kernels / ours_evaluate:6.1f}x"
        )
        print(f"ranx warm evaluate    / gcl_ops metrics alone:  {ranx_warm / ours_kernels:6.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=100, help="retrieved documents per query")
    parser.add_argument("--judged", type=int, default=100, help="judged documents per query")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torchmetrics-queries", type=int, default=5000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ranx", "torchmetrics"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    info = hardware()
    print(f"{info['device']} | torch {info['torch']} | {info['date']} | "
          f"{args.queries} queries x {args.depth} results, {args.judged} judged")  # fmt: skip
    retrieved, scores, judged, grades = make_workload(args.queries, args.depth, args.judged)
    rows = bench_gcl_ops(retrieved, judged, grades, "cpu", args.repeats)
    if torch.cuda.is_available():
        rows += bench_gcl_ops(retrieved, judged, grades, "cuda", args.repeats)
    if "ranx" not in args.skip:
        rows += bench_ranx(retrieved, scores, judged, grades, args.repeats)
    if "torchmetrics" not in args.skip:
        subset = min(args.torchmetrics_queries, args.queries)
        measured = bench_torchmetrics(retrieved, scores, judged, grades, subset)
        for row in measured:
            row["ms"] *= args.queries / subset
        rows += measured
    for row in rows:
        row.update(
            queries=args.queries,
            depth=args.depth,
            judged=args.judged,
            ms=round(row["ms"], 3),
            **info,
        )
        row.setdefault("note", "")
        print(f"{row['library']:>13} {row['runs_on']:>5}  {row['stage']:<45} {row['ms']:>12.1f} ms")
    summarize(rows)
    out = args.out or RESULTS / f"metrics_{'gpu' if torch.cuda.is_available() else 'cpu'}.csv"
    append_rows(out, rows)
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
