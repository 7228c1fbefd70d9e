"""Graded-relevance retrieval evaluation as a sentence-transformers evaluator.

An optional integration (``pip install "gcl-ops[st]"``); ``import gcl_ops`` never imports it.

* ``GradedRetrievalEvaluator(queries, corpus, relevant_docs, ...)``: embeds the queries and the
  corpus with the model, retrieves each query's exact top ``retrieve_k`` documents by cosine
  similarity (``gcl_ops.topk``) and scores the ranking against *graded* judgements with
  ``gcl_ops.evaluate``: NDCG (linear gain, trec_eval ``ndcg_cut``), MRR, MAP (trec_eval
  ``map_cut``), Recall, ERR and RBP (``docs/CONTRACT.md`` section 7). sentence-transformers' own
  ``InformationRetrievalEvaluator`` takes binary relevance only; this one is its graded
  counterpart, usable as ``SentenceTransformerTrainer(evaluator=...)`` with
  ``load_best_model_at_end`` and ``metric_for_best_model=evaluator.primary_metric``.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch

try:
    from sentence_transformers.base.evaluation import BaseEvaluator as SentenceEvaluator
except ImportError:  # pragma: no cover - sentence-transformers before the base package
    try:
        from sentence_transformers.evaluation import SentenceEvaluator
    except ImportError as error:
        raise ImportError(
            "gcl_ops.st_evaluation needs sentence-transformers; "
            'install it with: pip install "gcl-ops[st]"'
        ) from error

from gcl_ops.retrieval import Qrels, evaluate, topk

__all__ = ["GradedRetrievalEvaluator"]

logger = logging.getLogger(__name__)

#: Documents retrieved per query when no cutoff asks for more: ERR and RBP without a cutoff are
#: measured over the retrieved list, so it should not shrink to a small NDCG cutoff.
DEFAULT_RETRIEVE_K = 100

Similarity = Literal["cosine", "dot"]


def _cutoffs(values: Iterable[int], name: str) -> tuple[int, ...]:
    """Sorted distinct positive integer cutoffs."""
    values = tuple(values)
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must hold positive integers, got {k!r}")
    return tuple(sorted({int(k) for k in values}))


def _persistences(values: Iterable[float]) -> tuple[float, ...]:
    """Sorted distinct RBP persistences in (0, 1)."""
    values = tuple(values)
    for p in values:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
            raise ValueError(f"rbp_p must hold persistences in (0, 1), got {p!r}")
    return tuple(sorted({float(p) for p in values}))


def _rbp_name(p: float) -> str:
    # Positional notation (0.00001, not 1e-05): gcl_ops.evaluate parses "rbp@<digits and dot>".
    return "rbp@" + np.format_float_positional(p, trim="-")


def _check_grade(query_id: Any, doc_id: Any, grade: Any) -> float:
    if isinstance(grade, bool) or not isinstance(grade, numbers.Real):
        raise TypeError(
            f"relevant_docs[{query_id!r}][{doc_id!r}] must be a number (a grade >= 0), "
            f"got {grade!r} of type {type(grade).__name__}"
        )
    if not (math.isfinite(grade) and grade >= 0):
        raise ValueError(
            f"relevant_docs[{query_id!r}][{doc_id!r}] = {grade!r}: grades must be finite and "
            ">= 0 (0: judged non-relevant)"
        )
    return float(grade)


class GradedRetrievalEvaluator(SentenceEvaluator):
    """Exact top-k retrieval scored against graded relevance judgements.

    Each call embeds the evaluated queries and the whole corpus (``model.encode_query`` /
    ``model.encode_document`` where the model has them, else ``model.encode``), retrieves the
    top ``min(retrieve_k, len(corpus))`` documents of each query with ``gcl_ops.topk`` (ties by
    ascending corpus position, i.e. ``corpus``'s insertion order; trec_eval orders equal scores
    by document id instead, so the two differ only on exact ties) and averages each metric over
    the queries with ``gcl_ops.evaluate``.

    Conventions (``docs/CONTRACT.md`` section 7): a judged document with grade ``g > 0`` is
    relevant; unjudged documents have grade 0. ``ndcg@k`` uses linear gain and the ideal ranking
    of *all* judged documents (trec_eval ``ndcg_cut``); ``map@k`` divides by all relevant
    documents (trec_eval ``map_cut``); ``recall@k`` likewise; ``mrr@k`` is ``1 / rank`` of the
    first relevant document within ``k``. ``err`` (exponential mapping) and ``rbp@p`` use each
    query's top judged grade as ``g_max`` and run over the whole retrieved list. Only queries
    with at least one judgement are evaluated (as ``InformationRetrievalEvaluator`` does, and
    trec_eval, which skips queries absent from the qrels).

    Args:
        queries: ``{query id: text}``.
        corpus: ``{document id: text}``.
        relevant_docs: ``{query id: {document id: grade}}``, grades finite numbers ``> 0``.
        ndcg_at_k, mrr_at_k, map_at_k, recall_at_k, err_at_k: cutoffs of each metric.
        rbp_p: RBP persistences ``p`` in ``(0, 1)``.
        err: also report ERR over the whole retrieved list (``err``).
        retrieve_k: documents retrieved per query; at least every cutoff or the corpus size
            (default: the largest cutoff, at least 100). Capped at the corpus size.
        batch_size: texts per ``encode`` batch.
        corpus_chunk_size: corpus rows per ``topk`` chunk (default: ``topk``'s).
        similarity: ``"cosine"`` (default) or ``"dot"`` (raw dot product).
        show_progress_bar: show ``encode``'s progress bars.
        name: a name for the evaluation set; metric keys become ``{name}_{metric}``.
        primary_metric: the metric for model selection, e.g. ``"ndcg@10"``, ``"rbp@0.8"``
            (default: ``ndcg`` at the largest NDCG cutoff, else the first metric).
        write_csv: append each call's metrics to ``output_path`` /
            ``Graded-Retrieval_evaluation[_{name}]_results.csv`` (``csv_file``).
        query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name: passed to ``encode``
            as ``prompt`` / ``prompt_name`` for the queries / the corpus.

    Returns (of a call): ``{"{name}_{metric}": mean}`` for every metric in ``metric_names``
    (without a name, just ``{metric: mean}``); ``primary_metric`` holds the prefixed key of the
    primary metric and ``greater_is_better`` is True.
    """

    def __init__(
        self,
        queries: Mapping[str, str],
        corpus: Mapping[str, str],
        relevant_docs: Mapping[str, Mapping[str, float]],
        *,
        ndcg_at_k: Iterable[int] = (10,),
        mrr_at_k: Iterable[int] = (10,),
        map_at_k: Iterable[int] = (100,),
        recall_at_k: Iterable[int] = (10, 100),
        err: bool = True,
        err_at_k: Iterable[int] = (),
        rbp_p: Iterable[float] = (0.8,),
        retrieve_k: int | None = None,
        batch_size: int = 32,
        corpus_chunk_size: int | None = None,
        similarity: Similarity = "cosine",
        show_progress_bar: bool = False,
        name: str = "",
        primary_metric: str | None = None,
        write_csv: bool = True,
        query_prompt: str | None = None,
        query_prompt_name: str | None = None,
        corpus_prompt: str | None = None,
        corpus_prompt_name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(queries, Mapping) or not queries:
            raise ValueError("queries is empty: give at least one {query id: text}")
        if not isinstance(corpus, Mapping) or not corpus:
            raise ValueError("corpus is empty: give at least one {document id: text}")
        if not isinstance(relevant_docs, Mapping):
            raise TypeError("relevant_docs must be a mapping {query id: {document id: grade}}")

        self.ndcg_at_k = _cutoffs(ndcg_at_k, "ndcg_at_k")
        self.mrr_at_k = _cutoffs(mrr_at_k, "mrr_at_k")
        self.map_at_k = _cutoffs(map_at_k, "map_at_k")
        self.recall_at_k = _cutoffs(recall_at_k, "recall_at_k")
        self.err_at_k = _cutoffs(err_at_k, "err_at_k")
        self.rbp_p = _persistences(rbp_p)
        self.err = bool(err)
        self.metric_names: list[str] = [
            *(f"ndcg@{k}" for k in self.ndcg_at_k),
            *(f"mrr@{k}" for k in self.mrr_at_k),
            *(f"map@{k}" for k in self.map_at_k),
            *(f"recall@{k}" for k in self.recall_at_k),
            *(["err"] if self.err else []),
            *(f"err@{k}" for k in self.err_at_k),
            *(_rbp_name(p) for p in self.rbp_p),
        ]
        if not self.metric_names:
            raise ValueError("no metric requested: every cutoff list is empty and err=False")

        largest = max(
            (*self.ndcg_at_k, *self.mrr_at_k, *self.map_at_k, *self.recall_at_k, *self.err_at_k),
            default=0,
        )
        if retrieve_k is None:
            retrieve_k = max(largest, DEFAULT_RETRIEVE_K)
        if isinstance(retrieve_k, bool) or not isinstance(retrieve_k, int) or retrieve_k < 1:
            raise ValueError(f"retrieve_k must be a positive integer, got {retrieve_k!r}")
        # Retrieving the whole corpus is complete whatever the cutoffs.
        if retrieve_k < min(largest, len(corpus)):
            raise ValueError(
                f"retrieve_k={retrieve_k} is below the largest cutoff {largest}: metrics at that "
                "cutoff would see a truncated list"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")

        self.corpus_ids = list(corpus)
        self.corpus = [corpus[doc_id] for doc_id in self.corpus_ids]
        row_of_doc = {doc_id: row for row, doc_id in enumerate(self.corpus_ids)}
        for query_id in relevant_docs:
            if query_id not in queries:
                raise ValueError(f"relevant_docs has query {query_id!r}, which is not in queries")
        # Queries in their order in `queries`; those without judgements have no metric to score.
        self.query_ids = [q for q in queries if relevant_docs.get(q)]
        if not self.query_ids:
            raise ValueError("no query in queries has a judged document in relevant_docs")
        self.queries = [queries[q] for q in self.query_ids]
        query_rows, doc_rows, grades = [], [], []
        for row, query_id in enumerate(self.query_ids):
            judgements = relevant_docs[query_id]
            if not isinstance(judgements, Mapping):
                raise TypeError(
                    f"relevant_docs[{query_id!r}] must be a mapping {{document id: grade}}, "
                    f"got {type(judgements).__name__}"
                )
            for doc_id, grade in judgements.items():
                if doc_id not in row_of_doc:
                    raise ValueError(
                        f"relevant_docs[{query_id!r}] judges document {doc_id!r}, "
                        "which is not in corpus"
                    )
                grade = _check_grade(query_id, doc_id, grade)
                if grade == 0:  # judged non-relevant: the same as unjudged (docs/CONTRACT.md 7)
                    continue
                grades.append(grade)
                query_rows.append(row)
                doc_rows.append(row_of_doc[doc_id])
        self.relevant_docs = {q: dict(relevant_docs[q]) for q in self.query_ids}
        self.qrels = Qrels.from_arrays(
            query_rows, doc_rows, grades, num_queries=len(self.query_ids)
        )

        self.retrieve_k = retrieve_k
        self.batch_size = batch_size
        self.corpus_chunk_size = corpus_chunk_size
        self.similarity = similarity
        self.show_progress_bar = show_progress_bar
        self.name = name
        self.write_csv = write_csv
        self.query_prompt = query_prompt
        self.query_prompt_name = query_prompt_name
        self.corpus_prompt = corpus_prompt
        self.corpus_prompt_name = corpus_prompt_name

        if primary_metric is None:
            primary_metric = (
                f"ndcg@{self.ndcg_at_k[-1]}" if self.ndcg_at_k else self.metric_names[0]
            )
        if name and primary_metric.startswith(name + "_"):
            primary_metric = primary_metric[len(name) + 1 :]
        if primary_metric not in self.metric_names:
            raise ValueError(
                f"primary_metric {primary_metric!r} is not among the computed metrics "
                f"{self.metric_names}"
            )
        self.primary_metric = f"{name}_{primary_metric}" if name else primary_metric
        self.greater_is_better = True

        self.csv_file = f"Graded-Retrieval_evaluation{'_' + name if name else ''}_results.csv"
        self.csv_headers = ["epoch", "steps", *self.metric_names]

    # -- retrieval ----------------------------------------------------------------------------

    def _embed(self, model: Any, texts: list[str], role: Literal["query", "document"]) -> Any:
        if role == "query":
            encode = getattr(model, "encode_query", model.encode)
            prompt, prompt_name = self.query_prompt, self.query_prompt_name
        else:
            encode = getattr(model, "encode_document", model.encode)
            prompt, prompt_name = self.corpus_prompt, self.corpus_prompt_name
        return encode(
            texts,
            prompt=prompt,
            prompt_name=prompt_name,
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress_bar,
            convert_to_tensor=True,
        )

    def search(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and retrieve: ``scores (Q, k)`` descending and ``indices (Q, k)`` corpus rows
        (positions in ``corpus_ids``) of the ``Q`` evaluated queries (``query_ids``), with
        ``k = min(retrieve_k, len(corpus))``."""
        query_embeddings = self._embed(model, self.queries, "query")
        corpus_embeddings = self._embed(model, self.corpus, "document")
        return topk(
            query_embeddings,
            corpus_embeddings.to(query_embeddings.device),
            min(self.retrieve_k, len(self.corpus)),
            chunk_size=self.corpus_chunk_size,
            normalize=self.similarity == "cosine",
        )

    def retrieve(self, model: Any) -> dict[str, dict[str, float]]:
        """The run, as trec_eval and pytrec_eval take it: ``{query id: {document id: score}}``."""
        scores, indices = self.search(model)
        return {
            query_id: {self.corpus_ids[d]: s for d, s in zip(rows, values)}
            for query_id, rows, values in zip(
                self.query_ids, indices.tolist(), scores.double().tolist()
            )
        }

    def compute_metrics(self, model: Any) -> dict[str, float]:
        """``{metric: mean over the evaluated queries}`` for every name in ``metric_names``."""
        _, indices = self.search(model)
        return evaluate(indices, self.qrels, self.metric_names)

    # -- the SentenceEvaluator interface --------------------------------------------------------

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        if epoch != -1:
            when = (
                f" after epoch {epoch}" if steps == -1 else f" in epoch {epoch} after {steps} steps"
            )
        else:
            when = ""
        logger.info(f"Graded retrieval evaluation of the model on the {self.name} dataset{when}:")
        scores = self.compute_metrics(model)
        logger.info(f"Queries: {len(self.queries)}, corpus: {len(self.corpus)}")
        for metric, value in scores.items():
            logger.info(f"{metric}: {value:.4f}")

        if output_path is not None and self.write_csv:
            os.makedirs(output_path, exist_ok=True)
            csv_path = os.path.join(output_path, self.csv_file)
            new_file = not os.path.isfile(csv_path)
            with open(csv_path, "a", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                if new_file:
                    writer.writerow(self.csv_headers)
                writer.writerow([epoch, steps, *(scores[m] for m in self.metric_names)])

        metrics = self.prefix_name_to_metrics(scores, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"retrieve_k": self.retrieve_k, "similarity": self.similarity}
        for key in ("query_prompt", "query_prompt_name", "corpus_prompt", "corpus_prompt_name"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config
