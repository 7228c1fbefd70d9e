"""GCL as a sentence-transformers loss: graded scores as pair weights, in-batch duplicates masked.

An optional integration (``pip install "gcl-ops[st]"``); ``import gcl_ops`` never imports it.

* ``GCLLoss(model, ...)``: the loss that ``SentenceTransformerTrainer`` expects,
  ``forward(sentence_features, labels)``, for ``(anchor, positive, negative_1 .. negative_n)``
  text columns (MNRL's convention; hard negatives optional) with an optional ``score`` (or
  ``label``) column, which the trainer's collator passes as ``labels``. The loss is
  ``gcl_ops.gcl_loss`` (paper Eq. 4, both softmax directions) on the cosine similarities times
  ``scale``, each pair weighted by ``score_to_weight(score)`` (``weights_from="score"``), by the
  column itself (``"weight"``) or not at all (``"none"``: then it equals sentence-transformers'
  symmetric ``MultipleNegativesRankingLoss``, ``directions=("query_to_doc", "doc_to_query")``,
  ``partition_mode="per_direction"``, hard negatives included). The negatives of every row join
  every anchor's softmax (``docs/CONTRACT.md`` section 1.1).
* In-batch duplicates without id columns: equal texts get equal ids, a hash of their token ids
  with padding excluded (``duplicate_ids``). By default (``mask_duplicates="all_columns"``) one
  id space spans every text column, as sentence-transformers' ``NO_DUPLICATES`` sampler would
  keep such rows apart: rows that share a text in any column (directly or through a chain of
  rows) are not each other's negatives, and a hard negative whose text is in a row is not that
  row's negative. ``"per_column"`` compares within a column only (an anchor repeated as another
  row's positive stays a negative); ``"none"`` (or False) masks nothing. Across ranks too. Texts
  are compared as tokenized, prompts included.
* ``CachedGCLLoss(model, ..., mini_batch_size=32)``: the same loss on sentence-transformers' own
  gradient cache (``CachedLossMixin``: replayed dropout, AMP, DDP ``no_sync``, ``MatryoshkaLoss``),
  with the whole batch's loss in one fused call instead of a loop over row chunks.
* ``gather_across_devices=True``: ``gcl_ops.distributed.distributed_gcl_loss``, the loss of the
  global batch, exactly as one process would compute it.
* ``learnable_scale=True``: the scale becomes a parameter (``log_scale``, trained in log space and
  clamped at ``max_scale`` as open_clip does); its gradient is averaged over ranks, since the loss
  module sits outside DDP.

Shapes: ``N`` pairs per batch (per rank), ``k`` the embedding width.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from sentence_transformers.base.losses import CachedLossMixin, has_static_embedding_input
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gcl_ops.sentence_transformers needs sentence-transformers >= 5.7 (CachedLossMixin); "
        'install it with: pip install "gcl-ops[st]"'
    ) from error

try:  # the anchors in one forward pass, all candidate columns merged in another, as MNRL does
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError:  # pragma: no cover - sentence-transformers before merged forwards

    def embed_columns(model: nn.Module, features_list: Sequence[dict[str, Any]]) -> list[Tensor]:
        return [model(features)["sentence_embedding"] for features in features_list]


from gcl_ops import _checks, gcl_loss, score_to_weight
from gcl_ops.autograd import Impl
from gcl_ops.distributed import distributed_gcl_loss, gather_no_grad, rank, world_size
from gcl_ops.st_evaluation import GradedRetrievalEvaluator

__all__ = ["CachedGCLLoss", "GCLLoss", "GradedRetrievalEvaluator", "duplicate_ids", "text_groups"]

WeightsFrom = Literal["score", "weight", "none"]
MaskDuplicates = Literal["all_columns", "per_column", "none"]
STReduction = Literal["mean", "weighted_mean"]

#: ``(query_ids, doc_ids, negative_ids)`` of a batch, each a tensor or None.
BatchIds = tuple[Tensor | None, Tensor | None, Tensor | None]

_WEIGHTS_FROM = ("score", "weight", "none")
_MASK_DUPLICATES = ("all_columns", "per_column", "none")
SMALL_SCORE_FRACTION = 0.1  # scores all below this share of s_max make inverse-type weights ~1

GCL_CITATION = """
@misc{zhu2024generalized,
    title={Generalized Contrastive Learning for Multi-Modal Retrieval and Ranking},
    author={Tianyu Zhu and Myong Chol Jung and Jesse Clark},
    year={2024},
    eprint={2404.08535},
    archivePrefix={arXiv},
    url={https://arxiv.org/abs/2404.08535},
}
"""

GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    url={https://arxiv.org/abs/2101.06983},
}
"""

# ----------------------------------------------------------------------------------------------
# Duplicate ids from token ids
# ----------------------------------------------------------------------------------------------

# Two polynomial hashes modulo primes below 2^31, combined into one int64: every product stays
# below 2^62, so the arithmetic is exact int64 on any device (no overflow, no Python hash(), so
# the same text gets the same id in every process). Two distinct texts of up to L tokens collide
# with probability about (L / 2^31)^2 for the fixed bases below.
_MODULI = (2_147_483_647, 2_147_483_629)
_BASES = (1_000_003, 911_382_323)


def _power_mod(base: int, exponents: Tensor, modulus: int, bits: int) -> Tensor:
    """``base ** exponents % modulus`` elementwise for int64 ``exponents`` in ``[0, 2^bits)``,
    by square-and-multiply (every product of two residues stays below 2^62)."""
    result = torch.ones_like(exponents)
    power = torch.full_like(exponents, base % modulus)
    for bit in range(bits):
        odd = ((exponents >> bit) & 1).bool()
        result = torch.where(odd, result * power % modulus, result)
        power = power * power % modulus
    return result


def _hash_tokens(tokens: Tensor, rows: Tensor, positions: Tensor, n_rows: int) -> Tensor:
    """``(n_rows,)`` int64 hashes of token sequences given as flat ``(T,)`` token ids, the row
    each token belongs to and its position within that row's real (unpadded) tokens."""
    tokens, rows, positions = tokens.long(), rows.long(), positions.long()
    bits = int(positions.max()).bit_length() if positions.numel() else 0  # one device sync
    parts = []
    for base, modulus in zip(_BASES, _MODULI):
        terms = (tokens % modulus + 1) * _power_mod(base, positions, modulus, bits) % modulus
        sums = torch.zeros(n_rows, dtype=torch.long, device=tokens.device)
        sums.index_add_(0, rows, terms)  # < T * 2^31: exact in int64
        parts.append(sums % modulus)
    return parts[0] * _MODULI[1] + parts[1]


def duplicate_ids(features: dict[str, Any]) -> Tensor:
    """One int64 id per row of a tokenized column: equal for equal texts, whatever the padding.

    Args:
        features: a column as the trainer's collator (``model.preprocess``) produces it: padded,
            ``input_ids`` ``(N, L)`` with ``attention_mask`` ``(N, L)`` (padding, left or right, is
            left out; without a mask every position counts), or flattened for padding-free
            attention, ``input_ids`` ``(1, T)`` with ``cu_seq_lens_q`` ``(N + 1,)``.

    Returns:
        ``(N,)`` int64 ids on the device of ``input_ids``: a polynomial hash of each row's token
        ids, deterministic across processes (so ranks agree on duplicates).

    Raises:
        ValueError: no ``input_ids`` (e.g. image inputs): pass ``mask_duplicates=False``.
    """
    input_ids = features.get("input_ids")
    if not isinstance(input_ids, Tensor):
        raise ValueError(
            "mask_duplicates=True hashes each text's token ids, but this input column has no "
            f"'input_ids' tensor (keys: {sorted(features)}); pass mask_duplicates=False for "
            "non-text inputs"
        )
    if "cu_seq_lens_q" in features:  # flattened: all sequences in one row
        bounds = features["cu_seq_lens_q"].to(device=input_ids.device, dtype=torch.long)
        tokens = input_ids.reshape(-1)[: int(bounds[-1])]
        n_rows = bounds.numel() - 1
        rows = torch.repeat_interleave(
            torch.arange(n_rows, device=tokens.device), bounds[1:] - bounds[:-1]
        )
        positions = torch.arange(tokens.numel(), device=tokens.device) - bounds[:-1][rows]
        return _hash_tokens(tokens, rows, positions, n_rows)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (N, L), got {tuple(input_ids.shape)}")
    mask = features.get("attention_mask")
    keep = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = keep.long().cumsum(dim=1) - 1  # index among the real tokens
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)
    return _hash_tokens(input_ids[keep], rows[keep], positions[keep], input_ids.shape[0])


def text_groups(
    anchor_ids: Tensor, positive_ids: Tensor, negative_ids: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Ids in one space over all text columns: the rows that share a text, in any column, form
    a group (the connected components of "shares a text with", so a chain of rows is one group).

    Args:
        anchor_ids, positive_ids: ``(N,)`` text ids (``duplicate_ids``) of the two pair columns.
        negative_ids: ``(H,)`` text ids of the hard negatives, or None.

    Returns:
        ``group (N,)``: the smallest text id of each row's group (the same in every process that
        sees the same rows); and ``(H,)`` ids of the negatives: the group of the rows whose anchor
        or positive has that text, else the negative's own text id. Pass ``group`` as both
        ``query_ids`` and ``doc_ids`` of ``gcl_loss``: rows of one group are not each other's
        negatives, nor is a hard negative whose text is in the row's group.

    Equivalent (Python): union-find over rows, joining rows with an equal text id.
    """
    n = anchor_ids.numel()
    texts = torch.cat([anchor_ids, positive_ids])
    rows = torch.arange(n, device=texts.device).repeat(2)
    unique, text_index = torch.unique(texts, return_inverse=True)
    # Label propagation on row indices with pointer jumping: every row's label is a row of its
    # group, never larger than itself; a pass hooks each row to the smallest label among the rows
    # it shares a text with, and label[label] shortcuts chains (O(log N) passes on a chain).
    label = torch.arange(n, device=texts.device)
    while True:
        text_label = torch.full((unique.numel(),), n, dtype=torch.long, device=texts.device)
        text_label.scatter_reduce_(0, text_index, label[rows], "amin")
        hooked = label.clone().scatter_reduce_(0, rows, text_label[text_index], "amin")
        hooked = hooked[hooked]
        if torch.equal(hooked, label):  # stable: rows sharing a text have equal labels
            break
        label = hooked
    # Name each group by its smallest text id, which every process computes alike.
    largest = torch.iinfo(torch.int64).max
    group_id = torch.full((n,), largest, dtype=torch.long, device=texts.device)
    group_id.scatter_reduce_(0, label[rows], texts, "amin")
    group = group_id[label]
    if negative_ids is None:
        return group, None
    text_group = torch.full((unique.numel(),), largest, dtype=torch.long, device=texts.device)
    text_group.scatter_reduce_(0, text_index, group[rows], "amin")
    position = torch.searchsorted(unique, negative_ids).clamp(max=unique.numel() - 1)
    in_batch = unique[position] == negative_ids
    return group, torch.where(in_batch, text_group[position], negative_ids)


# ----------------------------------------------------------------------------------------------
# The learnable scale under DDP
# ----------------------------------------------------------------------------------------------


class _AverageGradOverRanks(torch.autograd.Function):
    """Identity forward; backward averages the gradient over ranks (DDP averages the model's
    gradients, but the loss module's own parameters sit outside DDP)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        size = world_size()
        if size > 1:
            grad = grad.clone()
            dist.all_reduce(grad)  # SUM: gloo has no AVG
            grad = grad / size
        return grad


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------


class _GCLLossBase(nn.Module):
    """Configuration, weights, ids and the loss call shared by ``GCLLoss`` and ``CachedGCLLoss``;
    the options are documented on ``GCLLoss``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        scale: float = 20.0,
        weights_from: WeightsFrom = "score",
        weight_kind: str = "inverse",
        s_max: float = 100.0,
        reduction: STReduction = "mean",
        mask_duplicates: MaskDuplicates | bool = "all_columns",
        gather_across_devices: bool = False,
        impl: Impl = "auto",
        learnable_scale: bool = False,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__()
        _checks.check_choice(weights_from, _WEIGHTS_FROM, "weights_from")
        _checks.check_choice(impl, _checks.IMPLS, "impl")
        _checks.check_choice(reduction, get_args(STReduction), "reduction")
        if isinstance(mask_duplicates, bool):
            mask_duplicates = "all_columns" if mask_duplicates else "none"
        _checks.check_choice(mask_duplicates, _MASK_DUPLICATES, "mask_duplicates")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        if learnable_scale and not (math.isfinite(max_scale) and 0 < scale <= max_scale):
            raise ValueError(
                f"a learnable scale starts at scale={scale} and is clamped at max_scale={max_scale}:"
                " need 0 < scale <= max_scale"
            )
        # Checks weight_kind and s_max with gcl_ops' own messages (a score of s_max is valid).
        score_to_weight(torch.tensor([float(s_max)]), weight_kind, s_max=s_max)  # type: ignore[arg-type]
        self.model = model
        self.weights_from = weights_from
        self.weight_kind = weight_kind
        self.s_max = float(s_max)
        self.reduction = reduction
        self.mask_duplicates = mask_duplicates
        self.gather_across_devices = gather_across_devices
        self.impl = impl
        self.learnable_scale = learnable_scale
        self.max_scale = float(max_scale)
        self._warned_small_scores = False
        if learnable_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self._scale = float(scale)

    # -- scale --------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """The current scale ``t`` (``1 / temperature``) as a float."""
        if self.learnable_scale:
            return min(math.exp(float(self.log_scale.detach())), self.max_scale)
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"scale must be a positive finite number, got {value}")
        if self.learnable_scale:
            with torch.no_grad():
                self.log_scale.fill_(math.log(value))
        else:
            self._scale = float(value)

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def logit_scale(self) -> float | Tensor:
        """``t`` as ``gcl_loss`` takes it: a float, or with ``learnable_scale`` the 0-dim tensor
        ``min(exp(log_scale), max_scale)`` whose gradient is averaged over ranks."""
        if not self.learnable_scale:
            return self._scale
        return _AverageGradOverRanks.apply(self.log_scale).exp().clamp(max=self.max_scale)

    # -- inputs -------------------------------------------------------------------------------

    def _check_columns(self, sentence_features: Iterable[dict[str, Tensor]]) -> list[dict]:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                f"{type(self).__name__} takes (anchor, positive, negative_1 .. negative_n) text "
                f"columns, optionally with a numeric 'score' or 'label' column, but the batch has "
                f"{len(features)} text column(s)"
            )
        return features

    def pair_weights(self, labels: Tensor | None, n: int) -> Tensor | None:
        """``(n,)`` pair weights from the collated ``labels`` (``(n,)`` scores or weights), or None
        for ``weights_from="none"``."""
        if self.weights_from == "none":
            return None
        if labels is None:
            raise ValueError(
                f"weights_from={self.weights_from!r} needs a numeric 'score' or 'label' column in "
                "the dataset (the collator passes it as labels), but the batch has no labels; "
                "add one, or use weights_from='none' for unweighted pairs"
            )
        if not isinstance(labels, Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(
                    f"the {self.weights_from} column must be numeric, got {labels!r:.80}"
                ) from error
        if labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"the {self.weights_from} column must be numeric, got {labels.dtype}")
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (n,):
            raise ValueError(
                f"labels must hold one {self.weights_from} per pair, shape ({n},), got "
                f"{tuple(labels.shape)}"
            )
        if self.weights_from == "weight":
            return labels if labels.is_floating_point() else labels.to(torch.get_default_dtype())
        weights = score_to_weight(labels, self.weight_kind, s_max=self.s_max)  # type: ignore[arg-type]
        self._warn_if_scores_do_not_fit(labels, weights)
        return weights

    def _warn_if_scores_do_not_fit(self, scores: Tensor, weights: Tensor) -> None:
        """Warn once when every score of a batch lies in the bottom tenth of ``(0, s_max]``: the
        inverse-type weights are then nearly equal (scores in (0, 1] with ``s_max=100`` give
        0.99-1.0), a silently unweighted loss. ``linear`` weights keep the scores' ratios."""
        if self._warned_small_scores or self.weight_kind in ("constant", "linear"):
            return
        top = float(scores.max()) if scores.numel() else self.s_max
        if top > SMALL_SCORE_FRACTION * self.s_max:
            return
        self._warned_small_scores = True
        warnings.warn(
            f"every score of a batch is at most {top:g}, under {SMALL_SCORE_FRACTION:.0%} of "
            f"s_max={self.s_max:g}, so the {self.weight_kind} weights lie within "
            f"{float(weights.min()):.3g}..{float(weights.max()):.3g}: nearly the unweighted loss. "
            "Pass s_max = the largest score your data can have (e.g. s_max=1.0 for scores in "
            "(0, 1]).",
            UserWarning,
            stacklevel=3,
        )

    def batch_ids(self, features: Sequence[dict[str, Any]]) -> BatchIds:
        """``(query_ids, doc_ids, negative_ids)`` from the token ids (``(N,)``, ``(N,)``,
        ``(H,)``, or None), as ``mask_duplicates`` asks. Computed before embedding: modules may
        edit the features in place (``Pooling(include_prompt=False)`` zeroes the prompt in the
        attention mask)."""
        if self.mask_duplicates == "none":
            return None, None, None
        anchor, positive = duplicate_ids(features[0]), duplicate_ids(features[1])
        negatives = None
        if len(features) > 2:
            negatives = torch.cat([duplicate_ids(column) for column in features[2:]])
        if self.mask_duplicates == "per_column":
            return anchor, positive, negatives
        if not self.gather_across_devices or world_size() == 1:
            group, negatives = text_groups(anchor, positive, negatives)
            return group, group, negatives
        # Groups span ranks: every rank computes them on the global batch and keeps its rows.
        n = anchor.numel()
        group, negatives = text_groups(gather_no_grad(anchor), gather_no_grad(positive), negatives)
        own = group[rank() * n : (rank() + 1) * n]
        return own, own, negatives

    # -- the loss -----------------------------------------------------------------------------

    def gcl(
        self,
        embeddings: Sequence[Tensor],
        labels: Tensor | None,
        ids: BatchIds = (None, None, None),
    ) -> Tensor:
        """The GCL loss of ``[(N, k) anchors, (N, k) positives, (N, k) negatives ...]`` (this
        rank's rows), a scalar: ``gcl_loss`` (or ``distributed_gcl_loss`` with
        ``gather_across_devices``) with the weights from ``labels``, the ids and the scale; the
        negative columns are the hard negatives, ``(N * n, k)`` column by column."""
        if len(embeddings) < 2:
            raise ValueError(
                f"expected [anchor, positive, negative_1 ..] embeddings, got {len(embeddings)}"
            )
        query, doc = embeddings[0], embeddings[1]
        for index, column in enumerate(embeddings[2:], start=1):
            if column.shape[0] != query.shape[0]:
                raise ValueError(
                    f"negative column {index} has {column.shape[0]} rows, expected one per "
                    f"anchor ({query.shape[0]})"
                )
        negatives = torch.cat(list(embeddings[2:])) if len(embeddings) > 2 else None
        weights = self.pair_weights(labels, query.shape[0])
        if weights is not None:
            weights = weights.to(query.device)
        query_ids, doc_ids, negative_ids = ids
        loss_fn = distributed_gcl_loss if self.gather_across_devices else gcl_loss
        return loss_fn(
            query, doc, weights, self.logit_scale(), query_ids=query_ids, doc_ids=doc_ids,
            negatives=negatives, negative_ids=negative_ids if negatives is not None else None,
            reduction=self.reduction, impl=self.impl,
        )  # fmt: skip

    # -- model card ---------------------------------------------------------------------------

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "scale": self.scale,
            "learnable_scale": self.learnable_scale,
            "weights_from": self.weights_from,
        }
        if self.weights_from == "score":
            config.update(weight_kind=self.weight_kind, s_max=self.s_max)
        config["reduction"] = self.reduction
        if self.learnable_scale:
            config["max_scale"] = self.max_scale
        config.update(
            mask_duplicates=self.mask_duplicates,
            gather_across_devices=self.gather_across_devices,
            impl=self.impl,
        )
        return config

    @property
    def citation(self) -> str:
        return GCL_CITATION


class GCLLoss(_GCLLossBase):
    """Generalized Contrastive Learning for ``(anchor, positive[, negative_1 ..][, score])`` rows.

    ``L = -(1 / 2N) sum_i w_i (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])`` with
    ``Z = scale * cos(anchor_i, positive_j)``, the hard negatives of every row in every anchor's
    row softmax, and ``w_i`` from the score column (``docs/CONTRACT.md``). With ``w = 1`` and no
    duplicates this is sentence-transformers' symmetric ``MultipleNegativesRankingLoss(model,
    scale, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")``, in
    value and gradients, hard negatives included: switching needs one changed line.

    Args (all but ``model`` keyword-only):
        model: the ``SentenceTransformer`` to train.
        scale: the logit scale ``t`` (``1 / temperature``; 20 as sentence-transformers'
            ``MultipleNegativesRankingLoss``); the initial value with ``learnable_scale``.
        weights_from: where the pair weights come from: ``"score"`` (default: the ``score`` /
            ``label`` column through ``score_to_weight(score, weight_kind, s_max=s_max)``, scores
            in ``(0, s_max]``), ``"weight"`` (that column is the weight) or ``"none"``
            (unweighted; the column, if any, is ignored).
        weight_kind: ``"inverse"`` (default), ``"constant"``, ``"linear"``, ``"inverse_sqrt"`` or
            ``"piecewise"`` (paper Eq. 1-3).
        s_max: the largest possible score (default 100); a batch whose scores all lie below a
            tenth of it warns once (the weights would be nearly equal).
        reduction: ``"mean"`` (default, the paper's: ``1/2N``, so inverse weights make the loss
            and its gradients 10-30 times MNRL's) or ``"weighted_mean"`` (divided by the sum of
            the weights instead: MNRL's scale, so its learning rate and ``max_grad_norm`` carry
            over).
        mask_duplicates: ``"all_columns"`` (default, or True): rows sharing a text in any column
            are not each other's negatives, nor is a hard negative a row holds (what
            ``NO_DUPLICATES`` batches guarantee MNRL); ``"per_column"``: repeats within the
            anchor or the positive column, and a negative equal to a row's positive; ``"none"``
            (or False). Equal texts are found by hashing token ids.
        gather_across_devices: under ``torch.distributed`` (DDP), the loss of the global batch:
            every rank's documents, negatives and statistics are gathered
            (``distributed_gcl_loss``). Each rank returns its share times the world size, so
            DDP's gradient averaging yields the single-process gradient of the global loss.
        impl: ``"auto"`` (fused Triton kernels on CUDA, the blocked PyTorch path on CPU),
            ``"triton"`` or ``"torch"``.
        learnable_scale: train the scale (as ``log_scale``, clamped at ``max_scale``); the
            trainer's optimizer picks up the parameter. Default False.
        max_scale: the upper clamp of a learnable scale (default 100, as open_clip).

    Inputs: two or more text columns, ``(anchor, positive, negative_1 .. negative_n)``, and
    optionally a numeric ``score`` / ``label`` column, which the collator passes as ``labels``,
    ``(N,)``.
    """

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        """The loss of a collated batch: a feature dict per text column (anchor, positive,
        negatives) and the ``(N,)`` labels (scores or weights, or None with
        ``weights_from="none"``)."""
        features = self._check_columns(sentence_features)
        ids = self.batch_ids(features)
        return self.compute_loss_from_embeddings(embed_columns(self.model, features), labels, ids)

    def compute_loss_from_embeddings(
        self,
        embeddings: Sequence[Tensor],
        labels: Tensor | None,
        ids: BatchIds = (None, None, None),
    ) -> Tensor:
        """The loss from ``[(N, k) anchors, (N, k) positives, (N, k) negatives ...]``."""
        return self.gcl(embeddings, labels, ids)


class CachedGCLLoss(CachedLossMixin, _GCLLossBase):
    """``GCLLoss`` with gradient caching (GradCache, Gao et al. 2021) for batches larger than
    memory allows, on sentence-transformers' ``CachedLossMixin``.

    Every column is embedded in mini-batches of ``mini_batch_size`` rows without activations, the
    loss of the whole batch and its gradient w.r.t. the embeddings come from one fused
    ``gcl_loss`` call (which never holds the ``N x N`` similarities), and the mini-batches are
    re-embedded with gradient, replaying their random state (dropout), when the trainer calls
    ``backward``. The parameters get the same gradient as ``GCLLoss`` on the whole batch. Works
    inside ``MatryoshkaLoss`` and under DDP and AMP like sentence-transformers' cached losses.

    Args (all but ``model`` keyword-only):
        model: the ``SentenceTransformer`` to train.
        mini_batch_size: rows per embedding call (memory against speed; default 32).
        mini_batch_num_tokens: instead, pack mini-batches up to this many non-padding tokens.
        show_progress_bar: show the mini-batch progress.
        **options: ``scale``, ``weights_from``, ``weight_kind``, ``s_max``, ``reduction``,
            ``mask_duplicates``, ``gather_across_devices``, ``impl``, ``learnable_scale``,
            ``max_scale``: as in ``GCLLoss``.

    With hard negatives it equals sentence-transformers' ``CachedMultipleNegativesRankingLoss``
    (symmetric form) as ``GCLLoss`` equals MNRL.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        **options: Any,
    ) -> None:
        _GCLLossBase.__init__(self, model, **options)
        inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        if has_static_embedding_input(inner):
            raise ValueError(
                "CachedGCLLoss cannot split a StaticEmbedding model's inputs into mini-batches; "
                "use GCLLoss instead"
            )
        if not (isinstance(mini_batch_size, int) and mini_batch_size > 0):
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
            raise ValueError(
                f"mini_batch_num_tokens must be a positive integer or None, got {mini_batch_num_tokens}"
            )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        # Per forward pass: the batch's ids (calculate_loss sees embeddings only) and the scale's
        # gradient from the cached backward, applied when the trainer's backward reaches the loss.
        self._ids: BatchIds = (None, None, None)
        self._scale_grad: Tensor | None = None

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        """As ``GCLLoss.forward``; the returned loss back-propagates into the model through
        sentence-transformers' gradient-cache hook."""
        features = self._check_columns(sentence_features)
        self._ids = self.batch_ids(features)
        self._scale_grad = None
        try:
            loss = self.forward_cached(features, labels)
        finally:
            self._ids = (None, None, None)
        scale_grad, self._scale_grad = self._scale_grad, None
        if scale_grad is not None and loss.requires_grad:
            log_scale = self.log_scale

            def backward_scale(grad_output: Tensor) -> None:
                # grad_output carries the AMP loss scale and the gradient-accumulation factor,
                # as it does for the cached embedding gradients.
                # Hooks run with gradient mode off, as the cached re-embedding does.
                with torch.enable_grad():
                    surrogate = log_scale * (scale_grad * grad_output).to(log_scale.dtype)
                    surrogate.backward()

            loss.register_hook(backward_scale)
        return loss

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss of the whole batch from the per-mini-batch embeddings ``reps`` (one list of
        ``(b, k)`` tensors per column), in one ``gcl_loss`` call. With ``with_backward`` the
        embeddings' gradients are stored in their ``.grad`` (the cache) and the scale's is held
        back for the trainer's backward; returns the detached loss."""
        columns = [torch.cat(column) for column in reps]
        loss = self.gcl(columns, labels, self._ids)
        if not with_backward:
            return loss
        leaves = [part for column in reps for part in column]
        inputs = [*leaves, self.log_scale] if self.learnable_scale else leaves
        grads = torch.autograd.grad(loss, inputs)
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
        if self.learnable_scale:
            scale_grad = grads[-1] * self._matryoshka_weight(columns[0].shape[1])
            self._scale_grad = (
                scale_grad if self._scale_grad is None else self._scale_grad + scale_grad
            )
        return loss.detach()

    def _matryoshka_weight(self, width: int) -> float:
        """The weight ``MatryoshkaLoss`` gives this call's loss (1 outside it).

        ``MatryoshkaLoss`` wraps ``calculate_loss`` of a cached loss and calls it once per
        dimension with embeddings truncated to that width; it applies the dimension's weight to
        the embeddings' gradients itself, but cannot reach the scale's, so it is applied here."""
        wrapper = self.__dict__.get("calculate_loss")
        dims = getattr(wrapper, "matryoshka_dims", None)
        if dims is None:
            return 1.0
        if width not in dims:
            raise ValueError(
                f"embedding width {width} is none of MatryoshkaLoss's dims {tuple(dims)}: cannot "
                "weight the learnable scale's gradient"
            )
        return float(wrapper.matryoshka_weights[list(dims).index(width)])

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **super().get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return GCL_CITATION + GRADCACHE_CITATION
