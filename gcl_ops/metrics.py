"""Ranking metrics, batched over queries on CPU or GPU: NDCG, ERR, RBP, MRR, Recall, MAP.

Every metric takes ``ranked``, a ``(Q, L)`` tensor of relevance grades of the retrieved documents
in rank order (rank 1 first), ``0`` for a non-relevant or unjudged document and ``0`` as padding
of shorter lists, and returns one value per query, ``(Q,)``, in ``[0, 1]``. A document is
*relevant* when its grade is ``> 0``. A query without any relevant document scores 0.

``judged``, where a metric takes it, is ``(Q, R)``: all judged grades of each query in any order,
zero-padded. It defines the ideal ranking (NDCG) and the number of relevant documents (Recall,
MAP), so a relevant document that was not retrieved still counts, as in trec_eval and ranx.

Conventions (``docs/CONTRACT.md``, section 7):

* ``ndcg``: ``DCG@k = sum_{i <= k} gain(g_i) / log2(i + 1)``, gain ``g`` (linear: trec_eval's
  ``ndcg_cut``, the GCL paper) or ``2^g - 1`` (exponential: Burges et al. 2005, ranx's
  ``ndcg_burges``); ``NDCG@k = DCG@k / IDCG@k`` with the ideal ranking of ``judged``.
* ``err``: ``sum_i (1/i) R(g_i) prod_{j<i} (1 - R(g_j))`` (Chapelle et al. 2009), with
  ``R(g) = (2^g - 1) / 2^g_max`` (exponential, the official GCL evaluation code) or
  ``g / (g_max + 1)`` (linear, the GCL paper's text).
* ``rbp``: ``(1 - p) sum_i (g_i / g_max) p^(i - 1)`` (Moffat and Zobel 2008, graded form).
* ``mrr``: ``1 / rank`` of the first relevant document.
* ``recall``: relevant documents in the top ``k`` over all relevant documents.
* ``average_precision``: ``sum_{i <= k, g_i > 0} P@i / #relevant`` (trec_eval ``map_cut``: the
  denominator counts all relevant documents, retrieved or not).

Exponential forms are evaluated as ``2^(g - g_max)``, so grades up to 100 (and beyond) do not
overflow in fp32.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Gain = Literal["linear", "exponential"]


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_grades(grades: torch.Tensor, name: str) -> torch.Tensor:
    """A ``(Q, L)`` float tensor of finite, non-negative grades (integers are converted)."""
    if not isinstance(grades, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(grades).__name__}")
    if grades.dim() != 2:
        raise ValueError(f"{name} must have shape (Q, L), got {tuple(grades.shape)}")
    if grades.dtype == torch.bool or grades.is_complex():
        raise TypeError(f"{name} must hold real grades, got {grades.dtype}")
    if not grades.is_floating_point():
        grades = grades.to(torch.float32)
    if grades.numel():
        low, high = torch.aminmax(grades)  # one pass; NaN propagates into both
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} has NaN or infinite grades")
        if low < 0:
            raise ValueError(f"{name} has negative grades (grades must be >= 0)")
    return grades


def _check_cutoff(k: int | None, name: str = "k") -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {k!r}")


def _check_judged(judged: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    judged = _check_grades(judged, "judged")
    if judged.shape[0] != ranked.shape[0]:
        raise ValueError(
            f"judged has {judged.shape[0]} queries but ranked {ranked.shape[0]} (shape mismatch)"
        )
    if judged.device != ranked.device:
        raise ValueError(f"judged is on {judged.device} but ranked on {ranked.device}")
    return judged.to(ranked.dtype)


def _row_max(grades: torch.Tensor) -> torch.Tensor:
    """Largest grade per query ``(Q,)``; 0 for an empty list."""
    return grades.amax(dim=1) if grades.shape[1] else grades.new_zeros(grades.shape[0])


def _top_grade(
    g_max: torch.Tensor | float | None, ranked: torch.Tensor, judged: torch.Tensor | None
) -> torch.Tensor:
    """Per-query top grade ``(Q, 1)``: given, else the largest in ``judged``, else in ``ranked``."""
    if g_max is None:
        return _row_max(judged if judged is not None else ranked).unsqueeze(1)
    if isinstance(g_max, torch.Tensor):
        if g_max.shape not in ((), (ranked.shape[0],)):
            raise ValueError(
                f"g_max must be a float or of shape (Q,) = ({ranked.shape[0]},), "
                f"got {tuple(g_max.shape)}"
            )
        top = g_max.to(device=ranked.device, dtype=ranked.dtype).expand(ranked.shape[0])
    else:
        top = torch.full((ranked.shape[0],), float(g_max), device=ranked.device, dtype=ranked.dtype)
    if not bool(torch.isfinite(top).all()) or bool((top < 0).any()):
        raise ValueError("g_max must be finite and >= 0")
    if bool((ranked > top[:, None]).any()):
        raise ValueError("ranked holds a grade above g_max")
    return top.unsqueeze(1)


def _descending(grades: torch.Tensor, k: int | None) -> torch.Tensor:
    """The ``k`` largest grades of each row, descending (all of them for ``k=None``); a check
    that is cheaper than sorting skips the work when the rows are sorted already (as
    ``Qrels.judged()`` returns them)."""
    if grades.shape[1] < 2 or bool((grades[:, :-1] >= grades[:, 1:]).all()):
        return _cut(grades, k)
    if k is not None and k < grades.shape[1]:
        return grades.topk(k, dim=1).values
    return grades.sort(dim=1, descending=True).values


def _cut(ranked: torch.Tensor, k: int | None) -> torch.Tensor:
    return ranked if k is None else ranked[:, :k]


def _ranks(length: int, like: torch.Tensor) -> torch.Tensor:
    """``[1, 2, ..., length]`` as a ``(1, length)`` row in ``like``'s dtype and device."""
    return torch.arange(1, length + 1, device=like.device, dtype=like.dtype).unsqueeze(0)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0."""
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator)
    )


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def ndcg(
    ranked: torch.Tensor,
    k: int | None = 10,
    *,
    judged: torch.Tensor | None = None,
    gain: Gain = "linear",
) -> torch.Tensor:
    """Normalised discounted cumulative gain at ``k`` (Järvelin and Kekäläinen 2002).

    ``DCG@k = sum_{i <= k} gain(g_i) / log2(i + 1)``; ``NDCG@k = DCG@k / IDCG@k``, where the
    ideal ranking sorts ``judged`` (all judged grades of the query). With ``judged=None`` the
    ideal comes from ``ranked`` itself (scikit-learn's ``ndcg_score``), which overrates a list
    that missed relevant documents. ``IDCG = 0`` gives 0.

    Args:
        ranked: ``(Q, L)`` grades in rank order, zero-padded.
        k: cutoff (default 10); None for the whole list.
        judged: ``(Q, R)`` all judged grades per query, zero-padded, or None.
        gain: ``"linear"`` (``g``; trec_eval ``ndcg_cut``, the GCL paper) or ``"exponential"``
            (``2^g - 1``; ranx ``ndcg_burges``).

    Returns:
        ``(Q,)`` NDCG values in ``[0, 1]``.

    Equivalent PyTorch (linear gain, no ``judged``)::

        discount = 1 / torch.log2(torch.arange(2, k + 2))
        ideal = ranked.sort(dim=1, descending=True).values
        ndcg = (ranked[:, :k] * discount).sum(1) / (ideal[:, :k] * discount).sum(1)
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    if gain not in ("linear", "exponential"):
        raise ValueError(f"gain must be 'linear' or 'exponential', got {gain!r}")
    judged = ranked if judged is None else _check_judged(judged, ranked)
    ideal = _descending(judged, k)

    if gain == "exponential":
        # 2^g - 1 scaled by 2^-top, which leaves the ratio unchanged and keeps the largest gain
        # at most 1: 2^(g - top) - 2^-top, with top the largest grade in ranked or judged.
        top = torch.maximum(_row_max(ranked), _row_max(judged)).unsqueeze(1)

        def transform(g: torch.Tensor) -> torch.Tensor:
            return torch.exp2(g - top) - torch.exp2(-top)
    else:

        def transform(g: torch.Tensor) -> torch.Tensor:
            return g

    def dcg(grades: torch.Tensor) -> torch.Tensor:
        grades = _cut(grades, k)
        discount = 1.0 / torch.log2(_ranks(grades.shape[1], grades) + 1.0)
        return (transform(grades) * discount).sum(dim=1)

    return _safe_divide(dcg(ranked), dcg(ideal))


def err(
    ranked: torch.Tensor,
    k: int | None = None,
    *,
    g_max: torch.Tensor | float | None = None,
    judged: torch.Tensor | None = None,
    mapping: Gain = "exponential",
) -> torch.Tensor:
    """Expected reciprocal rank (Chapelle, Metzler, Zhang, Grinspan 2009).

    ``ERR = sum_i (1/i) R(g_i) prod_{j<i} (1 - R(g_j))``: the user stops at rank ``i`` with
    probability ``R(g_i)``. ``R(g) = (2^g - 1) / 2^g_max`` (``"exponential"``, the official GCL
    evaluation code) or ``g / (g_max + 1)`` (``"linear"``, the GCL paper's text).

    Args:
        ranked: ``(Q, L)`` grades in rank order, zero-padded.
        k: cutoff; None (default) for the whole list, as the official GCL evaluation.
        g_max: per-query top grade, ``(Q,)`` or a float; default the top grade of ``judged``,
            or of ``ranked`` when ``judged`` is None.
        judged: ``(Q, R)`` judged grades, used only for the default ``g_max``.
        mapping: ``"exponential"`` (default) or ``"linear"``.

    Returns:
        ``(Q,)`` ERR values in ``[0, 1]``.

    Equivalent PyTorch (exponential)::

        r = (2 ** ranked - 1) / 2 ** g_max[:, None]
        stop_here = r * torch.cumprod(1 - r, dim=1) / (1 - r)   # prod over j < i
        err = (stop_here / torch.arange(1, L + 1)).sum(1)
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    if mapping not in ("linear", "exponential"):
        raise ValueError(f"mapping must be 'linear' or 'exponential', got {mapping!r}")
    judged = None if judged is None else _check_judged(judged, ranked)
    top = _top_grade(g_max, ranked, judged)
    ranked = _cut(ranked, k)
    if mapping == "exponential":
        stop = torch.exp2(ranked - top) - torch.exp2(-top)  # (2^g - 1) / 2^g_max
    else:
        stop = ranked / (top + 1.0)
    # Probability of reaching rank i: prod_{j < i} (1 - R_j), an exclusive cumulative product.
    reach = torch.cumprod(
        torch.cat([torch.ones_like(stop[:, :1]), 1.0 - stop[:, :-1]], dim=1), dim=1
    )
    return (stop * reach / _ranks(stop.shape[1], stop)).sum(dim=1)


def rbp(
    ranked: torch.Tensor,
    p: float = 0.9,
    k: int | None = None,
    *,
    g_max: torch.Tensor | float | None = None,
    judged: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank-biased precision (Moffat and Zobel 2008), graded form:
    ``(1 - p) sum_i (g_i / g_max) p^(i-1)``.

    Args:
        ranked: ``(Q, L)`` grades in rank order, zero-padded.
        p: persistence in ``(0, 1)`` (default 0.9).
        k: cutoff; None (default) for the whole list.
        g_max: per-query top grade (default: of ``judged``, else of ``ranked``); a query with
            ``g_max = 0`` scores 0.
        judged: ``(Q, R)`` judged grades, used only for the default ``g_max``.

    Returns:
        ``(Q,)`` RBP values in ``[0, 1)``. ranx's ``rbp.p`` is this times ``g_max``.

    Equivalent PyTorch: ``(1 - p) * (ranked / g_max[:, None] * p ** torch.arange(L)).sum(1)``.
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    if not (isinstance(p, (int, float)) and 0 < p < 1):
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    judged = None if judged is None else _check_judged(judged, ranked)
    top = _top_grade(g_max, ranked, judged)
    ranked = _cut(ranked, k)
    weights = p ** (_ranks(ranked.shape[1], ranked) - 1.0)
    return (1.0 - p) * _safe_divide((ranked * weights).sum(dim=1), top.squeeze(1))


def mrr(ranked: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Reciprocal rank of the first relevant (grade > 0) document within the top ``k``; 0 if none.

    Equivalent PyTorch: ``1 / (first index with ranked > 0, plus 1)``.
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    relevant = _cut(ranked, k) > 0
    reciprocal = 1.0 / _ranks(relevant.shape[1], ranked)
    # The largest 1/i over the relevant positions is the first one.
    return _row_max(torch.where(relevant, reciprocal, torch.zeros_like(reciprocal)))


def _relevant_count(judged: torch.Tensor) -> torch.Tensor:
    return (judged > 0).sum(dim=1).to(judged.dtype)


def recall(ranked: torch.Tensor, k: int, *, judged: torch.Tensor) -> torch.Tensor:
    """Recall at ``k``: relevant documents in the top ``k`` over all relevant judged documents.

    Equivalent PyTorch: ``(ranked[:, :k] > 0).sum(1) / (judged > 0).sum(1)`` (0 if none).
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    judged = _check_judged(judged, ranked)
    found = (_cut(ranked, k) > 0).sum(dim=1).to(ranked.dtype)
    return _safe_divide(found, _relevant_count(judged))


def average_precision(ranked: torch.Tensor, k: int, *, judged: torch.Tensor) -> torch.Tensor:
    """Average precision at ``k`` (trec_eval ``map_cut``): ``sum_{i <= k, relevant} P@i`` over the
    number of *all* relevant judged documents.

    Equivalent PyTorch::

        rel = (ranked[:, :k] > 0).float()
        ap = (rel * rel.cumsum(1) / torch.arange(1, k + 1)).sum(1) / (judged > 0).sum(1)
    """
    ranked = _check_grades(ranked, "ranked")
    _check_cutoff(k)
    judged = _check_judged(judged, ranked)
    relevant = (_cut(ranked, k) > 0).to(ranked.dtype)
    precision_at = relevant.cumsum(dim=1) / _ranks(relevant.shape[1], relevant)
    return _safe_divide((relevant * precision_at).sum(dim=1), _relevant_count(judged))


# ----------------------------------------------------------------------------------------------
# From scores to ranked grades
# ----------------------------------------------------------------------------------------------


def rank(
    scores: torch.Tensor, grades: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sort each query's candidates by score into ranked grades.

    Tie rule: candidates with equal scores keep their candidate order (a stable sort by
    descending score: the lower candidate index ranks first). Masked-out candidates go last
    with grade 0 (they count as padding).

    Args:
        scores: ``(Q, C)`` candidate scores (higher is better); NaN is refused.
        grades: ``(Q, C)`` the candidates' grades.
        mask: ``(Q, C)`` bool, True for real candidates, or None for all.

    Returns:
        ``(Q, C)`` grades in rank order.

    Equivalent PyTorch:
    ``grades.gather(1, scores.sort(dim=1, descending=True, stable=True).indices)``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError("scores must be a (Q, C) tensor")
    grades = _check_grades(grades, "grades")
    if grades.shape != scores.shape:
        raise ValueError(f"grades has shape {tuple(grades.shape)} but scores {tuple(scores.shape)}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores has NaN values")
    if mask is not None:
        if mask.shape != scores.shape or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor of the shape of scores")
        scores = scores.to(torch.float64).masked_fill(~mask, -math.inf)
        grades = grades.masked_fill(~mask, 0.0)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return grades.gather(1, order)
