"""GradedRetrievalEvaluator (gcl_ops.st_evaluation) on the tiny offline BERT of
test_sentence_transformers: metrics against pytrec_eval and a plain-Python ERR/RBP on the
evaluator's own run, a perfect model, input errors, and a SentenceTransformerTrainer run that
selects its best checkpoint by the evaluator's primary metric. Needs the ``st`` extra.
"""

from __future__ import annotations

import os

# Nothing may be downloaded: the hub is never contacted (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import pytrec_eval  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from test_sentence_transformers import (  # noqa: E402
    WORDS,
    RecordingGCLLoss,
    build_model_dir,
    load_model,
)

from gcl_ops.st_evaluation import GradedRetrievalEvaluator  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny_bert"))


def texts(n: int, seed: int) -> list[str]:
    """``n`` distinct sentences of 2 to 6 vocabulary words."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        if text not in out:
            out.append(text)
    return out


def graded_case(seed: int, num_queries: int = 12, num_docs: int = 40):
    """Queries, a corpus and graded qrels (integer grades 1..100, 1 to 8 relevant documents per
    query, and up to 2 judged non-relevant ones, grade 0), plus one query without judgements,
    which the evaluator skips."""
    rng = random.Random(seed)
    sentences = texts(num_queries + 1 + num_docs, seed)
    queries = {f"q{i}": sentences[i] for i in range(num_queries + 1)}
    corpus = {f"d{i}": sentences[num_queries + 1 + i] for i in range(num_docs)}
    qrels = {
        f"q{i}": {d: rng.randint(1, 100) for d in rng.sample(list(corpus), rng.randint(1, 8))}
        for i in range(num_queries)
    }
    zeros = random.Random(seed + 1)  # its own stream: the relevant documents stay as they are
    for judged in qrels.values():
        for doc_id in zeros.sample([d for d in corpus if d not in judged], zeros.randint(0, 2)):
            judged[doc_id] = 0
    return queries, corpus, qrels


def plain_err(grades: list[float], top: float) -> float:
    """ERR with R(g) = (2^g - 1) / 2^g_max over the whole list (CONTRACT section 7)."""
    total, reach = 0.0, 1.0
    for rank, g in enumerate(grades, start=1):
        stop = (2.0**g - 1.0) / 2.0**top
        total += reach * stop / rank
        reach *= 1.0 - stop
    return total


def plain_rbp(grades: list[float], top: float, p: float) -> float:
    return (1 - p) * sum(g / top * p**i for i, g in enumerate(grades))


# ----------------------------------------------------------------------------------------------
# Metrics against pytrec_eval on the evaluator's own run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_pytrec_eval_on_the_run(model_dir, seed: int) -> None:
    queries, corpus, qrels = graded_case(seed)
    model = load_model(model_dir)
    # retrieve_k defaults to 100, above the 40 documents: the run holds the whole corpus, so
    # mrr@100 has no effective cutoff, like trec_eval's recip_rank.
    evaluator = GradedRetrievalEvaluator(
        queries, corpus, qrels, ndcg_at_k=(5, 10), mrr_at_k=(10, 100), map_at_k=(10, 100),
        recall_at_k=(10, 20), rbp_p=(0.8, 0.95), err_at_k=(10,), batch_size=5, name="dev",
    )  # fmt: skip
    run = evaluator.retrieve(model)
    assert list(run) == [q for q in queries if q in qrels]  # the unjudged query is skipped
    for docs in run.values():
        assert set(docs) == set(corpus)
        assert len(set(docs.values())) == len(docs)  # no ties: the order is the same for both

    got = evaluator(model)
    assert evaluator.primary_metric == "dev_ndcg@10"
    assert list(got) == ["dev_" + m for m in evaluator.metric_names]

    measures = {"ndcg_cut_5", "ndcg_cut_10", "map_cut_10", "map_cut_100", "recall_10",
                "recall_20", "recip_rank", "P_10"}  # fmt: skip
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert set(per_query) == set(qrels)

    def theirs(measure: str) -> float:
        return sum(v[measure] for v in per_query.values()) / len(per_query)

    pairs = {"ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10", "map@10": "map_cut_10",
             "map@100": "map_cut_100", "recall@10": "recall_10", "recall@20": "recall_20",
             "mrr@100": "recip_rank"}  # fmt: skip
    for ours, measure in pairs.items():
        assert got[f"dev_{ours}"] == pytest.approx(theirs(measure), abs=1e-6), ours
    assert 0 < got["dev_ndcg@10"] < 1  # a random model: neither trivial extreme

    # MRR@10 from the ranked list; ERR and RBP from the CONTRACT formulas in plain Python.
    ranked = {q: [qrels[q].get(d, 0) for d in sorted(run[q], key=run[q].get, reverse=True)]
              for q in run}  # fmt: skip

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    first = {q: next((i for i, g in enumerate(r, 1) if g > 0), math.inf) for q, r in ranked.items()}
    want = {
        "mrr@10": mean(1 / f if f <= 10 else 0.0 for f in first.values()),
        "err": mean(plain_err(r, max(qrels[q].values())) for q, r in ranked.items()),
        "err@10": mean(plain_err(r[:10], max(qrels[q].values())) for q, r in ranked.items()),
        "rbp@0.8": mean(plain_rbp(r, max(qrels[q].values()), 0.8) for q, r in ranked.items()),
        "rbp@0.95": mean(plain_rbp(r, max(qrels[q].values()), 0.95) for q, r in ranked.items()),
    }
    for metric, value in want.items():
        assert got[f"dev_{metric}"] == pytest.approx(value, abs=1e-6), metric


def test_retrieve_k_caps_the_run_and_chunks_do_not_matter(model_dir) -> None:
    queries, corpus, qrels = graded_case(2)
    model = load_model(model_dir)
    options = {"mrr_at_k": (5,), "recall_at_k": (10,), "map_at_k": (10,), "retrieve_k": 12}
    whole = GradedRetrievalEvaluator(queries, corpus, qrels, **options)
    chunked = GradedRetrievalEvaluator(queries, corpus, qrels, **options, corpus_chunk_size=7)
    run = whole.retrieve(model)
    assert all(len(docs) == 12 for docs in run.values())
    chunked_run = chunked.retrieve(model)
    for q, docs in run.items():  # the same ranking; scores to rounding (other matmul shapes)
        assert list(chunked_run[q]) == list(docs)
        assert list(chunked_run[q].values()) == pytest.approx(list(docs.values()), abs=1e-12)
    assert chunked(model) == pytest.approx(whole(model), abs=1e-12)
    # The 12 best of the full ranking: the retrieved documents are the top of the whole corpus.
    # (retrieve_k = the corpus size is accepted below the default cutoff 100 of map@100.)
    full = GradedRetrievalEvaluator(queries, corpus, qrels, retrieve_k=len(corpus)).retrieve(model)
    for q, docs in run.items():
        assert list(docs) == list(full[q])[:12]


# ----------------------------------------------------------------------------------------------
# A perfect model, the CSV, the configuration
# ----------------------------------------------------------------------------------------------


def test_a_query_finds_its_own_text_first(model_dir, tmp_path) -> None:
    # The top-graded document of each query is the query's own text: cosine 1, rank 1.
    queries, corpus, qrels = graded_case(3, num_queries=8)
    for q, judged in qrels.items():
        corpus[max(judged, key=judged.get)] = queries[q]
    assert len(set(corpus.values())) == len(corpus)
    evaluator = GradedRetrievalEvaluator(queries, corpus, qrels, mrr_at_k=(1, 10), name="perfect")
    metrics = evaluator(load_model(model_dir), output_path=str(tmp_path), epoch=1, steps=7)
    assert metrics["perfect_mrr@1"] == pytest.approx(1.0)
    assert metrics["perfect_mrr@10"] == pytest.approx(1.0)
    # ERR stops at rank 1 with probability (2^g_max - 1) / 2^g_max, at least 1/2 for g_max >= 1.
    assert metrics["perfect_err"] >= 0.5

    # One CSV row per call, in metric_names order, after a header.
    evaluator(load_model(model_dir), output_path=str(tmp_path), epoch=2, steps=9)
    with open(tmp_path / "Graded-Retrieval_evaluation_perfect_results.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["epoch", "steps", *evaluator.metric_names]
    assert [row[:2] for row in rows[1:]] == [["1", "7"], ["2", "9"]]
    assert [float(v) for v in rows[1][2:]] == pytest.approx(list(metrics.values()))

    assert evaluator.get_config_dict() == {"retrieve_k": 100, "similarity": "cosine"}


def test_metric_names_and_primary_metric() -> None:
    queries, corpus, qrels = {"q": "a cat"}, {"d": "a dog", "e": "a bird"}, {"q": {"d": 3}}
    evaluator = GradedRetrievalEvaluator(queries, corpus, qrels)
    assert evaluator.metric_names == ["ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100",
                                      "err", "rbp@0.8"]  # fmt: skip
    assert evaluator.primary_metric == "ndcg@10" and evaluator.greater_is_better
    named = GradedRetrievalEvaluator(
        queries, corpus, qrels, name="val", ndcg_at_k=(3, 20), rbp_p=(0.5,), err=False,
        primary_metric="rbp@0.5",
    )  # fmt: skip
    assert "err" not in named.metric_names and named.primary_metric == "val_rbp@0.5"
    assert GradedRetrievalEvaluator(queries, corpus, qrels, ndcg_at_k=(3, 20)).primary_metric == (
        "ndcg@20"
    )
    assert GradedRetrievalEvaluator(
        queries, corpus, qrels, name="val", primary_metric="val_mrr@10"
    ).primary_metric == "val_mrr@10"  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Malformed input
# ----------------------------------------------------------------------------------------------

Q, C = {"q1": "a cat", "q2": "a dog"}, {"d1": "the cat", "d2": "the dog"}


@pytest.mark.parametrize(
    ("queries", "corpus", "qrels", "options", "error", "match"),
    [
        ({}, C, {}, {}, ValueError, "queries is empty"),
        (Q, {}, {"q1": {"d1": 1}}, {}, ValueError, "corpus is empty"),
        (Q, C, {"q3": {"d1": 1}}, {}, ValueError, "query 'q3', which is not in queries"),
        (Q, C, {"q1": {"d9": 1}}, {}, ValueError, r"\['q1'\] judges document 'd9'.*not in corpus"),
        (Q, C, {"q1": {"d1": -2.5}}, {}, ValueError, r"\['q1'\]\['d1'\] = -2.5: .*>= 0"),
        (Q, C, {"q1": {"d1": math.nan}}, {}, ValueError, "must be finite and >= 0"),
        (Q, C, {"q1": {"d1": math.inf}}, {}, ValueError, "must be finite and >= 0"),
        (Q, C, {"q1": {"d1": "3"}}, {}, TypeError, r"must be a number .*got '3' of type str"),
        (Q, C, {"q1": {"d1": True}}, {}, TypeError, "must be a number"),
        (Q, C, {"q1": {"d1": 1}}, {"primary_metric": "ndcg@5"}, ValueError,
         "primary_metric 'ndcg@5' is not among the computed metrics"),
        (Q, C, {"q1": {"d1": 1}}, {"primary_metric": "accuracy"}, ValueError, "'accuracy'"),
        (Q, C, {"q1": {}}, {}, ValueError, "no query in queries has a judged document"),
        (Q, C, {"q1": {"d1": 1}}, {"ndcg_at_k": (0,)}, ValueError, "ndcg_at_k must hold positive"),
        (Q, C, {"q1": {"d1": 1}}, {"rbp_p": (1.0,)}, ValueError, r"rbp_p .*\(0, 1\), got 1.0"),
        (Q, {f"d{i}": f"the {w}" for i, w in enumerate(WORDS)}, {"q1": {"d1": 1}},
         {"retrieve_k": 40}, ValueError, "retrieve_k=40 is below the largest cutoff 100"),
        (Q, C, {"q1": {"d1": 1}}, {"batch_size": 0}, ValueError, "batch_size must be a positive"),
        (Q, C, {"q1": {"d1": 1}}, {"similarity": "l2"}, ValueError, "similarity must be"),
    ],
)  # fmt: skip
def test_malformed_input_is_refused(queries, corpus, qrels, options, error, match) -> None:
    with pytest.raises(error, match=match):
        GradedRetrievalEvaluator(queries, corpus, qrels, **options)


# ----------------------------------------------------------------------------------------------
# Inside SentenceTransformerTrainer
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_selects_the_best_checkpoint_by_the_evaluator(model_dir, tmp_path) -> None:
    import datasets
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    queries, corpus, qrels = graded_case(4, num_queries=10, num_docs=30)
    # Training rows (anchor, positive, negative, score): each query with its judged documents,
    # scored by their grades, and a hard negative: a document the query has no judgement for.
    unjudged = {q: [d for d in corpus if d not in qrels[q]] for q in qrels}
    pairs = [
        (queries[q], corpus[d], corpus[unjudged[q][i % len(unjudged[q])]], float(g))
        for q in qrels
        for i, (d, g) in enumerate((d, g) for d, g in qrels[q].items() if g > 0)
    ]
    # The dev judgements give each query the training documents of the next query instead, so
    # training lowers the dev metric: the best checkpoint is an early one, not the final weights.
    ids = list(qrels)
    dev = {
        q: {d: g for d, g in qrels[ids[(i + 1) % len(ids)]].items() if g > 0 and d not in qrels[q]}
        for i, q in enumerate(ids)
    }
    evaluator = GradedRetrievalEvaluator(queries, corpus, dev, name="dev", mrr_at_k=(10,))
    anchor, positive, negative, score = map(list, zip(*pairs))
    dataset = datasets.Dataset.from_dict(
        {"anchor": anchor, "positive": positive, "negative": negative, "score": score}
    )

    model = load_model(model_dir, torch.float32)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6,
        learning_rate=1e-2, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True,
        metric_for_best_model=evaluator.primary_metric, report_to="none", seed=0, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    loss = RecordingGCLLoss(model)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator
    )
    trainer.train()
    # anchor, positive and the hard negative at every step
    assert [call["columns"] for call in loss.calls] == [3] * 6

    # Every evaluation logged every metric, under the trainer's "eval_" prefix.
    evaluations = [e for e in trainer.state.log_history if "eval_dev_ndcg@10" in e]
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    for entry in evaluations:
        assert {f"eval_dev_{m}" for m in evaluator.metric_names} <= set(entry)
    primary = [e[f"eval_{evaluator.primary_metric}"] for e in evaluations]
    assert trainer.state.best_metric == max(primary)
    best_step = evaluations[primary.index(max(primary))]["step"]
    assert best_step < 6  # load_best_model_at_end has something to do
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")

    # The best checkpoint's weights were loaded, and score what the trainer logged for them.
    best = SentenceTransformer(trainer.state.best_model_checkpoint, device="cpu")
    loaded, saved = model.state_dict(), best.state_dict()
    assert loaded.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)
    final = evaluator(model)
    assert final[evaluator.primary_metric] == pytest.approx(max(primary), abs=1e-6)

    # The model card holds the evaluator's metrics (the last call's).
    assert model.model_card_data.eval_results_dict[evaluator] == final

    # Saved and reloaded, the model scores the same.
    model.save(str(tmp_path / "model"))
    assert evaluator.primary_metric in (tmp_path / "model" / "README.md").read_text()
    reloaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert evaluator(reloaded) == pytest.approx(final, abs=1e-6)
    # The CSV under output_dir/eval has one row per evaluation.
    with open(tmp_path / "out" / "eval" / evaluator.csv_file) as file:
        assert [row[1] for row in list(csv.reader(file))[1:]] == ["2", "4", "6"]
