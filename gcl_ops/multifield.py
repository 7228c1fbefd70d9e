"""Multi-field GCL (paper Eq. 5) on top of the fused loss.

Query-side fields ``L^1..L^m`` and document-side fields ``R^1..R^n`` (e.g. the query text against a
product's title and image), each L2-normalised, with field weights ``gamma_L``, ``gamma_R`` that
sum to 1::

    L_avg = sum_j gamma_Lj L^j        R_avg = sum_k gamma_Rk R^k
    loss  = L_WCE(Z_avg, w) + sum_j sum_k L_WCE(Z_jk, w)

``Z_jk = t L^j R^k^T``; ``Z_avg = t * L_avg R_avg^T`` with the averages re-normalised first by
default (``renormalize=True``, as the official GCL inference code embeds documents), or used as they
are (``renormalize=False``, the paper's literal form).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gcl_ops import _checks
from gcl_ops.contrastive import Impl, gcl_loss
from gcl_ops.distributed import check_equal_sizes, distributed_gcl_loss
from gcl_ops.reference import Reduction


def _field_gammas(
    gamma: Sequence[float] | torch.Tensor | None, count: int, name: str
) -> list[float]:
    """Uniform by default; else ``count`` non-negative finite numbers summing to 1."""
    if gamma is None:
        return [1.0 / count] * count
    values = [float(g) for g in (gamma.tolist() if isinstance(gamma, torch.Tensor) else gamma)]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} fields")
    if any(not math.isfinite(g) or g < 0 for g in values):
        raise ValueError(f"{name} must be non-negative and finite, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {values} (sum {sum(values)})")
    return values


def _check_fields(
    fields: Sequence[torch.Tensor], name: str, shape: tuple[int, int] | None
) -> tuple[int, int]:
    """Each field is an ``(N, k)`` matrix of one shape (``shape`` if given); returns that shape."""
    if isinstance(fields, torch.Tensor) or len(fields) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of (N, k) tensors, one per field")
    rows, width = shape if shape is not None else (None, None)
    for index, field in enumerate(fields):
        _checks.check_embeddings(field, f"{name}[{index}]", rows=rows, width=width)
        rows, width = field.shape
    return rows, width


def weighted_field_average(fields: Sequence[torch.Tensor], gamma: Sequence[float]) -> torch.Tensor:
    """``sum_j gamma_j * fields[j]``, all ``(N, k)``."""
    return sum(
        (g * field for g, field in zip(gamma, fields, strict=True)), torch.zeros_like(fields[0])
    )


def multi_field_gcl_loss(
    lhs: Sequence[torch.Tensor],
    rhs: Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    *,
    lhs_gamma: Sequence[float] | torch.Tensor | None = None,
    rhs_gamma: Sequence[float] | torch.Tensor | None = None,
    renormalize: bool = True,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    validate: bool = True,
    distributed: bool = False,
    group: object | None = None,
    negatives: Sequence[torch.Tensor] | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-field GCL loss (paper Eq. 5): the averaged fields plus every field pair.

    Args:
        lhs: ``m >= 1`` query-side fields, each ``(N, k)`` (normalised here).
        rhs: ``n >= 1`` document-side fields, each ``(N, k)``.
        weights, logit_scale, query_ids, doc_ids, reduction, impl, validate: as in ``gcl_loss``.
        lhs_gamma, rhs_gamma: field weights (``m`` and ``n`` non-negative numbers summing to 1);
            default uniform.
        renormalize: re-normalise the field averages (default True, as the official code);
            False gives the paper's literal ``Z_avg = t * L_avg R_avg^T``.
        distributed, group: every term is the global-batch loss across ranks
            (``gcl_ops.distributed.distributed_gcl_loss``); each rank passes its own pairs.
        negatives: hard negatives with the document-side fields: ``n`` tensors, one per ``rhs``
            field, each ``(H, k)`` (or ``(N, h, k)``); the averaged term gets their field average,
            the term of ``rhs[k]`` gets ``negatives[k]`` (``docs/CONTRACT.md`` sections 1.1, 5).
        negative_ids: ``(H,)`` their ids, compared with ``doc_ids`` (as in ``gcl_loss``).

    Fields are normalised and averaged in fp32 (fp64 for fp64 inputs) and handed to the fused
    loss in their own dtype, so bf16 fields keep the bf16 kernels.

    Returns:
        A scalar (or ``(N,)`` for ``reduction="none"``): ``1 + m * n`` single-field losses summed.

    Equivalent PyTorch::

        L = [F.normalize(x) for x in lhs]; R = [F.normalize(y) for y in rhs]
        loss = gcl_loss(sum(g * x for g, x in zip(lhs_gamma, L)),
                        sum(g * y for g, y in zip(rhs_gamma, R)), w, t, normalize=renormalize)
        loss += sum(gcl_loss(x, y, w, t, normalize=False) for x in L for y in R)
    """
    _check_fields(rhs, "rhs", _check_fields(lhs, "lhs", None))
    gamma_l = _field_gammas(lhs_gamma, len(lhs), "lhs_gamma")
    gamma_r = _field_gammas(rhs_gamma, len(rhs), "rhs_gamma")
    _checks.check_weights(weights, lhs[0].shape[0], validate=False)  # shapes and types
    _checks.check_logit_scale(logit_scale, validate=False)
    if negatives is not None:
        if isinstance(negatives, torch.Tensor) or len(negatives) != len(rhs):
            got = "a tensor" if isinstance(negatives, torch.Tensor) else f"{len(negatives)}"
            raise ValueError(
                f"negatives must be a sequence of one tensor per rhs field ({len(rhs)}), got {got}"
            )
        checked = [
            _checks.check_negatives(neg, negative_ids, field, doc_ids, f"negatives[{index}]")
            for index, (neg, field) in enumerate(zip(negatives, rhs))
        ]
        negatives = [neg for neg, _ in checked]
        negative_ids = checked[0][1]
        _check_fields(negatives, "negatives", tuple(negatives[0].shape))
    elif negative_ids is not None:
        raise ValueError("negative_ids were given without negatives")

    field_dtype = functools.reduce(torch.promote_types, (f.dtype for f in (*lhs, *rhs)))
    work_dtype = torch.promote_types(field_dtype, torch.float32)
    lhs_hat = [F.normalize(field.to(work_dtype), dim=-1) for field in lhs]
    rhs_hat = [F.normalize(field.to(work_dtype), dim=-1) for field in rhs]
    lhs_avg = weighted_field_average(lhs_hat, gamma_l)
    rhs_avg = weighted_field_average(rhs_hat, gamma_r)
    neg_hat = neg_avg = None
    if negatives is not None:
        neg_hat = [F.normalize(field.to(work_dtype), dim=-1) for field in negatives]
        neg_avg = weighted_field_average(neg_hat, gamma_r)
    if _checks.should_validate(validate):  # every value check of the call, one sync
        sides = [("lhs", lhs), ("rhs", rhs), ("negatives", negatives or [])]
        named = [(f"{side}[{i}]", field, True) for side, fields in sides
                 for i, field in enumerate(fields)]  # fmt: skip
        if renormalize:  # opposite fields can cancel: an average of zero norm has no direction
            named += [
                ("the lhs field average", lhs_avg, True),
                ("the rhs field average", rhs_avg, True),
            ]
            if neg_avg is not None:
                named.append(("the negatives' field average", neg_avg, True))
        _checks.check_all_values(named, weights, logit_scale)
        if distributed:
            count = 0 if negatives is None else len(negatives[0])
            check_equal_sizes(lhs[0].shape[0], count, lhs[0].device, group)

    term = gcl_loss
    if distributed:
        term = functools.partial(distributed_gcl_loss, group=group)
    common = dict(
        query_ids=query_ids, doc_ids=doc_ids, negative_ids=negative_ids, reduction=reduction,
        impl=impl,
    )  # fmt: skip

    def loss_of(
        left: torch.Tensor, right: torch.Tensor, negative: torch.Tensor | None, **options
    ) -> torch.Tensor:
        if negative is not None:
            negative = negative.to(field_dtype)
        return term(
            left.to(field_dtype), right.to(field_dtype), weights, logit_scale,
            negatives=negative, **options, **common,
        )  # fmt: skip

    # The values were checked above; each term still checks shapes, ids and devices.
    loss = loss_of(lhs_avg, rhs_avg, neg_avg, normalize=renormalize, validate=False)
    for left in lhs_hat:
        for index, right in enumerate(rhs_hat):
            negative = None if neg_hat is None else neg_hat[index]
            loss = loss + loss_of(left, right, negative, normalize=False, validate=False)
    return loss


class MultiFieldGCLLoss(nn.Module):
    """``nn.Module`` form of ``multi_field_gcl_loss``, called like open_clip's ``ClipLoss``.

    ``forward(lhs_features, rhs_features, logit_scale, weights=None, output_dict=False)`` takes
    sequences of field embeddings (e.g. ``[query_text]`` and ``[title_text, image]``) and returns
    the loss or ``{"contrastive_loss": loss}``; the keywords ``query_ids``, ``doc_ids``,
    ``negatives`` and ``negative_ids`` are those of ``multi_field_gcl_loss``.

    Args:
        lhs_gamma, rhs_gamma: field weights, default uniform.
        renormalize: re-normalise the field averages (default True).
        reduction, impl, validate: as in ``gcl_loss``.
        distributed, group: the global-batch loss across ranks, as in ``GCLLoss``.
    """

    def __init__(
        self,
        lhs_gamma: Sequence[float] | None = None,
        rhs_gamma: Sequence[float] | None = None,
        *,
        renormalize: bool = True,
        reduction: Reduction = "mean",
        impl: Impl = "auto",
        validate: bool = True,
        distributed: bool = False,
        group: object | None = None,
    ) -> None:
        super().__init__()
        _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
        _checks.check_choice(impl, _checks.IMPLS, "impl")
        self.lhs_gamma = None if lhs_gamma is None else list(lhs_gamma)
        self.rhs_gamma = None if rhs_gamma is None else list(rhs_gamma)
        self.renormalize, self.reduction, self.impl = renormalize, reduction, impl
        self.validate, self.distributed, self.group = validate, distributed, group

    def forward(
        self,
        lhs_features: Sequence[torch.Tensor],
        rhs_features: Sequence[torch.Tensor],
        logit_scale: float | torch.Tensor,
        weights: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        query_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        negatives: Sequence[torch.Tensor] | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        loss = multi_field_gcl_loss(
            lhs_features,
            rhs_features,
            weights,
            logit_scale,
            lhs_gamma=self.lhs_gamma,
            rhs_gamma=self.rhs_gamma,
            renormalize=self.renormalize,
            query_ids=query_ids,
            doc_ids=doc_ids,
            reduction=self.reduction,
            impl=self.impl,
            validate=self.validate,
            distributed=self.distributed,
            group=self.group,
            negatives=negatives,
            negative_ids=negative_ids,
        )
        return {"contrastive_loss": loss} if output_dict else loss
