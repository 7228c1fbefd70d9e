"""Four-split retrieval evaluation on MarqoGS-10M, following the GCL paper's protocol.

For each split: up to ``max_queries`` queries (``eval_sets.eval_queries``: sampled without
replacement with probability proportional to their summed ``score_linear``, seed 1) are embedded
by the text tower; the split's corpus is embedded by both towers, the normalised title and image
embeddings averaged with weights ``doc_gamma`` and re-normalised; each query retrieves the exact
top ``min(top_k, C)`` documents by cosine similarity (``gcl_ops.topk``); the rankings are scored
against the split's graded judgements (``score_linear``) with the official summary's metrics and
names (``OFFICIAL_METRICS``: mAP@1000, mrr@1000, NDCG@10, mERR, mRBP7, mRBP8, mRBP9, computed by
``gcl_ops.evaluate``; ERR and RBP over the whole retrieved list, ``g_max`` per query).

in_domain and novel_query search ``corpus_1``, novel_document and zero_shot ``corpus_2``; each
corpus is embedded once and shared by its splits. A judged document that is not in the corpus
(e.g. dropped for a corrupt image) cannot be retrieved but still counts in the ideal ranking.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import gcl_ops
from reference_trainer.eval_sets import EvalQueries, corpus_batches, eval_queries
from reference_trainer.marqo import SPLIT_CORPUS, SPLITS, MarqoGS
from reference_trainer.model import ModelBundle, unwrap

#: The official evaluation's summary (``evals/eval_gs_v1.py`` of marqo-ai/GCL), in its order and
#: with its names, and the ``gcl_ops.evaluate`` metric that computes each: every judged document
#: is relevant for MAP and MRR (grades 1..100), ERR maps grades exponentially with the query's top
#: grade, and ERR and RBP run over all retrieved documents.
OFFICIAL_METRICS = {
    "mAP@1000": "map@1000",
    "mrr@1000": "mrr@1000",
    "NDCG@10": "ndcg@10",
    "mERR": "err",
    "mRBP7": "rbp@0.7",
    "mRBP8": "rbp@0.8",
    "mRBP9": "rbp@0.9",
}
METRICS = tuple(OFFICIAL_METRICS)
#: Counts reported beside the metrics of each split.
COUNTS = ("queries", "corpus", "skipped_images", "judged_not_in_corpus")


@dataclasses.dataclass
class CorpusEmbeddings:
    """A corpus embedded once, shared by the splits that search it.

    Attributes:
        product_ids: ``(C,)`` the product id of each row.
        embeddings: ``(C, d)`` float32 unit-norm document embeddings.
        skipped_images: documents dropped for a corrupt or missing image.
    """

    product_ids: list[str]
    embeddings: torch.Tensor
    skipped_images: int


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every submodule's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    model_device = next(model.parameters()).device
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type != model_device.type or device.index not in (None, model_device.index):
        raise ValueError(
            f"the model is on {model_device} but device={device}: move the model first "
            "(bundle.model.to(device))"
        )
    return model_device


def combine_fields(
    title: torch.Tensor | None, image: torch.Tensor | None, doc_gamma: Sequence[float]
) -> torch.Tensor:
    """Document embeddings ``(b, d)``: ``normalize(g_t * normalize(title) + g_i *
    normalize(image))`` with ``(g_t, g_i) = doc_gamma``; a field with weight 0 may be None."""
    fields = [(w, x) for w, x in zip(doc_gamma, (title, image)) if w > 0]
    total = sum(w * F.normalize(x.float(), dim=-1) for w, x in fields)
    return F.normalize(total, dim=-1)


def embed_queries(
    model: nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "queries",
) -> torch.Tensor:
    """``(Q, d)`` float32 unit-norm text embeddings of ``texts`` (call in eval mode under
    ``torch.no_grad()``)."""
    chunks = []
    with tqdm(total=len(texts), desc=desc, unit="query", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            bar.update(len(tokens))
    return torch.cat(chunks)


def embed_corpus(
    bundle: ModelBundle,
    dataset: MarqoGS,
    corpus: str,
    *,
    doc_gamma: Sequence[float] = (0.5, 0.5),
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> CorpusEmbeddings:
    """Embed every document of ``corpus`` (``corpus_batches`` with the validation transform);
    only the towers with a positive weight in ``doc_gamma = (title, image)`` run. Call it in
    eval mode under ``torch.no_grad()``, as ``evaluate_model`` does."""
    model = unwrap(bundle.model)
    product_ids: list[str] = []
    chunks: list[torch.Tensor] = []
    skipped = 0
    batches = corpus_batches(
        dataset, corpus, transform=bundle.preprocess_val, tokenizer=bundle.tokenizer,
        batch_size=batch_size, num_workers=num_workers,
    )  # fmt: skip
    with tqdm(desc=f"{corpus} documents", unit="doc", disable=not progress) as bar:
        for batch in batches:
            skipped += batch["skipped"]
            bar.update(len(batch["product_ids"]) + batch["skipped"])
            if not batch["product_ids"]:
                continue
            title = image = None
            if doc_gamma[0] > 0:
                title = model.encode_text(batch["title_tokens"].to(device))
            if doc_gamma[1] > 0:
                image = model.encode_image(batch["images"].to(device))
            chunks.append(combine_fields(title, image, doc_gamma))
            product_ids.extend(batch["product_ids"])
    if not product_ids:
        raise ValueError(f"{corpus} has no document to embed ({skipped} skipped for their image)")
    return CorpusEmbeddings(product_ids, torch.cat(chunks), skipped)


def build_qrels(
    judgements: EvalQueries, product_index: dict[str, int]
) -> tuple[gcl_ops.Qrels, int]:
    """Qrels of ``judgements`` over corpus rows ``product_index`` (product id -> row).

    A judged product absent from the corpus gets a row ``>= C``, which no ranking retrieves but
    the ideal ranking counts. A (query, product) pair judged twice keeps its highest grade.

    Returns:
        The qrels and the number of judgements of products absent from the corpus.
    """
    num_docs = len(product_index)
    absent: dict[str, int] = {}
    docs = np.empty(len(judgements.judged_products), dtype=np.int64)
    for j, product in enumerate(judgements.judged_products):
        row = product_index.get(product)
        if row is None:
            row = absent.setdefault(product, num_docs + len(absent))  # the next free row
        docs[j] = row
    rows = np.asarray(judgements.judged_rows, dtype=np.int64)
    grades = np.asarray(judgements.judged_grades, dtype=np.float32)
    key = rows * (num_docs + len(absent)) + docs
    order = np.lexsort((-grades, key))  # by pair, best grade first
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    keep = order[first]
    qrels = gcl_ops.Qrels.from_arrays(
        rows[keep], docs[keep], grades[keep], num_queries=len(judgements.queries)
    )
    return qrels, int((docs >= num_docs).sum())


def score_split(
    queries: torch.Tensor,
    corpus: CorpusEmbeddings,
    judgements: EvalQueries,
    *,
    top_k: int = 1000,
) -> dict[str, Any]:
    """Metrics of one split from query embeddings ``(Q, d)`` and an embedded corpus: the exact
    top ``min(top_k, C)`` by cosine, scored against ``judgements``. Returns ``{metric: mean}``
    for ``METRICS`` and the ``COUNTS``."""
    index = {product: row for row, product in enumerate(corpus.product_ids)}
    qrels, absent = build_qrels(judgements, index)
    k = min(top_k, len(corpus.product_ids))
    _, indices = gcl_ops.topk(queries, corpus.embeddings.to(queries.device), k)
    computed = gcl_ops.evaluate(indices, qrels, list(OFFICIAL_METRICS.values()))
    values: dict[str, Any] = {name: computed[metric] for name, metric in OFFICIAL_METRICS.items()}
    values.update(
        queries=len(judgements.queries), corpus=len(corpus.product_ids),
        skipped_images=corpus.skipped_images, judged_not_in_corpus=absent,
    )  # fmt: skip
    return values


def evaluate_model(
    bundle: ModelBundle,
    dataset: MarqoGS,
    *,
    splits: Sequence[str] = SPLITS,
    max_queries: int = 2000,
    seed: int = 1,
    official_rescale: bool = True,
    top_k: int = 1000,
    doc_gamma: Sequence[float] = (0.5, 0.5),
    query_gamma: Sequence[float] = (1.0,),
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``bundle`` on ``splits`` of ``dataset`` (the protocol in the module docstring).

    Args:
        bundle: the model (any DDP / compile wrapper is looked through), its validation
            transform and tokenizer.
        dataset: the opened dataset.
        splits: which of ``SPLITS`` to evaluate.
        max_queries: queries sampled per split (all when the split has fewer); ``seed`` seeds it.
        official_rescale: grades (and sampling weights) min-max rescaled to integers 1..100 over
            the split, as the official code does (``MarqoGS.eval_queries``; on MarqoGS-10M, whose
            scores span 1..100, this is the identity); False: raw ``score_linear``.
        top_k: documents retrieved per query (at most the corpus size).
        doc_gamma: ``(title, image)`` weights of the document fields, non-negative, not both 0.
        query_gamma: weights of the query fields; queries have one field (the query text), so
            this is one positive weight, which the normalisation makes irrelevant (kept for
            parity with the official code).
        batch_size, num_workers: embedding batch size and image-decoding workers.
        device: where to compute; default (None) the model's device, which it must match.
        progress: show progress bars.

    Returns:
        ``{split: {metric: value for METRICS} | {count: int for COUNTS}}`` in ``splits`` order.
    """
    unknown = [split for split in splits if split not in SPLITS]
    missing = [split for split in splits if split in SPLITS and split not in dataset.splits]
    if unknown or missing or not splits:
        raise ValueError(
            f"cannot evaluate splits {list(splits)}: unknown {unknown}, absent from the dataset "
            f"{missing}; known splits {list(SPLITS)}, present {list(dataset.splits)}"
        )
    if len(doc_gamma) != 2 or min(doc_gamma) < 0 or sum(doc_gamma) <= 0:
        raise ValueError(f"doc_gamma must be two non-negative weights, not both 0: {doc_gamma}")
    if len(query_gamma) != 1 or query_gamma[0] <= 0:
        raise ValueError(
            f"query_gamma must be one positive weight (one query field): {query_gamma}"
        )
    if top_k < 1 or max_queries < 1 or batch_size < 1:
        raise ValueError("top_k, max_queries and batch_size must be positive")
    model = unwrap(bundle.model)
    device = _resolve_device(model, device)

    results: dict[str, dict[str, Any]] = {}
    with _inference(model):
        for corpus_name in dict.fromkeys(SPLIT_CORPUS[split] for split in splits):
            corpus = embed_corpus(
                bundle, dataset, corpus_name, doc_gamma=doc_gamma, batch_size=batch_size,
                num_workers=num_workers, device=device, progress=progress,
            )  # fmt: skip
            for split in (s for s in splits if SPLIT_CORPUS[s] == corpus_name):
                judgements = eval_queries(
                    dataset, split, max_queries=max_queries, seed=seed,
                    official_rescale=official_rescale,
                )  # fmt: skip
                queries = embed_queries(
                    model, bundle.tokenizer, judgements.queries, batch_size=batch_size,
                    device=device, progress=progress, desc=f"{split} queries",
                )  # fmt: skip
                results[split] = score_split(queries, corpus, judgements, top_k=top_k)
            del corpus
    return {split: results[split] for split in splits}


def _columns(results: dict[str, dict[str, Any]]) -> list[str]:
    return [s for s in SPLITS if s in results] + [s for s in results if s not in SPLITS]


def _rows(results: dict[str, dict[str, Any]]) -> list[str]:
    names = [n for n in (*METRICS, *COUNTS) if any(n in r for r in results.values())]
    return names + sorted({n for r in results.values() for n in r} - set(names))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a text table in the layout of the GCL paper's Table 4: one column per split
    (in ``SPLITS`` order), one row per metric, then the counts."""
    columns = _columns(results)
    rows = _rows(results)

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    width = max(len(name) for name in rows)
    widths = [max(len(column), 8) for column in columns]
    lines = ["  ".join([f"{'':<{width}}", *(f"{c:>{w}}" for c, w in zip(columns, widths))])]
    for name in rows:
        cells = (f"{cell(results[c].get(name)):>{w}}" for c, w in zip(columns, widths))
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def save_results(results: dict[str, dict[str, Any]], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results`` as JSON (``{split: {name: value}}``) and CSV (the table layout: a
    ``metric`` column, then one column per split) beside each other.

    Args:
        out: the file stem (``RUN/eval`` -> ``RUN/eval.json`` and ``RUN/eval.csv``); a ``.json``
            or ``.csv`` suffix is replaced. Missing parent directories are created.

    Returns:
        The JSON and CSV paths.
    """
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".csv") else out
    json_path, csv_path = (stem.with_name(stem.name + suffix) for suffix in (".json", ".csv"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    columns = _columns(results)
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", *columns])
        for name in _rows(results):
            writer.writerow([name, *(results[c].get(name, "") for c in columns)])
    return json_path, csv_path
