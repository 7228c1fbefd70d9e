"""Exact streaming top-k retrieval, relevance judgements (qrels) and batched evaluation.

* ``topk(queries, corpus, k)``: exact cosine (or dot-product) top-k over a corpus, streaming the
  corpus in chunks and merging, so that at most ``query_block x chunk`` scores exist at a time.
* ``Qrels``: the judged ``(query, document, grade)`` triples in a compact CSR layout (one sorted
  run of documents per query), built from arrays or from a pandas/pyarrow table;
  ``lookup(indices)`` turns retrieved document indices into ranked grades, ``judged()`` gives
  every query's judged grades.
* ``evaluate(indices, qrels, metrics)``: metric means (and per-query values) from top-k indices.

Queries and documents are identified by their *indices*: row ``q`` of the query matrix and row
``d`` of the corpus. ``Qrels.from_table`` maps arbitrary ids to indices and keeps the id order.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gcl_ops import metrics as M

#: Scores of at most this many (query, document) pairs exist at once in ``topk`` by default.
SCORE_BLOCK_ELEMENTS = 1 << 24


def topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    query_block: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` documents of each query by cosine similarity (or dot product).

    The corpus streams through in chunks of ``chunk_size`` rows; each chunk's scores are merged
    with the running best ``k``, so memory is ``O(query_block * (chunk_size + k))``. Scores are
    computed in fp32 (fp64 for fp64 inputs).

    Tie rule: within the returned list, equal scores are ordered by ascending corpus index;
    which of several documents tied at the ``k``-th score is kept is unspecified.

    Args:
        queries: ``(Q, d)`` query embeddings.
        corpus: ``(C, d)`` document embeddings, on the same device.
        k: documents per query, ``1 <= k <= C``.
        chunk_size: corpus rows per chunk (default: as many as keep ``query_block x chunk`` within
            2^24 scores, at least ``k``).
        query_block: queries per block (default all, or what keeps blocks within 2^24 scores).
        normalize: cosine similarity (default) or raw dot product.

    Returns:
        ``scores (Q, k)`` in descending order and ``indices (Q, k)`` (int64 corpus rows).

    Equivalent PyTorch: ``torch.topk(F.normalize(queries) @ F.normalize(corpus).T, k)``.
    """
    for name, x in (("queries", queries), ("corpus", corpus)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating (rows, d) tensor")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have width {queries.shape[1]} but corpus {corpus.shape[1]}")
    if queries.device != corpus.device:
        raise ValueError(f"queries are on {queries.device} but corpus on {corpus.device}")
    num_docs = corpus.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_docs:
        raise ValueError(f"k must be an integer in [1, corpus size = {num_docs}], got {k!r}")
    dtype = torch.float64 if torch.float64 in (queries.dtype, corpus.dtype) else torch.float32
    if chunk_size is None:
        chunk_size = max(k, SCORE_BLOCK_ELEMENTS // max(1, min(queries.shape[0], 4096)))
    if query_block is None:
        query_block = max(1, SCORE_BLOCK_ELEMENTS // chunk_size)
    if chunk_size < 1 or query_block < 1:
        raise ValueError("chunk_size and query_block must be positive")

    best_scores, best_indices = [], []
    for q_start in range(0, queries.shape[0], query_block):
        block = queries[q_start : q_start + query_block].to(dtype)
        if normalize:
            block = F.normalize(block, dim=-1)
        scores = block.new_full((block.shape[0], 0), float("-inf"))
        indices = torch.empty((block.shape[0], 0), dtype=torch.int64, device=block.device)
        for c_start in range(0, num_docs, chunk_size):
            chunk = corpus[c_start : c_start + chunk_size].to(dtype)
            if normalize:
                chunk = F.normalize(chunk, dim=-1)
            chunk_scores = block @ chunk.T
            chunk_indices = torch.arange(c_start, c_start + chunk.shape[0], device=block.device)
            # Merge: the best k of (running best, this chunk).
            scores = torch.cat([scores, chunk_scores], dim=1)
            indices = torch.cat([indices, chunk_indices.expand(block.shape[0], -1)], dim=1)
            scores, position = scores.topk(min(k, scores.shape[1]), dim=1)
            indices = indices.gather(1, position)
        # Order ties by corpus index: sort by index, then stably by descending score.
        by_index = indices.argsort(dim=1)
        scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
        order = scores.sort(dim=1, descending=True, stable=True).indices
        best_scores.append(scores.gather(1, order))
        best_indices.append(indices.gather(1, order))
    return torch.cat(best_scores), torch.cat(best_indices)


@dataclasses.dataclass(frozen=True)
class Qrels:
    """Relevance judgements in CSR form: query ``q``'s judged documents are
    ``doc_indices[offsets[q]:offsets[q + 1]]`` (ascending) with grades ``grades[...]``.

    Attributes:
        offsets: ``(Q + 1,)`` int64 row pointers.
        doc_indices: ``(nnz,)`` int64 corpus rows, ascending within each query.
        grades: ``(nnz,)`` float32 grades, ``>= 0``.
        query_keys, doc_keys: the original ids of query ``q`` / document ``d`` when built from a
            table (``from_table``), else None.
    """

    offsets: torch.Tensor
    doc_indices: torch.Tensor
    grades: torch.Tensor
    query_keys: np.ndarray | None = None
    doc_keys: np.ndarray | None = None

    @property
    def num_queries(self) -> int:
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @classmethod
    def from_arrays(
        cls,
        query_indices: Any,
        doc_indices: Any,
        grades: Any,
        *,
        num_queries: int | None = None,
        device: torch.device | str | None = None,
    ) -> Qrels:
        """Build from parallel arrays of query rows, corpus rows and grades (any order).

        ``num_queries`` (default ``max(query_indices) + 1``) sets ``Q``; queries without a
        judgement get an empty run. Duplicate ``(query, document)`` pairs are refused.
        """
        q = torch.as_tensor(np.asarray(query_indices), dtype=torch.int64).reshape(-1)
        d = torch.as_tensor(np.asarray(doc_indices), dtype=torch.int64).reshape(-1)
        g = torch.as_tensor(np.asarray(grades, dtype=np.float32)).reshape(-1)
        if not q.numel() == d.numel() == g.numel():
            raise ValueError(
                "query_indices, doc_indices and grades differ in length: "
                f"{q.numel()}, {d.numel()}, {g.numel()}"
            )
        if q.numel() and (int(q.min()) < 0 or int(d.min()) < 0):
            raise ValueError("query and document indices must be >= 0")
        if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
            raise ValueError("grades must be finite and >= 0")
        count = int(q.max()) + 1 if q.numel() else 0
        num_queries = count if num_queries is None else num_queries
        if num_queries < count:
            raise ValueError(f"num_queries={num_queries} but a query index is {count - 1}")
        # Sort by query, then document: one stable sort of the key q * D + d.
        keys = q * (int(d.max()) + 1 if d.numel() else 1) + d
        keys, order = torch.sort(keys, stable=True)
        q, d, g = q[order], d[order], g[order]
        if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise ValueError("a (query, document) pair is judged twice")
        offsets = torch.zeros(num_queries + 1, dtype=torch.int64)
        offsets[1:] = torch.bincount(q, minlength=num_queries).cumsum(0)
        qrels = cls(offsets, d, g)
        return qrels if device is None else qrels.to(device)

    @classmethod
    def from_table(
        cls,
        table: Any,
        *,
        query: str = "query_id",
        doc: str = "doc_id",
        grade: str = "grade",
        query_keys: Sequence | np.ndarray | None = None,
        doc_keys: Sequence | np.ndarray | None = None,
        device: torch.device | str | None = None,
    ) -> Qrels:
        """Build from a pandas DataFrame or a pyarrow Table with id and grade columns.

        ``query_keys`` / ``doc_keys`` give the id of each query row / corpus row (the order of
        your embedding matrices); by default the sorted unique ids of the table. Rows whose ids
        are not among the keys are refused. The keys are kept on the result.
        """
        columns = {}
        for name in (query, doc, grade):
            if hasattr(table, "column_names"):  # pyarrow
                if name not in table.column_names:
                    raise KeyError(f"the table has no column {name!r}")
                columns[name] = table.column(name).to_numpy()
            else:  # pandas
                if name not in table.columns:
                    raise KeyError(f"the table has no column {name!r}")
                columns[name] = table[name].to_numpy()
        indices = []
        keys_out = []
        for column, keys in ((columns[query], query_keys), (columns[doc], doc_keys)):
            keys = np.unique(column) if keys is None else np.asarray(keys)
            order = np.argsort(keys, kind="stable")
            position = np.searchsorted(keys[order], column)
            position = np.clip(position, 0, max(len(keys) - 1, 0))
            found = len(keys) > 0 and np.array_equal(keys[order][position], column)
            if not found:
                raise ValueError("the table holds an id that is not among the given keys")
            indices.append(order[position])
            keys_out.append(keys)
        built = cls.from_arrays(
            indices[0], indices[1], columns[grade], num_queries=len(keys_out[0])
        )
        built = dataclasses.replace(built, query_keys=keys_out[0], doc_keys=keys_out[1])
        return built if device is None else built.to(device)

    def to(self, device: torch.device | str) -> Qrels:
        if torch.device(device) == self.device:
            return self
        return dataclasses.replace(
            self, offsets=self.offsets.to(device), doc_indices=self.doc_indices.to(device),
            grades=self.grades.to(device),
        )  # fmt: skip

    def _query_of_each(self) -> torch.Tensor:
        lengths = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_queries, device=self.device), lengths)

    @functools.cached_property
    def _dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(docs, grades)``, both ``(Q, R)`` with ``R`` the most judgements of a query: each
        query's documents ascending, padded with the largest int64 (grade 0). Built once."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        width = int(lengths.max()) if lengths.numel() else 0
        docs = torch.full(
            (self.num_queries, width), torch.iinfo(torch.int64).max, device=self.device
        )
        grades = torch.zeros(self.num_queries, width, dtype=torch.float32, device=self.device)
        if self.grades.numel():
            query = self._query_of_each()
            column = torch.arange(self.grades.numel(), device=self.device) - self.offsets[query]
            docs[query, column] = self.doc_indices
            grades[query, column] = self.grades
        return docs, grades

    @functools.cached_property
    def _judged(self) -> torch.Tensor:
        return self._dense[1].sort(dim=1, descending=True).values

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Grades of retrieved documents: ``indices (Q, L)`` corpus rows of queries ``0..Q-1`` (a
        negative index is padding) -> ``(Q, L)`` float32 grades, 0 where not judged.

        Equivalent Python:
        ``[[judgements[q].get(d, 0) for d in row] for q, row in enumerate(indices)]``.
        """
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
            raise ValueError("indices must be a (Q, L) tensor of corpus rows")
        if indices.shape[0] != self.num_queries:
            raise ValueError(
                f"indices has {indices.shape[0]} queries, the qrels {self.num_queries}"
            )
        qrels = self if self.device == indices.device else self.to(indices.device)
        docs, grades = qrels._dense
        if docs.shape[1] == 0:
            return torch.zeros(indices.shape, dtype=torch.float32, device=indices.device)
        # Each query's judged documents are sorted: a binary search per retrieved document.
        indices = indices.to(torch.int64)
        position = torch.searchsorted(docs, indices).clamp_max(docs.shape[1] - 1)
        hit = (docs.gather(1, position) == indices) & (indices >= 0)
        return torch.where(hit, grades.gather(1, position), torch.zeros((), device=indices.device))

    def judged(self) -> torch.Tensor:
        """Every query's judged grades, ``(Q, R)`` with ``R`` the most judgements of a query,
        descending, zero-padded (computed once per ``Qrels``)."""
        return self._judged


_METRIC = re.compile(r"^(ndcg|ndcg_exp|err|err_linear|rbp|mrr|recall|map)(?:@([0-9.]+))?$")


def _metric_fn(name: str, judged: torch.Tensor):
    """Parse ``name`` (``ndcg@10``, ``ndcg_exp@10``, ``err``, ``err@20``, ``err_linear``,
    ``rbp@0.9``, ``mrr``, ``mrr@10``, ``recall@100``, ``map@100``) into ``ranked -> (Q,)``."""
    match = _METRIC.match(name)
    if match is None:
        raise ValueError(f"unknown metric {name!r}")
    kind, parameter = match.groups()
    if kind == "rbp":
        p = 0.9 if parameter is None else float(parameter)
        return lambda ranked: M.rbp(ranked, p, judged=judged)
    k = None if parameter is None else int(parameter)
    if kind in ("recall", "map") and k is None:
        raise ValueError(f"{kind} needs a cutoff, e.g. {kind}@100")
    table = {
        "ndcg": lambda r: M.ndcg(r, k, judged=judged),
        "ndcg_exp": lambda r: M.ndcg(r, k, judged=judged, gain="exponential"),
        "err": lambda r: M.err(r, k, judged=judged),
        "err_linear": lambda r: M.err(r, k, judged=judged, mapping="linear"),
        "mrr": lambda r: M.mrr(r, k),
        "recall": lambda r: M.recall(r, k, judged=judged),
        "map": lambda r: M.average_precision(r, k, judged=judged),
    }
    return table[kind]


def evaluate(
    indices: torch.Tensor,
    qrels: Qrels,
    metrics: Sequence[str] = ("ndcg@10", "err", "rbp@0.9"),
    *,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Mean of each metric over the queries, from retrieved corpus rows.

    Args:
        indices: ``(Q, L)`` retrieved corpus rows per query in rank order (``topk``'s indices);
            negative entries are padding.
        qrels: the judgements of queries ``0..Q-1``.
        metrics: names: ``ndcg@k`` (linear gain), ``ndcg_exp@k`` (exponential gain), ``err``
            / ``err@k`` (exponential mapping), ``err_linear``, ``rbp@p``, ``mrr`` / ``mrr@k``,
            ``recall@k``, ``map@k``. ERR and RBP use each query's top judged grade as ``g_max``.
        per_query: also return the ``(Q,)`` values of each metric.

    Returns:
        ``{name: mean}``, and with ``per_query`` also ``{name: (Q,) tensor}``.
    """
    qrels = qrels.to(indices.device)
    ranked = qrels.lookup(indices)
    judged = qrels.judged()
    values = {name: _metric_fn(name, judged)(ranked) for name in metrics}
    means = {name: float(value.mean()) if value.numel() else 0.0 for name, value in values.items()}
    return (means, values) if per_query else means
