"""The GCL loss: weighted bidirectional softmax cross-entropy (paper Eq. 4), fused in Triton.

With ``Z = t * normalize(Q) @ normalize(D).T`` (``(N, N)``; row ``i`` = query ``i``, column ``j`` =
document ``j``), weights ``w >= 0`` and logit scale ``t > 0``::

    L = -(1 / 2N) * sum_i w_i * (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])
      =  (1 / 2N) * sum_i w_i * (softplus(neg_row_i - Z_ii) + softplus(neg_col_i - Z_ii))

where ``neg_row_i = logsumexp_{j != i} Z_ij`` and ``neg_col_j = logsumexp_{i != j} Z_ij`` run over
the negatives (in-batch duplicates excluded). The softplus form keeps a confidently right pair's
tiny loss exact in fp32. Only these *statistics* touch all N^2 entries; the rest (weights,
reduction) is O(N) PyTorch. Their gradient, what the backward kernel implements::

    dZ_ij = g_row_i exp(Z_ij - neg_row_i) + g_col_j exp(Z_ij - neg_col_j)   (i, j a negative)
    dZ_ii = g_pos_i                                                         (the positive)
    dQ^ = t dZ D^,   dD^ = t dZ^T Q^,   dt = sum_ij dZ_ij S_ij              (S = Q^ D^T)
    dq_i = (dq^_i - q^_i <q^_i, dq^_i>) / |q_i|                            (through q^ = q/|q|)

with ``g_row = dL/d neg_row`` etc. from autograd. This reproduces the design's
``dL/dZ = (w_i P_row + w_j P_col - (w_i + w_j) [i == j]) / 2N``.

The problem may be rectangular: ``N`` rows against ``M >= offset + N`` columns with row ``i``'s
positive at column ``offset + i`` (one rank's rows against the gathered batch).

Layers, from the kernels up (each file imports only those below it):

* ``gcl_ops/kernels/``: the Triton kernels (``stats_forward.py``: one pass over the tiles, one
  exp per entry feeding both the row and the column sums, shifted by a fixed bound instead of an
  online maximum since ``|Z| <= t``, and the exact recomputation of the rare underflowed row;
  ``stats_backward.py``: a program owns a block of one side and keeps its gradient on chip;
  ``logits.py``: the logits form);
* ``gcl_ops/tiling.py``: the tiles per GPU architecture; ``gcl_ops/launchers.py``: the launchers;
  ``gcl_ops/blockwise.py``: the PyTorch path (CPU, fp64, IEEE fp32 on a GPU, wide ``k``);
* ``gcl_ops/ops.py``: the custom ops ``gcl_ops::*`` (opaque to ``torch.compile``);
* ``gcl_ops/autograd.py``: ``torch.autograd.Function`` s and the statistics layer ``gcl_stats``,
  ``per_pair_loss``, ``resolve_backend``; ``gcl_ops/distributed.py``: the same loss over ranks;
* this file: ``gcl_loss``, ``gcl_loss_from_logits`` and the ``GCLLoss`` module; it re-exports
  ``gcl_stats``, ``per_pair_loss``, ``resolve_backend``, ``Impl``, ``MAX_TRITON_K``,
  ``SHIFT_HEADROOM`` and ``TINY_SUM``.

``impl="auto"`` runs Triton on CUDA tensors (fp16, bf16, fp32 with TF32 allowed; ``k <= 1024``)
and the blocked PyTorch path elsewhere. ``impl="triton"`` on CPU tensors needs the Triton
interpreter: set ``TRITON_INTERPRET=1`` in the environment *before* anything imports triton.
"""

import torch
from torch import nn

from gcl_ops import _checks
from gcl_ops.autograd import (
    Impl,
    _check_loss_inputs,
    _compute_dtype,
    _LogitsStatsFunction,
    gcl_stats,
    per_pair_loss,
    resolve_backend,
)
from gcl_ops.blockwise import SHIFT_HEADROOM, TINY_SUM
from gcl_ops.distributed import distributed_gcl_loss
from gcl_ops.launchers import MAX_TRITON_K
from gcl_ops.reference import (
    Reduction,
    append_negatives,
    column_ids,
    naive_masked_lse,
    reduce_loss,
)

__all__ = [
    "MAX_TRITON_K",
    "SHIFT_HEADROOM",
    "TINY_SUM",
    "GCLLoss",
    "Impl",
    "gcl_loss",
    "gcl_loss_from_logits",
    "gcl_stats",
    "per_pair_loss",
    "resolve_backend",
]


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
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
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
        reduction: ``"mean"`` (default, the paper's ``1/2N``), ``"sum"``, ``"weighted_mean"``
            (``sum_i w_i l_i / sum_i w_i``: the unweighted loss's scale, ``docs/CONTRACT.md``
            section 1) or ``"none"`` (``(N,)`` per-pair losses
            ``-w_i/2 * (log P_row[i, i] + log P_col[i, i])``).
        normalize: L2-normalise the embeddings first (default True; idempotent on unit vectors).
        impl: ``"auto"`` (default: the fused Triton kernels for CUDA tensors of fp16/bf16, and
            fp32 where TF32 is allowed, with ``k <= 1024``; the blocked PyTorch path otherwise),
            ``"triton"`` or ``"torch"``.
        validate: check values (NaN, negative weights, zero rows, scale); one device sync.
        negatives: hard negatives, ``(H, k)`` or ``(N, h, k)`` (flattened), in ``doc``'s dtype
            and device: extra documents in *every* query's row softmax, in no column softmax
            (sentence-transformers' MNRL convention; ``docs/CONTRACT.md`` section 1.1).
        negative_ids: ``(H,)`` integer ids of the negatives in the id space of ``doc_ids`` (which
            must be given): negative ``j`` is not a negative of row ``i`` when
            ``negative_ids[j] == doc_ids[i]`` (a mined false negative).

    Returns:
        A scalar in the statistics' dtype (fp64 for fp64 inputs on the PyTorch path, else fp32),
        or ``(N,)``.

    Equivalent PyTorch::

        z = logit_scale * F.normalize(query) @ F.normalize(torch.cat([doc, negatives])).T
        loss = -(w * (z.log_softmax(1).diag() + z[:, :N].log_softmax(0).diag())).mean() / 2
    """
    negatives, negative_ids = _check_loss_inputs(
        query, doc, weights, logit_scale, query_ids, doc_ids, reduction, normalize, validate,
        negatives, negative_ids,
    )  # fmt: skip
    n = query.shape[0]
    columns, column_query_ids, column_doc_ids = append_negatives(
        doc, negatives, query_ids, doc_ids, negative_ids
    )
    neg_row, neg_col, positive_logits = gcl_stats(
        query, columns, logit_scale, query_ids=column_query_ids, doc_ids=column_doc_ids,
        normalize=normalize, impl=impl,
    )  # fmt: skip
    per_pair = per_pair_loss(neg_row, neg_col[:n], positive_logits, weights)
    return reduce_loss(per_pair, reduction, weights)


def gcl_loss_from_logits(
    logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    num_negatives: int = 0,
    negative_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The GCL loss from a similarity matrix the caller already holds.

    Args:
        logits: ``(N, N + num_negatives)`` scaled similarities, ``logits[i, j]`` = query ``i``
            vs document ``j``; the last ``num_negatives`` columns are hard negatives (in every
            row's softmax, in no column softmax: ``gcl_loss``'s ``negatives``).
        num_negatives: ``H``, the hard-negative columns (default 0: a square matrix).
        weights, query_ids, doc_ids, negative_ids, reduction, validate: as in ``gcl_loss``.
        impl: ``"auto"`` (default: Triton for square CUDA fp32/fp16/bf16 matrices: one read of
            the matrix for both log-sum-exps, one pass to write the gradient; PyTorch ops with
            hard negatives), ``"triton"`` (square only) or ``"torch"`` (PyTorch ops on the
            matrix).

    Returns:
        A scalar (fp32, or fp64 for fp64 logits), or ``(N,)`` for ``reduction="none"``.

    Equivalent PyTorch:
    ``-(w * (logits.log_softmax(1).diag() + logits[:, :N].log_softmax(0).diag())).mean() / 2``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) or num_negatives < 0:
        raise ValueError(f"num_negatives must be an integer >= 0, got {num_negatives!r}")
    if logits.dim() != 2 or logits.shape[1] != logits.shape[0] + num_negatives:
        raise ValueError(
            f"logits must be an (N, N + num_negatives) matrix with num_negatives = "
            f"{num_negatives}, got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n, m = logits.shape
    if n == 0:
        raise ValueError("logits is an empty batch (N = 0): the loss needs at least one pair")
    _checks.check_weights(weights, n, validate=False)
    _checks.check_ids(query_ids, n, "query_ids")
    _checks.check_ids(doc_ids, n, "doc_ids")
    if negative_ids is not None:
        if num_negatives == 0:
            raise ValueError("negative_ids were given but logits has no negative columns")
        _checks.check_negative_ids(negative_ids, num_negatives, doc_ids)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if _checks.should_validate(validate):  # one device synchronisation
        _checks.check_all_values([("logits", logits, False)], weights)

    backend = resolve_backend(impl, logits)
    if backend == "triton" and m > n:
        if impl == "triton":
            raise ValueError(
                "impl='triton' takes square logits; with hard negatives (N, N + H) use "
                "impl='torch' or 'auto', or gcl_loss(..., negatives=...) on the embeddings"
            )
        backend = "torch"
    if backend == "triton":
        neg_row, neg_col, positive_logits = _LogitsStatsFunction.apply(logits, query_ids, doc_ids)
    else:
        z = logits.to(_compute_dtype(logits))
        ids = column_ids(query_ids, doc_ids, negative_ids, m - n) if m > n else (query_ids, doc_ids)
        neg_row, neg_col = naive_masked_lse(z, *ids)
        neg_col, positive_logits = neg_col[:n], z.diagonal()
    return reduce_loss(
        per_pair_loss(neg_row, neg_col, positive_logits, weights), reduction, weights
    )


class GCLLoss(nn.Module):
    """Drop-in replacement for open_clip's ``ClipLoss`` that also takes pair weights.

    ``forward(image_features, text_features, logit_scale, weights=None, output_dict=False)``
    treats ``image_features`` as the row side (queries) and ``text_features`` as the column side
    (documents); the loss is symmetric in the two when no ids are given. The keywords
    ``query_ids``, ``doc_ids``, ``negatives`` and ``negative_ids`` are those of ``gcl_loss``.
    With ``weights=None`` it equals ``ClipLoss`` on the same features and scale.

    open_clip passes features that are already unit-norm. With the default ``normalize=True`` the
    value is then identical to ``ClipLoss`` and so are the model's parameter gradients (the
    model's own normalisation removes the radial component that re-normalising here drops); pass
    ``normalize=False`` to match ``ClipLoss`` also in the gradient w.r.t. the features themselves.

    Args:
        reduction: ``"mean"`` (default), ``"sum"``, ``"weighted_mean"`` or ``"none"``.
        normalize: L2-normalise the features first (default True).
        impl: backend, as in ``gcl_loss``.
        validate: run value checks (one device sync per call).
        distributed: each rank passes its own pairs and the loss is that of the global batch
            (``gcl_ops.distributed.distributed_gcl_loss``: documents gathered with gradient,
            values scaled for DDP's gradient averaging), like open_clip's
            ``gather_with_grad=True, local_loss=True``. Default False.
        group: the process group for ``distributed`` (default: the world).
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        *,
        normalize: bool = True,
        impl: Impl = "auto",
        validate: bool = True,
        distributed: bool = False,
        group: object | None = None,
    ) -> None:
        super().__init__()
        _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
        _checks.check_choice(impl, _checks.IMPLS, "impl")
        self.reduction, self.normalize, self.impl = reduction, normalize, impl
        self.validate, self.distributed, self.group = validate, distributed, group

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
        negatives: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        options = dict(
            query_ids=query_ids, doc_ids=doc_ids, reduction=self.reduction,
            normalize=self.normalize, impl=self.impl, validate=self.validate,
            negatives=negatives, negative_ids=negative_ids,
        )  # fmt: skip
        if self.distributed:
            loss = distributed_gcl_loss(
                image_features, text_features, weights, logit_scale, group=self.group, **options
            )
        else:
            loss = gcl_loss(image_features, text_features, weights, logit_scale, **options)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, normalize={self.normalize}, impl={self.impl!r}, "
            f"distributed={self.distributed}"
        )
