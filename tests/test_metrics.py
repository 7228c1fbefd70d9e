"""Ranking metrics against pytrec_eval, ranx and scikit-learn, closed forms and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval
import ranx
import sklearn.metrics as sklearn_metrics
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcl_ops import metrics as M

# ------------------------------------------------------------------------------------------
# A random evaluation in three forms: tensors for us, dicts for pytrec_eval and ranx.
# ------------------------------------------------------------------------------------------


def random_evaluation(seed: int, num_queries: int = 40, corpus: int = 60):
    """Runs of varying length with distinct scores, graded qrels (0..4) that include relevant
    documents never retrieved, and one query with nothing relevant at all."""
    rng = np.random.default_rng(seed)
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(num_queries):
        judged_docs = rng.choice(corpus, size=rng.integers(1, 25), replace=False)
        grades = rng.integers(0, 5, size=len(judged_docs))
        if q == 0:
            grades[:] = 0  # nothing relevant
        qrels[f"q{q}"] = {f"d{d}": int(g) for d, g in zip(judged_docs, grades)}
        retrieved = rng.choice(corpus, size=rng.integers(1, 30), replace=False)
        scores = rng.permutation(len(retrieved)) + rng.random(len(retrieved)) * 0.5
        run[f"q{q}"] = {f"d{d}": float(s) for d, s in zip(retrieved, scores)}
    return qrels, run


def to_tensors(qrels, run):
    """(ranked (Q, L) zero-padded, judged (Q, R) zero-padded) in the dicts' query order."""
    ranked_rows, judged_rows = [], []
    for q, docs in run.items():
        order = sorted(docs, key=docs.get, reverse=True)
        ranked_rows.append([qrels[q].get(d, 0) for d in order])
        judged_rows.append(list(qrels[q].values()))

    def pad(rows):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.float64)

    return pad(ranked_rows), pad(judged_rows)


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_against_pytrec_eval(seed: int) -> None:
    qrels, run = random_evaluation(seed)
    ranked, judged = to_tensors(qrels, run)
    measures = {"ndcg_cut.10", "ndcg_cut.5", "recip_rank", "recall.10", "map_cut.10", "map_cut.20"}
    results = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    # trec_eval ignores a query without relevant documents for some measures: compare the rest.
    queries = list(run)

    def theirs(name: str) -> torch.Tensor:
        return torch.tensor([results[q][name] for q in queries], dtype=torch.float64)

    torch.testing.assert_close(M.ndcg(ranked, 10, judged=judged), theirs("ndcg_cut_10"))
    torch.testing.assert_close(M.ndcg(ranked, 5, judged=judged), theirs("ndcg_cut_5"))
    torch.testing.assert_close(M.mrr(ranked), theirs("recip_rank"))
    torch.testing.assert_close(M.recall(ranked, 10, judged=judged), theirs("recall_10"))
    torch.testing.assert_close(M.average_precision(ranked, 10, judged=judged), theirs("map_cut_10"))
    torch.testing.assert_close(M.average_precision(ranked, 20, judged=judged), theirs("map_cut_20"))


def test_against_ranx() -> None:
    qrels, run = random_evaluation(3)
    # ranx needs at least one relevant judgement per query in its qrels: drop the empty query.
    qrels = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    run = {q: run[q] for q in qrels}
    ranked, judged = to_tensors(qrels, run)
    names = ["ndcg@10", "ndcg_burges@10", "rbp.9", "mrr"]
    ranx_run = ranx.Run(run)
    ranx.evaluate(ranx.Qrels(qrels), ranx_run, names)  # per-query values land in ranx_run.scores
    theirs = {
        name: torch.tensor([ranx_run.scores[name][q] for q in run], dtype=torch.float64)
        for name in names
    }
    top_grade = judged.amax(dim=1)
    torch.testing.assert_close(M.ndcg(ranked, 10, judged=judged), theirs["ndcg@10"])
    torch.testing.assert_close(
        M.ndcg(ranked, 10, judged=judged, gain="exponential"), theirs["ndcg_burges@10"]
    )
    # ranx's RBP sums raw grades; ours divides by the query's top grade.
    torch.testing.assert_close(M.rbp(ranked, 0.9, judged=judged), theirs["rbp.9"] / top_grade)
    torch.testing.assert_close(M.mrr(ranked), theirs["mrr"])


@pytest.mark.parametrize("k", [3, 10, None])
def test_against_scikit_learn_ndcg_score(k) -> None:
    rng = np.random.default_rng(4)
    grades = rng.integers(0, 4, size=(30, 12)).astype(np.float64)
    grades[grades.sum(1) == 0, 0] = 1.0  # scikit-learn warns on all-zero rows
    scores = rng.permutation(30 * 12).reshape(30, 12).astype(np.float64)  # distinct: no ties
    want = sklearn_metrics.ndcg_score(grades, scores, k=k)
    ranked = M.rank(torch.from_numpy(scores), torch.from_numpy(grades))
    got = M.ndcg(ranked, k)  # judged=None: the ideal comes from the candidates, as scikit-learn
    assert float(got.mean()) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------
# ERR: no library oracle; closed forms by hand, then the definition as a scalar loop.
# ------------------------------------------------------------------------------------------


def test_err_closed_forms() -> None:
    ranked = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    # Exponential, g_max = 2 (query 0), 1 (query 2): R = (2^g - 1) / 2^g_max.
    #   q0: R = [3/4, 0, 1/4]: 3/4 + (1/3)(1/4)(1 - 3/4) = 3/4 + 1/48
    #   q2: R = [1/2, 1/2, 0]: 1/2 + (1/2)(1/2)(1/2) = 5/8
    torch.testing.assert_close(
        M.err(ranked), torch.tensor([3 / 4 + 1 / 48, 0.0, 5 / 8], dtype=torch.float64)
    )
    # Linear: R = g / (g_max + 1).
    #   q0: R = [2/3, 0, 1/3]: 2/3 + (1/3)(1/3)(1/3) = 2/3 + 1/27
    #   q2: R = [1/2, 1/2, 0]: 5/8
    torch.testing.assert_close(
        M.err(ranked, mapping="linear"),
        torch.tensor([2 / 3 + 1 / 27, 0.0, 5 / 8], dtype=torch.float64),
    )
    # Cutoff 1 keeps the first term; an explicit g_max of 3 for q0: R_1 = (4 - 1) / 8.
    torch.testing.assert_close(M.err(ranked, 1)[0], torch.tensor(3 / 4, dtype=torch.float64))
    assert M.err(ranked[:1], g_max=3.0).item() == pytest.approx(3 / 8 + (1 / 3) * (1 / 8) * (5 / 8))


def err_by_definition(grades: list[float], g_max: float, mapping: str) -> float:
    total, reach = 0.0, 1.0
    for i, g in enumerate(grades, start=1):
        r = (2**g - 1) / 2**g_max if mapping == "exponential" else g / (g_max + 1)
        total += reach * r / i
        reach *= 1 - r
    return total


grade_lists = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=15), min_size=1, max_size=8)


def pad(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = width or max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.float64)


@given(rows=grade_lists, mapping=st.sampled_from(["exponential", "linear"]))
def test_err_matches_its_definition_and_bounds(rows, mapping) -> None:
    ranked = pad(rows)
    got = M.err(ranked, mapping=mapping)
    for value, row in zip(got, rows):
        assert value.item() == pytest.approx(err_by_definition(row, max(row), mapping), abs=1e-12)
    assert ((got >= 0) & (got <= 1)).all()


# ------------------------------------------------------------------------------------------
# Properties of all metrics.
# ------------------------------------------------------------------------------------------


def all_metrics(ranked: torch.Tensor, judged: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "ndcg@5": M.ndcg(ranked, 5, judged=judged),
        "ndcg_exp@10": M.ndcg(ranked, 10, judged=judged, gain="exponential"),
        "err": M.err(ranked, judged=judged),
        "err_linear@7": M.err(ranked, 7, judged=judged, mapping="linear"),
        "rbp": M.rbp(ranked, 0.8, judged=judged),
        "mrr": M.mrr(ranked),
        "recall@5": M.recall(ranked, 5, judged=judged),
        "map@10": M.average_precision(ranked, 10, judged=judged),
    }


@st.composite
def evaluations(draw):
    """(ranked, judged) where ranked is a permutation of a prefix-free subset of judged."""
    rows_ranked, rows_judged = [], []
    for _ in range(draw(st.integers(1, 6))):
        judged = draw(st.lists(st.integers(0, 4), min_size=1, max_size=12))
        retrieved = draw(st.permutations(judged))[: draw(st.integers(0, len(judged)))]
        extra_unjudged = draw(st.integers(0, 3))
        rows_ranked.append(list(retrieved) + [0] * extra_unjudged)
        rows_judged.append(judged)
    width = max(1, max(len(r) for r in rows_ranked))
    return pad(rows_ranked, width), pad(rows_judged)


@given(evaluation=evaluations())
def test_every_metric_lies_in_the_unit_interval(evaluation) -> None:
    for name, value in all_metrics(*evaluation).items():
        assert ((value >= 0) & (value <= 1 + 1e-12)).all(), name


@given(rows=grade_lists)
def test_the_ideal_ordering_has_ndcg_one(rows) -> None:
    judged = pad(rows)
    ideal = judged.sort(dim=1, descending=True).values
    has_relevant = judged.amax(dim=1) > 0
    for gain in ("linear", "exponential"):
        value = M.ndcg(ideal, None, judged=judged, gain=gain)
        torch.testing.assert_close(value[has_relevant], torch.ones_like(value[has_relevant]))
        assert (value[~has_relevant] == 0).all()


@given(row=st.lists(st.integers(0, 5), min_size=2, max_size=12), data=st.data())
def test_moving_a_higher_grade_ahead_never_lowers_ndcg_err_rbp(row, data) -> None:
    i = data.draw(st.integers(0, len(row) - 2))
    j = data.draw(st.integers(i + 1, len(row) - 1))
    if row[i] >= row[j]:
        row[i], row[j] = row[j], row[i]  # make position j the higher grade
    better = list(row)
    better[i], better[j] = better[j], better[i]
    before, after = pad([row]), pad([better])
    judged = pad([sorted(row, reverse=True)])
    for fn in (lambda r: M.ndcg(r, None, judged=judged), lambda r: M.ndcg(r, 4, judged=judged),
               lambda r: M.err(r), lambda r: M.err(r, mapping="linear"), lambda r: M.rbp(r, 0.7)):  # fmt: skip
        assert fn(after).item() >= fn(before).item() - 1e-12


@given(evaluation=evaluations(), extra=st.integers(1, 5))
def test_zero_padding_changes_nothing(evaluation, extra) -> None:
    ranked, judged = evaluation
    padded_ranked = torch.cat(
        [ranked, torch.zeros(ranked.shape[0], extra, dtype=ranked.dtype)], dim=1
    )
    padded_judged = torch.cat(
        [judged, torch.zeros(judged.shape[0], extra, dtype=judged.dtype)], dim=1
    )
    before, after = all_metrics(ranked, judged), all_metrics(padded_ranked, padded_judged)
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@given(evaluation=evaluations())
def test_batched_equals_one_query_at_a_time(evaluation) -> None:
    ranked, judged = evaluation
    batched = all_metrics(ranked, judged)
    for q in range(ranked.shape[0]):
        single = all_metrics(ranked[q : q + 1], judged[q : q + 1])
        for name in batched:
            torch.testing.assert_close(single[name], batched[name][q : q + 1], msg=name)


def test_exponential_forms_do_not_overflow_in_fp32() -> None:
    # Grades up to 100 (MarqoGS-10M's score_linear): 2^100 would overflow the fp32 sums' headroom
    # in naive forms; ours scale by 2^-g_max.
    grades = torch.tensor([[100.0, 99.0, 0.0, 97.0, 100.0], [3.0, 100.0, 1.0, 0.0, 0.0]])
    judged = torch.cat([grades, torch.tensor([[100.0, 50.0], [100.0, 2.0]])], dim=1)
    for fn in (
        lambda r, j: M.ndcg(r, 5, judged=j, gain="exponential"),
        lambda r, j: M.err(r, judged=j),
    ):
        got = fn(grades, judged)
        want = fn(grades.double(), judged.double())
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # Against the direct float64 formula for ERR: R = (2^g - 1) / 2^100.
    direct = err_by_definition([100.0, 99.0, 0.0, 97.0, 100.0], 100.0, "exponential")
    assert M.err(grades[:1], judged=judged[:1]).item() == pytest.approx(direct, rel=1e-6)


def test_rbp_and_mrr_simple_values() -> None:
    ranked = torch.tensor([[0.0, 2.0, 1.0]])
    assert M.mrr(ranked).item() == pytest.approx(0.5)
    assert M.mrr(ranked, 1).item() == 0.0
    # (1 - p) (0 + (2/2) p + (1/2) p^2) with p = 0.5
    assert M.rbp(ranked, 0.5).item() == pytest.approx(0.5 * (0.5 + 0.5 * 0.25))


# ------------------------------------------------------------------------------------------
# rank(): the tie rule.
# ------------------------------------------------------------------------------------------


def test_rank_breaks_ties_by_candidate_index_and_puts_masked_last() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    grades = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]])
    assert M.rank(scores, grades).tolist() == [[2.0, 4.0, 1.0, 3.0, 0.0]]
    mask = torch.tensor([[True, False, True, True, True]])
    assert M.rank(scores, grades, mask=mask).tolist() == [[4.0, 1.0, 3.0, 0.0, 0.0]]


@given(data=st.data(), q=st.integers(1, 5), c=st.integers(1, 20))
def test_rank_matches_a_python_sort(data, q, c) -> None:
    scores = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 4), min_size=c, max_size=c),
                                             min_size=q, max_size=q)), dtype=torch.float64)  # fmt: skip
    grades = torch.arange(q * c, dtype=torch.float64).reshape(q, c)
    for row_scores, row_ranked, row_grades in zip(scores, M.rank(scores, grades), grades):
        order = sorted(range(c), key=lambda i: (-row_scores[i].item(), i))
        assert row_ranked.tolist() == [row_grades[i].item() for i in order]


# ------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.ndcg(torch.tensor([[1.0, float("nan")]])), ValueError, "NaN or infinite"),
        (lambda: M.err(torch.tensor([[1.0, -1.0]])), ValueError, "negative grades"),
        (lambda: M.ndcg(torch.ones(2, 3), 0), ValueError, "k must be a positive integer"),
        (lambda: M.recall(torch.ones(2, 3), 2.5, judged=torch.ones(2, 3)), ValueError, "k must be"),
        (lambda: M.ndcg(torch.ones(3)), ValueError, r"shape \(Q, L\)"),
        (
            lambda: M.recall(torch.ones(2, 3), 2, judged=torch.ones(3, 3)),
            ValueError,
            "shape mismatch",
        ),
        (lambda: M.rbp(torch.ones(2, 3), 1.0), ValueError, r"p must lie in \(0, 1\)"),
        (lambda: M.rbp(torch.ones(2, 3), 0.0), ValueError, r"p must lie in \(0, 1\)"),
        (lambda: M.ndcg(torch.ones(2, 3), gain="cubic"), ValueError, "gain must be"),
        (lambda: M.err(torch.ones(2, 3), mapping="cubic"), ValueError, "mapping must be"),
        (lambda: M.err(torch.full((1, 2), 3.0), g_max=2.0), ValueError, "above g_max"),
        (lambda: M.rank(torch.tensor([[1.0, math.nan]]), torch.ones(1, 2)), ValueError, "NaN"),
        (lambda: M.rank(torch.ones(1, 3), torch.ones(1, 2)), ValueError, "shape"),
        (lambda: M.ndcg([[1.0]]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    qrels, run = random_evaluation(5)
    ranked, judged = to_tensors(qrels, run)
    cpu = all_metrics(ranked.float(), judged.float())
    gpu = all_metrics(ranked.float().cuda(), judged.float().cuda())
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], msg=name)
