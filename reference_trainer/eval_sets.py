"""Evaluation sets of MarqoGS-10M: the official sample of a split's queries with their graded
judgements, and a corpus in batches for embedding.

Evaluation queries (``eval_queries``)
---------------------------------------------
As ``get_test_queries`` in the official ``evals/eval_gs_v1.py``: group the split's rows by query
text, sum ``score_linear`` per query, and draw ``max_queries`` queries without replacement with
probability proportional to the sums, ``numpy.random.RandomState(seed)`` (seed 1), over the
queries in the order pandas' ``groupby`` sorts the official grouping key (the text followed by
``"_{!@#~}_"``). This is the draw of pandas ``DataFrame.sample(n, weights=..., random_state=1)``,
so the same queries come out. A split with at most ``max_queries`` queries keeps all of them.
Judgements are the split's rows of the drawn queries, graded by ``score_linear``.
``official_rescale=True`` also applies the official min-max rescaling
``int((s - min) / (max - min) * 99 + 1)`` (which maps 28, 55 and 60 to 27, 54 and 59 when the
split spans 1..100) to the sampling weights and grades.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from reference_trainer.marqo import (
    OFFICIAL_QUERY_KEY_SUFFIX,
    DataError,
    MarqoGS,
    Piece,
    decode_rows,
    stable_ids,
    tokenize,
)


@dataclass
class EvalQueries:
    """The sampled queries of one split and their graded judgements (J rows)."""

    split: str
    queries: list[str]  # (Q,) query texts, row q
    query_ids: np.ndarray  # (Q,) int64
    judged_rows: np.ndarray  # (J,) int64 query row of each judgement
    judged_products: list[str]  # (J,) product id of each judgement
    judged_grades: np.ndarray  # (J,) float32 grade (score_linear)


def eval_queries(
    dataset: MarqoGS,
    split: str,
    max_queries: int = 2000,
    seed: int = 1,
    *,
    official_rescale: bool = False,
) -> EvalQueries:
    """The official evaluation sample of ``split`` (see the module docstring): at most
    ``max_queries`` queries drawn without replacement, with probability proportional to their
    summed ``score_linear``; judgements graded by ``score_linear`` (or its official rescaling)."""
    if max_queries < 1:
        raise DataError(f"max_queries must be positive, got {max_queries}")
    pieces = dataset.pieces(split)
    grade = _official_rescaler(dataset, pieces) if official_rescale else (lambda scores: scores)
    sums: dict[str, float] = {}
    for piece in pieces:  # pass 1: the summed grade of every query text
        table = dataset.read_piece(piece, ("query", "score_linear"))
        table = table.set_column(
            1, "score_linear", pa.array(grade(table["score_linear"].to_numpy()))
        )
        summed = table.group_by("query", use_threads=False).aggregate([("score_linear", "sum")])
        for query, total in zip(
            summed["query"].to_pylist(), summed["score_linear_sum"].to_pylist()
        ):
            sums[query] = sums.get(query, 0.0) + total
    texts = sorted(sums, key=lambda q: q + OFFICIAL_QUERY_KEY_SUFFIX)  # pandas groupby's order
    weights = np.array([sums[q] for q in texts], np.float64)
    drawn = np.arange(len(texts))
    if len(texts) > max_queries:  # as DataFrame.sample(n, weights=w, random_state=seed) draws
        p = weights / weights.sum()
        drawn = np.random.RandomState(seed).choice(len(texts), max_queries, replace=False, p=p)
    drawn = drawn[np.argsort(-weights[drawn], kind="stable")]  # heaviest first, as the official
    queries = [texts[i] for i in drawn]
    row_of = {q: r for r, q in enumerate(queries)}
    query_ids = np.zeros(len(queries), np.int64)
    grades: dict[tuple[int, str], float] = {}
    wanted = pa.array(queries, pa.string())
    for piece in pieces:  # pass 2: the judgements of the drawn queries
        table = dataset.read_piece(piece, ("query", "product_id", "score_linear", "query_id"))
        table = table.filter(pc.is_in(table["query"], value_set=wanted))
        columns = [table[c].to_pylist() for c in ("query", "product_id", "query_id")]
        for query, product, query_id, value in zip(
            *columns, grade(table["score_linear"].to_numpy())
        ):
            row = row_of[query]
            query_ids[row] = query_id
            grades[row, product] = max(grades.get((row, product), 0.0), float(value))
    pairs = sorted(grades, key=lambda pair: (pair[0], -grades[pair], pair[1]))
    return EvalQueries(
        split=split,
        queries=queries,
        query_ids=query_ids,
        judged_rows=np.array([row for row, _ in pairs], np.int64),
        judged_products=[product for _, product in pairs],
        judged_grades=np.array([grades[pair] for pair in pairs], np.float32),
    )


def _official_rescaler(dataset: MarqoGS, pieces: list[Piece]) -> Callable[[np.ndarray], np.ndarray]:
    """The official min-max rescaling over the split, ``int((s - min) / (max - min) * 99 + 1)``
    in float64 as pandas computes it (every grade 1 when all scores are equal)."""
    scores = [dataset.read_piece(p, ("score_linear",))["score_linear"].to_numpy() for p in pieces]
    low = min(s.min(initial=np.inf) for s in scores)
    high = max(s.max(initial=-np.inf) for s in scores)
    if low == high:
        return np.ones_like
    return lambda s: np.floor((s - low) / (high - low) * 99 + 1)


class _CorpusStream(torch.utils.data.IterableDataset):
    """A corpus in batches; of ``K`` workers, worker ``k`` reads parts ``k, k + K, ...``."""

    def __init__(
        self,
        dataset: MarqoGS,
        corpus: str,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.transform, self.tokenizer = dataset, transform, tokenizer
        self.batch_size = batch_size
        self.parts = dataset.corpus_parts(corpus, documents_per_part=8 * batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pending: list[pa.Table] = []
        for part in self.parts[worker::workers]:
            pending.append(self.dataset.read_corpus_part(part))
            while sum(t.num_rows for t in pending) >= self.batch_size:
                table = pa.concat_tables(pending)
                pending = [table.slice(self.batch_size)]
                yield self._batch(table.slice(0, self.batch_size))
        if sum(t.num_rows for t in pending):
            yield self._batch(pa.concat_tables(pending))

    def _batch(self, rows: pa.Table) -> dict[str, Any]:
        images, rows, skipped = decode_rows(self.dataset, rows, self.transform)
        product_ids = rows["product_id"].to_pylist()
        return {
            "product_ids": product_ids,
            "doc_ids": torch.from_numpy(stable_ids(product_ids)),
            "images": images,
            "title_tokens": tokenize(self.tokenizer, rows["title"].to_pylist()),
            "skipped": skipped,
        }


def corpus_batches(
    dataset: MarqoGS,
    corpus: str,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], Any],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """The corpus's documents in batches of at most ``batch_size``, each document once (with
    workers the batches interleave: not ``iter_corpus``'s order). Dicts: ``product_ids`` (b
    str), ``doc_ids`` (b,) int64, ``images`` (b, 3, H, W), ``title_tokens`` (b, L) int64 and
    ``skipped`` (documents dropped for a missing or unreadable image)."""
    stream = _CorpusStream(dataset, corpus, transform, tokenizer, batch_size)
    if num_workers == 0:
        yield from stream
    else:
        yield from torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
