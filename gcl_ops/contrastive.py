"""The GCL loss: weighted bidirectional softmax cross-entropy (paper Eq. 4).

With ``Z = t * normalize(Q) @ normalize(D).T`` (``(N, N)``; row ``i`` = query ``i``, column ``j`` =
document ``j``), weights ``w >= 0`` and logit scale ``t > 0``::

    L = -(1 / 2N) * sum_i w_i * (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])
      =  (1 / 2N) * sum_i w_i * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))

where ``neg_row_i = logsumexp_{j != i} Z_ij`` and ``neg_col_j = logsumexp_{i != j} Z_ij`` run over
the negatives (in-batch duplicates excluded). The softplus form keeps a confidently right pair's
tiny loss exact in fp32. Only these statistics touch all N^2 entries; they come from a backend
that never holds the whole matrix:

* ``impl="torch"``: ``gcl_ops.reference.blockwise_masked_lse`` (blocks of rows, recomputed in
  backward), the CPU path;
* ``impl="auto"``: the best backend for the tensors' device.

The rest (normalisation, the diagonal, weights, reduction) is O(N k) PyTorch with autograd.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gcl_ops import _checks
from gcl_ops.reference import Reduction, blockwise_gcl_stats, naive_masked_lse, reduce_loss

Impl = Literal["auto", "torch"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (statistics and losses are never half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scale_tensor(
    logit_scale: float | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``logit_scale`` as a 0-dim tensor, keeping its autograd graph."""
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(float(logit_scale), dtype=dtype, device=device)


def per_pair_loss(
    neg_row: torch.Tensor,
    neg_col: torch.Tensor,
    positive_logits: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of each pair, all ``(N,)``:
    ``w_i / 2 * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))``
    (``= -w_i / 2 * (log P_row[i, i] + log P_col[i, i])``)."""
    loss = 0.5 * (_softplus(neg_row - positive_logits) + _softplus(neg_col - positive_logits))
    return loss if weights is None else weights.to(loss.dtype) * loss


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` to full precision everywhere (``F.softplus`` returns ``x`` above 20,
    off by ``exp(-20) = 2e-9``)."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_impl(impl: str) -> None:
    _checks.check_choice(impl, _checks.IMPLS, "impl")


def gcl_loss(
    query: torch.Tensor,
    doc: torch.Tensor,
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    normalize: bool = True,
    impl: Impl = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Weighted bidirectional contrastive loss of GCL, without materialising the N x N matrix.

    Args:
        query: ``(N, k)`` query embeddings (fp32, fp16, bf16 or fp64).
        doc: ``(N, k)`` document embeddings; pair ``i`` is ``(query[i], doc[i])``.
        weights: ``(N,)`` non-negative pair weights (``score_to_weight``), or None for all ones
            (then the loss is exactly open_clip's ``ClipLoss``).
        logit_scale: ``t > 0``, already exponentiated (open_clip's ``logit_scale.exp()``); a float
            or a 0-dim tensor, which receives a gradient when it requires one.
        query_ids, doc_ids: ``(N,)`` integer ids, or None. An off-diagonal pair ``(i, j)`` with
            ``query_ids[i] == query_ids[j]`` or ``doc_ids[i] == doc_ids[j]`` is left out of both
            softmax denominators: it is another positive, not a negative.
        reduction: ``"mean"`` (default, the paper's ``1/2N``), ``"sum"`` or ``"none"`` (``(N,)``
            per-pair losses ``-w_i/2 * (log P_row[i, i] + log P_col[i, i])``).
        normalize: L2-normalise the embeddings first (default True; idempotent on unit vectors).
        impl: ``"auto"`` (default: the best backend for the device) or ``"torch"`` (the blocked
            PyTorch path, O(N) extra memory beyond a fixed-size block).
        validate: check values (NaN, negative weights, zero rows, scale); one device sync.

    Returns:
        A scalar in the compute dtype (fp64 for fp64 inputs, else fp32), or ``(N,)``.

    Equivalent PyTorch::

        z = logit_scale * F.normalize(query) @ F.normalize(doc).T
        loss = -(w * (z.log_softmax(1).diag() + z.log_softmax(0).diag())).mean() / 2
    """
    _checks.check_embeddings(query, "query")
    n, k = query.shape
    _checks.check_embeddings(doc, "doc", rows=n, width=k)
    _checks.check_weights(weights, n, validate)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_logit_scale(logit_scale, validate)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    _check_impl(impl)
    _checks.check_same_device(
        query=query,
        doc=doc,
        weights=weights,
        query_ids=query_ids,
        doc_ids=doc_ids,
        logit_scale=logit_scale if isinstance(logit_scale, torch.Tensor) else None,
    )
    if _checks.should_validate(validate):
        _checks.check_values(query, "query", nonzero_rows=normalize)
        _checks.check_values(doc, "doc", nonzero_rows=normalize)

    dtype = _compute_dtype(query, doc)
    scale = _scale_tensor(logit_scale, dtype, query.device)
    neg_row, neg_col, positive_logits = blockwise_gcl_stats(
        query.to(dtype),
        doc.to(dtype),
        scale,
        query_ids=query_ids,
        doc_ids=doc_ids,
        normalize=normalize,
    )
    return reduce_loss(per_pair_loss(neg_row, neg_col, positive_logits, weights), reduction)


def gcl_loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """The GCL loss from a similarity matrix the caller already holds.

    Args:
        logits: ``(N, N)`` scaled similarities, ``logits[i, j]`` = query ``i`` vs document ``j``.
        weights, query_ids, doc_ids, reduction, validate: as in ``gcl_loss``.

    Returns:
        A scalar (fp32, or fp64 for fp64 logits), or ``(N,)`` for ``reduction="none"``.

    Equivalent PyTorch:
    ``-(w * (logits.log_softmax(1).diag() + logits.log_softmax(0).diag())).mean() / 2``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (N, N) matrix, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("logits is an empty batch (N = 0): the loss needs at least one pair")
    _checks.check_weights(weights, n, validate)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if _checks.should_validate(validate):
        _checks.check_values(logits, "logits")

    z = logits.to(_compute_dtype(logits))
    neg_row, neg_col = naive_masked_lse(z, query_ids, doc_ids)
    return reduce_loss(per_pair_loss(neg_row, neg_col, z.diagonal(), weights), reduction)


class GCLLoss(nn.Module):
    """Drop-in replacement for open_clip's ``ClipLoss`` that also takes pair weights.

    ``forward(image_features, text_features, logit_scale, weights=None, output_dict=False)``
    treats ``image_features`` as the row side (queries) and ``text_features`` as the column side
    (documents); the loss is symmetric in the two when no ids are given. With ``weights=None`` it
    equals ``ClipLoss`` on the same features and scale.

    open_clip passes features that are already unit-norm. With the default ``normalize=True`` the
    value is then identical to ``ClipLoss`` and so are the model's parameter gradients (the
    model's own normalisation removes the radial component that re-normalising here drops); pass
    ``normalize=False`` to match ``ClipLoss`` also in the gradient w.r.t. the features themselves.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        normalize: L2-normalise the features first (default True).
        impl: backend, as in ``gcl_loss``.
        validate: run value checks (one device sync per call).
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        *,
        normalize: bool = True,
        impl: Impl = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__()
        _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
        _check_impl(impl)
        self.reduction, self.normalize, self.impl, self.validate = (
            reduction,
            normalize,
            impl,
            validate,
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        weights: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        query_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        loss = gcl_loss(
            image_features,
            text_features,
            weights,
            logit_scale,
            query_ids=query_ids,
            doc_ids=doc_ids,
            reduction=self.reduction,
            normalize=self.normalize,
            impl=self.impl,
            validate=self.validate,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, normalize={self.normalize}, impl={self.impl!r}"
