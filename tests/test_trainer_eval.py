"""reference_trainer.evaluate: metrics against a brute-force float64 oracle on a fake dataset whose
embeddings the test controls, corpus sharing, single-field documents, judged documents missing
from the corpus, the results table and files; then the real pipeline on a synthetic dataset."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from reference_trainer import evaluate as ev
from reference_trainer.eval_sets import EvalQueries, eval_queries
from reference_trainer.marqo import SPLIT_CORPUS, SPLITS
from reference_trainer.model import ModelBundle

DIM = 8


# ----------------------------------------------------------------------------------------------
# A fake model and dataset: the encoders return vectors the test chose
# ----------------------------------------------------------------------------------------------


class FakeCLIP(nn.Module):
    """``encode_text`` looks up token ``tokens[:, 0]`` in ``table``; ``encode_image`` returns the
    "images", which the fake corpus makes ``(b, DIM)`` vectors."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.head = nn.Linear(DIM, DIM)  # a parameter: the model's device, grad checks
        self.calls: Counter[str] = Counter()
        self.grad_enabled: set[bool] = set()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls["text"] += len(tokens)
        self.grad_enabled.add(torch.is_grad_enabled())
        return self.table[tokens[:, 0]]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["image"] += len(images)
        self.grad_enabled.add(torch.is_grad_enabled())
        return images.clone()


class FakeData:
    """What ``evaluate_model`` reads of a ``MarqoGS``: ``splits`` and ``eval_queries``; the fake
    ``corpus_batches`` below reads ``corpora`` (product id -> (title text, image vector))."""

    def __init__(self, corpora, judgements, skipped=None) -> None:
        self.splits = tuple(judgements)
        self.corpora = corpora
        self.judgements = judgements
        self.skipped = skipped or {}
        self.corpus_calls: list[str] = []
        self.query_calls: list[tuple[str, int, int, bool]] = []

    def eval_queries(
        self, split: str, max_queries: int = 2000, seed: int = 1, *, official_rescale: bool = False
    ) -> EvalQueries:
        self.query_calls.append((split, max_queries, seed, official_rescale))
        return self.judgements[split]


def fake_corpus_batches(dataset, corpus, *, transform, tokenizer, batch_size, num_workers=0):
    dataset.corpus_calls.append(corpus)
    items = list(dataset.corpora[corpus].items())
    skipped = dataset.skipped.get(corpus, 0)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield {
            "product_ids": [product for product, _ in chunk],
            "images": transform(torch.stack([image for _, (_, image) in chunk])),
            "title_tokens": tokenizer([title for _, (title, _) in chunk]),
            "skipped": skipped if start == 0 else 0,
        }


class Vocabulary:
    """Texts -> vectors; the tokenizer maps a text to its row (``(B, 1)`` tokens)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.vectors: list[torch.Tensor] = []

    def add(self, text: str, vector: torch.Tensor) -> str:
        self.rows[text] = len(self.vectors)
        self.vectors.append(vector)
        return text

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.rows[text]] for text in texts])

    def bundle(self) -> ModelBundle:
        model = FakeCLIP(torch.stack(self.vectors))
        return ModelBundle(model, "fake", lambda x: x, lambda x: x, self.tokenizer)


@pytest.fixture
def fake_pipeline(monkeypatch):
    monkeypatch.setattr(ev, "corpus_batches", fake_corpus_batches)
    monkeypatch.setattr(
        ev, "eval_queries", lambda dataset, split, **options: dataset.eval_queries(split, **options)
    )


def random_world(seed: int = 0, *, missing: bool = True):
    """Random title/image/query vectors; corpus_1 of 40 and corpus_2 of 30 products; 6 queries per
    split, each judging 9 products of its corpus (grades 1..100) and, with ``missing``, one
    product that is not in the corpus."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = Vocabulary()
    corpora, judgements = {}, {}
    for corpus, size in (("corpus_1", 40), ("corpus_2", 30)):
        corpora[corpus] = {
            f"{corpus}-p{i}": (
                vocab.add(f"{corpus} title {i}", torch.randn(DIM, generator=generator)),
                torch.randn(DIM, generator=generator),
            )
            for i in range(size)
        }
    for split in SPLITS:
        products = list(corpora[SPLIT_CORPUS[split]])
        queries, rows, judged, grades = [], [], [], []
        for q in range(6):
            queries.append(vocab.add(f"{split} query {q}", torch.randn(DIM, generator=generator)))
            chosen = [products[i] for i in rng.choice(len(products), 9, replace=False)]
            if missing and q % 2 == 0:
                chosen.append(f"{split}-missing-{q}")
            rows += [q] * len(chosen)
            judged += chosen
            grades += rng.integers(1, 101, len(chosen)).tolist()
        judgements[split] = EvalQueries(
            split=split,
            queries=queries,
            query_ids=np.arange(len(queries), dtype=np.int64),
            judged_rows=np.asarray(rows, dtype=np.int64),
            judged_products=judged,
            judged_grades=np.asarray(grades, dtype=np.float32),
        )
    return vocab, FakeData(corpora, judgements)


# ----------------------------------------------------------------------------------------------
# The oracle: brute-force cosine ranking and the metric definitions, in float64
# ----------------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return x.double() / x.double().norm(dim=-1, keepdim=True)


def assert_matches_trec_eval(results, queries, docs, products, judgements, top_k=40) -> None:
    """mAP@1000, MRR@1000 and NDCG@10 of ``results`` equal pytrec_eval's ``map_cut_1000``,
    ``recip_rank`` and ``ndcg_cut_10`` on the same run: the top ``top_k`` cosines per query,
    judged with the (integer) grades."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    scores = (unit(queries) @ unit(docs).T).double()
    top = scores.topk(min(top_k, len(products)), dim=1)
    run = {
        f"q{q}": {products[d]: float(v) for v, d in zip(top.values[q], top.indices[q].tolist())}
        for q in range(len(judgements.queries))
    }
    qrels = {name: {} for name in run}
    for row, product, grade in zip(
        judgements.judged_rows, judgements.judged_products, judgements.judged_grades
    ):
        assert float(grade).is_integer()
        qrels[f"q{row}"][product] = max(int(grade), qrels[f"q{row}"].get(product, 0))
    measures = {"map_cut.1000", "recip_rank", "ndcg_cut.10"}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for ours, name in (("mAP@1000", "map_cut_1000"), ("mrr@1000", "recip_rank"),
                       ("NDCG@10", "ndcg_cut_10")):  # fmt: skip
        mean = sum(theirs[q][name] for q in run) / len(run)
        assert results[ours] == pytest.approx(mean, rel=1e-5, abs=1e-7), ours


def oracle_metrics(queries, docs, products, judgements, *, top_k=1000) -> dict[str, float]:
    """Mean NDCG@10 (linear gain), ERR (exponential) and RBP of the brute-force cosine ranking
    of ``docs (C, d)`` (rows named ``products``) for ``queries (Q, d)``, in float64 loops."""
    queries, docs = unit(queries), unit(docs)
    totals = Counter()
    for q in range(len(judgements.queries)):
        judged = {
            p: float(g)
            for r, p, g in zip(
                judgements.judged_rows, judgements.judged_products, judgements.judged_grades
            )
            if r == q
        }
        scores = (docs @ queries[q]).tolist()
        order = sorted(range(len(products)), key=lambda d: -scores[d])[:top_k]
        ranked = [judged.get(products[d], 0.0) for d in order]
        ideal = sorted(judged.values(), reverse=True)
        g_max = ideal[0]

        def dcg(grades):
            return sum(g / math.log2(i + 2) for i, g in enumerate(grades[:10]))

        hits = [i for i, g in enumerate(ranked) if g > 0]  # every judged document is relevant
        totals["mAP@1000"] += sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(ideal)
        totals["mrr@1000"] += 1 / (hits[0] + 1) if hits else 0.0
        totals["NDCG@10"] += dcg(ranked) / dcg(ideal)
        err, reach = 0.0, 1.0
        for i, g in enumerate(ranked):
            stop = (2.0**g - 1.0) / 2.0**g_max
            err += reach * stop / (i + 1)
            reach *= 1.0 - stop
        totals["mERR"] += err
        for p in (0.7, 0.8, 0.9):
            totals[f"mRBP{int(p * 10)}"] += (1 - p) * sum(
                g / g_max * p**i for i, g in enumerate(ranked)
            )
    return {name: value / len(judgements.queries) for name, value in totals.items()}


def oracle(vocab, data, split, *, doc_gamma=(0.5, 0.5), top_k=1000) -> dict[str, float]:
    """``oracle_metrics`` of the fake world: the vectors the fake encoders return."""
    corpus = data.corpora[SPLIT_CORPUS[split]]
    title = unit(torch.stack([vocab.vectors[vocab.rows[t]] for t, _ in corpus.values()]))
    image = unit(torch.stack([im for _, im in corpus.values()]))
    docs = doc_gamma[0] * title + doc_gamma[1] * image
    judgements = data.judgements[split]
    queries = torch.stack([vocab.vectors[vocab.rows[text]] for text in judgements.queries])
    return oracle_metrics(queries, docs, list(corpus), judgements, top_k=top_k)


def assert_matches(result: dict, expected: dict) -> None:
    assert set(ev.METRICS) == set(expected)
    for name in ev.METRICS:
        assert result[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


# ----------------------------------------------------------------------------------------------
# Tests on the fake
# ----------------------------------------------------------------------------------------------


def test_metrics_match_brute_force(fake_pipeline):
    vocab, data = random_world(0)
    data.skipped = {"corpus_1": 2}
    results = ev.evaluate_model(
        vocab.bundle(), data, top_k=25, max_queries=6, seed=7, batch_size=7, progress=False
    )
    assert list(results) == list(SPLITS)
    # The official protocol's min-max rescaling of the grades is the default.
    assert data.query_calls == [(s, 6, 7, True) for s in SPLITS]
    for split in SPLITS:
        assert_matches(results[split], oracle(vocab, data, split, top_k=25))
        corpus = SPLIT_CORPUS[split]
        assert results[split]["queries"] == 6
        assert results[split]["corpus"] == len(data.corpora[corpus])
        assert results[split]["skipped_images"] == (2 if corpus == "corpus_1" else 0)
        assert results[split]["judged_not_in_corpus"] == 3
    # The cutoff matters for ERR and RBP: the whole list scores higher than its top 25.
    full = ev.evaluate_model(
        vocab.bundle(), data, splits=("zero_shot",), official_rescale=False, progress=False
    )
    assert data.query_calls[-1] == ("zero_shot", 2000, 1, False)
    assert_matches(full["zero_shot"], oracle(vocab, data, "zero_shot"))
    assert full["zero_shot"]["mRBP9"] > results["zero_shot"]["mRBP9"]


def test_each_corpus_is_embedded_once(fake_pipeline):
    vocab, data = random_world(1)
    bundle = vocab.bundle()
    ev.evaluate_model(bundle, data, progress=False)
    assert data.corpus_calls == ["corpus_1", "corpus_2"]
    corpus_docs = sum(len(c) for c in data.corpora.values())
    assert bundle.model.calls == {"image": corpus_docs, "text": corpus_docs + 4 * 6}

    data.corpus_calls.clear()
    results = ev.evaluate_model(bundle, data, splits=("novel_query", "in_domain"), progress=False)
    assert data.corpus_calls == ["corpus_1"]
    assert list(results) == ["novel_query", "in_domain"]


@pytest.mark.parametrize("doc_gamma", [(1.0, 0.0), (0.0, 1.0), (0.2, 0.8)])
def test_document_field_weights(fake_pipeline, doc_gamma):
    vocab, data = random_world(2)
    bundle = vocab.bundle()
    results = ev.evaluate_model(
        bundle, data, splits=("in_domain",), doc_gamma=doc_gamma, progress=False
    )
    assert_matches(results["in_domain"], oracle(vocab, data, "in_domain", doc_gamma=doc_gamma))
    docs, queries = len(data.corpora["corpus_1"]), 6
    assert bundle.model.calls["image"] == (docs if doc_gamma[1] else 0)
    assert bundle.model.calls["text"] == queries + (docs if doc_gamma[0] else 0)


def test_single_fields_rank_differently(fake_pipeline):
    vocab, data = random_world(3)
    title = ev.evaluate_model(
        vocab.bundle(), data, splits=("in_domain",), doc_gamma=(1, 0), progress=False
    )
    image = ev.evaluate_model(
        vocab.bundle(), data, splits=("in_domain",), doc_gamma=(0, 1), progress=False
    )
    assert title["in_domain"]["NDCG@10"] != image["in_domain"]["NDCG@10"]


def test_judged_documents_missing_from_the_corpus_count_in_the_ideal(fake_pipeline):
    # One query; documents a, b, c graded 3, 2, 1 are ranked perfectly (their similarity to the
    # query follows the grade), d is unjudged and last; "gone" (grade 3) is not in the corpus.
    vocab = Vocabulary()
    axis = torch.eye(DIM)
    angles = {"a": 0.1, "b": 0.5, "c": 0.9, "d": 1.4}
    corpus = {
        p: (vocab.add(p, math.cos(t) * axis[0] + math.sin(t) * axis[1]), torch.zeros(DIM))
        for p, t in angles.items()
    }
    vocab.add("query", axis[0])

    def world(judged):
        judgements = EvalQueries(
            "in_domain", ["query"], np.zeros(1, dtype=np.int64),
            np.zeros(len(judged), dtype=np.int64), list(judged),
            np.asarray(list(judged.values()), dtype=np.float32),
        )  # fmt: skip
        return FakeData({"corpus_1": corpus}, {"in_domain": judgements})

    perfect = ev.evaluate_model(
        vocab.bundle(), world({"a": 3, "b": 2, "c": 1}), splits=("in_domain",),
        doc_gamma=(1, 0), progress=False,
    )["in_domain"]  # fmt: skip
    assert perfect["NDCG@10"] == pytest.approx(1.0)
    result = ev.evaluate_model(
        vocab.bundle(), world({"c": 1, "gone": 3, "a": 3, "b": 2}), splits=("in_domain",),
        doc_gamma=(1, 0), progress=False,
    )["in_domain"]  # fmt: skip
    dcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    ideal = 3 + 3 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5)
    assert result["NDCG@10"] == pytest.approx(dcg / ideal)
    assert result["judged_not_in_corpus"] == 1 and result["corpus"] == 4
    # g_max is the top judged grade, here equal with or without the missing document.
    assert result["mERR"] == pytest.approx(perfect["mERR"])
    assert result["mRBP8"] == pytest.approx(0.2 * (3 / 3 + 2 / 3 * 0.8 + 1 / 3 * 0.64))


def test_build_qrels_keeps_the_best_grade_of_a_repeated_pair():
    judgements = EvalQueries(
        "in_domain", ["q0", "q1"], np.arange(2), np.array([0, 0, 1, 0, 1]),
        ["x", "y", "x", "x", "z"], np.array([5, 7, 2, 9, 4], dtype=np.float32),
    )  # fmt: skip
    qrels, absent = ev.build_qrels(judgements, {"x": 0, "y": 1})
    assert absent == 1
    assert qrels.judged().tolist() == [[9, 7], [4, 2]]
    assert qrels.lookup(torch.tensor([[1, 0], [0, 1]])).tolist() == [[7, 9], [2, 0]]
    assert qrels.doc_indices.tolist() == [0, 1, 0, 2]  # "z" (absent) beyond the corpus rows


def test_model_modes_are_restored_and_no_grad(fake_pipeline):
    vocab, data = random_world(4)
    bundle = vocab.bundle()
    bundle.model.train()
    bundle.model.head.eval()
    ev.evaluate_model(bundle, data, splits=("zero_shot",), progress=False)
    assert bundle.model.training and not bundle.model.head.training
    assert bundle.model.grad_enabled == {False}
    wrapped = ModelBundle(nn.DataParallel(bundle.model), "fake", None, lambda x: x, vocab.tokenizer)
    before = ev.evaluate_model(bundle, data, splits=("zero_shot",), progress=False)
    assert ev.evaluate_model(wrapped, data, splits=("zero_shot",), progress=False) == before


def test_bad_arguments(fake_pipeline):
    vocab, data = random_world(5)
    bundle = vocab.bundle()
    data.splits = ("in_domain", "zero_shot")
    for kwargs, message in [
        ({"splits": ("in_domain", "test")}, "unknown \\['test'\\]"),
        ({"splits": ("novel_query",)}, "absent from the dataset \\['novel_query'\\]"),
        ({"doc_gamma": (0.0, 0.0)}, "doc_gamma"),
        ({"doc_gamma": (0.5,)}, "doc_gamma"),
        ({"query_gamma": (0.5, 0.5)}, "query_gamma"),
        ({"top_k": 0}, "top_k"),
        ({"device": "meta"}, "the model is on cpu but device=meta"),
    ]:
        with pytest.raises(ValueError, match=message):
            ev.evaluate_model(bundle, data, splits=kwargs.pop("splits", data.splits), **kwargs)


def test_table_and_files(tmp_path):
    results = {
        split: {
            **{m: 0.1 * i + 0.01 * j + 1 / 3 for j, m in enumerate(ev.METRICS)},
            "queries": 2000 - i,
            "corpus": 100 + i,
            "skipped_images": i,
            "judged_not_in_corpus": 0,
        }  # fmt: skip
        for i, split in enumerate(reversed(SPLITS))
    }
    table = ev.format_table(results).splitlines()
    assert table[0].split() == list(SPLITS)
    assert [line.split()[0] for line in table[1:]] == [*ev.METRICS, *ev.COUNTS]
    assert [line.split()[0] for line in table[1:8]] == [
        "mAP@1000", "mrr@1000", "NDCG@10", "mERR", "mRBP7", "mRBP8", "mRBP9",
    ]  # fmt: skip
    ndcg = table[3].split()[1:]
    assert ndcg == [f"{results[s]['NDCG@10']:.4f}" for s in SPLITS]

    json_path, csv_path = ev.save_results(results, tmp_path / "out" / "eval")
    assert (json_path.name, csv_path.name) == ("eval.json", "eval.csv")
    assert json.loads(json_path.read_text()) == results
    with csv_path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["metric", *SPLITS]
    back = {split: {} for split in SPLITS}
    for name, *values in rows[1:]:
        for split, value in zip(SPLITS, values):
            back[split][name] = int(value) if name in ev.COUNTS else float(value)
    assert back == results
    assert ev.save_results(results, tmp_path / "r.json") == (
        tmp_path / "r.json",
        tmp_path / "r.csv",
    )


# ----------------------------------------------------------------------------------------------
# The real pipeline on a synthetic dataset
# ----------------------------------------------------------------------------------------------


def test_synthetic_dataset_end_to_end(tmp_path):
    """The tiny model (untrained) on a small synthetic dataset, both layouts, with corrupt and
    missing images: the metrics equal the oracle on embeddings computed document by document
    from ``iter_corpus``, and both layouts give the same results."""
    from PIL import Image

    from reference_trainer.marqo import open_dataset
    from reference_trainer.model import TINY_MODEL, create_model
    from reference_trainer.synthetic import make_synthetic

    root = make_synthetic(
        tmp_path / "data", layout="both", queries_per_set=24, products_per_set=60,
        docs_per_query=8, shards_per_split=2, rows_per_group=40, corrupt_images=2,
        missing_images=1,
    )  # fmt: skip
    torch.manual_seed(0)
    bundle = create_model(TINY_MODEL)
    model = bundle.model.eval()
    results = {}
    for layout, workers in (("huggingface", 2), ("csv", 0)):
        dataset = open_dataset(root, layout=layout)
        results[layout] = ev.evaluate_model(
            bundle, dataset, max_queries=16, top_k=40, batch_size=16, num_workers=workers,
            progress=False,
        )  # fmt: skip
    hf, csv_results = results["huggingface"], results["csv"]
    assert list(hf) == list(SPLITS)
    for split in SPLITS:
        assert hf[split]["queries"] == 16
        for name in (*ev.METRICS, *ev.COUNTS):
            assert hf[split][name] == pytest.approx(csv_results[split][name], rel=1e-5), (
                split,
                name,
            )
    assert hf["in_domain"]["skipped_images"] == 3 and hf["zero_shot"]["skipped_images"] == 0

    # The oracle: every document decoded and embedded on its own, straight from iter_corpus.
    dataset = open_dataset(root, layout="huggingface")
    with torch.no_grad():
        for corpus, split in (("corpus_1", "in_domain"), ("corpus_2", "zero_shot")):
            products, docs = [], []
            for document in dataset.iter_corpus(corpus):
                try:  # a missing (None) or corrupt image: the document is not in the corpus
                    image = Image.open(io.BytesIO(document.image or b"")).convert("RGB")
                except OSError:
                    continue
                pixels = bundle.preprocess_val(image)[None]
                title = model.encode_text(bundle.tokenizer([document.title]))
                docs.append(unit(title[0]) + unit(model.encode_image(pixels)[0]))
                products.append(document.product_id)
            judgements = eval_queries(dataset, split, max_queries=16, official_rescale=True)
            queries = model.encode_text(bundle.tokenizer(judgements.queries))
            expected = oracle_metrics(queries, torch.stack(docs), products, judgements, top_k=40)
            assert hf[split]["corpus"] == len(products)
            assert_matches(hf[split], expected)
            assert_matches_trec_eval(hf[split], queries, torch.stack(docs), products, judgements)
            for name in ev.METRICS:
                assert 0 <= hf[split][name] <= 1
