"""Exact streaming top-k, qrels and evaluate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from params import DEVICE

from gcl_ops import metrics as M
from gcl_ops.retrieval import Qrels, evaluate, topk


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 10, 50, 1000])
@pytest.mark.parametrize("query_block", [None, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_equals_brute_force(chunk_size, query_block, normalize) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(13, 16, generator=generator).to(DEVICE)
    corpus = torch.randn(50, 16, generator=generator).to(DEVICE)
    for k in (1, 5, 50):
        scores, indices = topk(queries, corpus, k, chunk_size=chunk_size, query_block=query_block,
                               normalize=normalize)  # fmt: skip
        full = (F.normalize(queries) @ F.normalize(corpus).T) if normalize else queries @ corpus.T
        want_scores, want_indices = full.topk(k, dim=1)
        torch.testing.assert_close(scores, want_scores)
        assert torch.equal(indices, want_indices)  # random scores: no ties
        # The returned scores are those of the returned documents.
        torch.testing.assert_close(full.gather(1, indices), scores)


@given(data=st.data(), q=st.integers(1, 6), c=st.integers(1, 30), chunk=st.integers(1, 40))
def test_topk_with_ties_orders_them_by_corpus_index(data, q, c, chunk) -> None:
    # Integer-valued embeddings of width 1 and dot products: many exact ties.
    values = data.draw(st.lists(st.integers(-3, 3), min_size=c, max_size=c))
    corpus = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    queries = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=q, max_size=q)),
                           dtype=torch.float64).unsqueeze(1)  # fmt: skip
    k = data.draw(st.integers(1, c))
    scores, indices = topk(queries, corpus, k, chunk_size=chunk, normalize=False)
    full = queries @ corpus.T
    for row_scores, row_indices, row_full in zip(scores, indices, full):
        # Same multiset of top scores as a full sort, and within the list ties by ascending index.
        assert row_scores.tolist() == sorted(row_full.tolist(), reverse=True)[:k]
        pairs = list(zip((-row_scores).tolist(), row_indices.tolist()))
        assert pairs == sorted(pairs)
        torch.testing.assert_close(row_full[row_indices], row_scores)


def test_topk_bad_input() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="k must be an integer"):
        topk(x, x, 5)
    with pytest.raises(ValueError, match="width"):
        topk(x, torch.randn(4, 7), 2)
    with pytest.raises(ValueError, match="floating"):
        topk(x.long(), x, 2)


# ------------------------------------------------------------------------------------------
# Qrels
# ------------------------------------------------------------------------------------------


def small_qrels() -> Qrels:
    # query 0: docs 3 (grade 2), 1 (1); query 1: nothing; query 2: doc 0 (3), doc 5 (0)
    return Qrels.from_arrays([2, 0, 0, 2], [0, 3, 1, 5], [3, 2, 1, 0], num_queries=3)


def test_qrels_layout_lookup_and_judged() -> None:
    qrels = small_qrels()
    assert qrels.offsets.tolist() == [0, 2, 2, 4]
    assert qrels.doc_indices.tolist() == [1, 3, 0, 5]
    indices = torch.tensor([[3, 2, 1], [0, 1, -1], [5, 0, 9]])
    assert qrels.lookup(indices).tolist() == [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    assert qrels.judged().tolist() == [[2.0, 1.0], [0.0, 0.0], [3.0, 0.0]]


@given(data=st.data())
def test_lookup_matches_a_dictionary(data) -> None:
    num_queries = data.draw(st.integers(1, 8))
    num_docs = data.draw(st.integers(1, 30))
    pairs = data.draw(
        st.sets(
            st.tuples(st.integers(0, num_queries - 1), st.integers(0, num_docs - 1)), max_size=60
        )
    )
    grades = data.draw(st.lists(st.integers(0, 5), min_size=len(pairs), max_size=len(pairs)))
    table = {pair: grade for pair, grade in zip(sorted(pairs), grades)}
    qrels = Qrels.from_arrays([p[0] for p in table], [p[1] for p in table], list(table.values()),
                              num_queries=num_queries)  # fmt: skip
    indices = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, num_docs + 2), min_size=5, max_size=5),
                                              min_size=num_queries, max_size=num_queries)))  # fmt: skip
    want = [
        [float(table.get((q, d), 0)) if d >= 0 else 0.0 for d in row]
        for q, row in enumerate(indices.tolist())
    ]
    assert qrels.lookup(indices).tolist() == want


def test_from_table_pandas_and_pyarrow() -> None:
    pandas = pytest.importorskip("pandas")
    pyarrow = pytest.importorskip("pyarrow")
    frame = pandas.DataFrame(
        {"query": ["b", "a", "a", "c"], "product": ["x", "y", "z", "x"], "score": [5, 1, 100, 7]}
    )
    for table in (frame, pyarrow.Table.from_pandas(frame)):
        qrels = Qrels.from_table(table, query="query", doc="product", grade="score")
        assert qrels.query_keys.tolist() == ["a", "b", "c"] and qrels.doc_keys.tolist() == [
            "x",
            "y",
            "z",
        ]
        assert qrels.lookup(torch.tensor([[1, 2], [0, 1], [0, 2]])).tolist() == [
            [1.0, 100.0],
            [5.0, 0.0],
            [7.0, 0.0],
        ]
        # Keys in the order of your embedding matrices.
        ordered = Qrels.from_table(table, query="query", doc="product", grade="score",
                                   query_keys=["c", "b", "a", "d"], doc_keys=["z", "y", "x"])  # fmt: skip
        assert ordered.num_queries == 4
        assert ordered.lookup(torch.tensor([[2], [2], [0], [1]])).tolist() == [
            [7.0],
            [5.0],
            [100.0],
            [0.0],
        ]
    with pytest.raises(ValueError, match="not among the given keys"):
        Qrels.from_table(frame, query="query", doc="product", grade="score", query_keys=["a"])
    with pytest.raises(KeyError, match="no column"):
        Qrels.from_table(frame)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0, 0], [1, 1], [1, 2]), "judged twice"),
        (([0], [1], [-1]), "grades must be finite and >= 0"),
        (([0], [1], [float("nan")]), "grades must be finite"),
        (([0, 1], [1], [1]), "differ in length"),
        (([-1], [1], [1]), ">= 0"),
    ],
)
def test_qrels_bad_input(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        Qrels.from_arrays(*args)


# ------------------------------------------------------------------------------------------
# evaluate()
# ------------------------------------------------------------------------------------------


def test_evaluate_equals_the_metric_functions() -> None:
    rng = np.random.default_rng(0)
    num_queries, num_docs = 20, 80
    q = np.repeat(np.arange(num_queries), 15)
    d = np.concatenate([rng.choice(num_docs, 15, replace=False) for _ in range(num_queries)])
    g = rng.integers(0, 5, size=len(q))
    qrels = Qrels.from_arrays(q, d, g)
    generator = torch.Generator().manual_seed(0)
    _, indices = topk(
        torch.randn(num_queries, 8, generator=generator),
        torch.randn(num_docs, 8, generator=generator),
        30,
    )
    names = [
        "ndcg@10",
        "ndcg_exp@10",
        "err",
        "err@5",
        "err_linear",
        "rbp@0.8",
        "mrr",
        "mrr@3",
        "recall@20",
        "map@10",
    ]
    means, values = evaluate(indices, qrels, names, per_query=True)
    ranked, judged = qrels.lookup(indices), qrels.judged()
    expected = {
        "ndcg@10": M.ndcg(ranked, 10, judged=judged),
        "ndcg_exp@10": M.ndcg(ranked, 10, judged=judged, gain="exponential"),
        "err": M.err(ranked, judged=judged),
        "err@5": M.err(ranked, 5, judged=judged),
        "err_linear": M.err(ranked, judged=judged, mapping="linear"),
        "rbp@0.8": M.rbp(ranked, 0.8, judged=judged),
        "mrr": M.mrr(ranked),
        "mrr@3": M.mrr(ranked, 3),
        "recall@20": M.recall(ranked, 20, judged=judged),
        "map@10": M.average_precision(ranked, 10, judged=judged),
    }
    for name in names:
        torch.testing.assert_close(values[name], expected[name], msg=name)
        assert means[name] == pytest.approx(float(expected[name].mean()))


def test_evaluate_rejects_unknown_metrics_and_mismatched_queries() -> None:
    qrels = small_qrels()
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(torch.zeros(3, 2, dtype=torch.long), qrels, ["ndcg10"])
    with pytest.raises(ValueError, match="needs a cutoff"):
        evaluate(torch.zeros(3, 2, dtype=torch.long), qrels, ["recall"])
    with pytest.raises(ValueError, match="2 queries, the qrels 3"):
        evaluate(torch.zeros(2, 2, dtype=torch.long), qrels)


@pytest.mark.gpu
def test_evaluate_on_gpu_matches_cpu() -> None:
    qrels = small_qrels()
    indices = torch.tensor([[3, 2, 1], [0, 1, 4], [5, 0, 9]])
    cpu = evaluate(indices, qrels, ["ndcg@2", "err", "rbp@0.9", "map@3"])
    gpu = evaluate(indices.cuda(), qrels, ["ndcg@2", "err", "rbp@0.9", "map@3"])
    assert gpu == pytest.approx(cpu)
