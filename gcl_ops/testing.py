"""Property-testing helpers for code that uses the GCL loss (needs the ``test`` extra: hypothesis).

* ``GCLBatch``: one batch of GCL inputs (embeddings, weights, logit scale, duplicate ids).
* hypothesis strategies: ``gcl_batches`` (whole batches), ``logit_scales``, ``pair_weights``,
  ``duplicate_ids``.
* ``assert_matches_reference(loss_fn, batch)``: checks a loss wrapper's value and its gradients
  w.r.t. the query, the documents and the logit scale against the materialised float64
  definition of the loss written out in this module (``definition_loss``), which shares no code
  with the package's own paths.

Example::

    from hypothesis import given
    from gcl_ops.testing import assert_matches_reference, gcl_batches

    @given(gcl_batches(max_n=32))
    def test_my_wrapper(batch):
        assert_matches_reference(my_loss, batch)   # my_loss(query, doc, weights, logit_scale)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from hypothesis import assume
from hypothesis import strategies as st

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "GCLBatch",
    "assert_matches_reference",
    "definition_loss",
    "duplicate_ids",
    "gcl_batches",
    "logit_scales",
    "pair_weights",
]


@dataclasses.dataclass
class GCLBatch:
    """One batch of GCL inputs. Shapes: ``query``, ``doc`` ``(N, k)``; the rest ``(N,)``."""

    query: torch.Tensor
    doc: torch.Tensor
    weights: torch.Tensor | None = None
    logit_scale: float = 1.0
    query_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.query.shape[0]

    def ids(self) -> dict[str, torch.Tensor]:
        """The id keyword arguments this batch has (``query_ids``, ``doc_ids``), for ``**``."""
        return {
            name: value
            for name, value in (("query_ids", self.query_ids), ("doc_ids", self.doc_ids))
            if value is not None
        }

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> GCLBatch:
        """A copy with the embeddings (and float weights) in ``dtype`` on ``device``."""

        def move(t: torch.Tensor | None, cast: bool) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        return GCLBatch(
            move(self.query, True),
            move(self.doc, True),
            move(self.weights, True),
            self.logit_scale,
            move(self.query_ids, False),
            move(self.doc_ids, False),
        )

    def permuted(self, permutation: torch.Tensor) -> GCLBatch:
        """The same batch with its pairs reordered: pair ``i`` becomes pair ``permutation[i]``."""

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[permutation]

        return GCLBatch(
            take(self.query),
            take(self.doc),
            take(self.weights),
            self.logit_scale,
            take(self.query_ids),
            take(self.doc_ids),
        )


def logit_scales(min_value: float = 0.5, max_value: float = 100.0) -> st.SearchStrategy[float]:
    """Logit scales ``t`` in ``[min_value, max_value]`` (open_clip clamps ``t <= 100``)."""
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)


def pair_weights(n: int, max_value: float = 100.0) -> st.SearchStrategy[torch.Tensor]:
    """``(n,)`` float64 weights in ``[0, max_value]``, zeros included (a pair can be off)."""
    element = st.one_of(st.just(0.0), st.floats(1e-3, max_value, allow_nan=False))
    return st.lists(element, min_size=n, max_size=n).map(
        lambda values: torch.tensor(values, dtype=torch.float64)
    )


def duplicate_ids(n: int, min_distinct: int = 1) -> st.SearchStrategy[torch.Tensor]:
    """``(n,)`` int64 ids drawn from few distinct values, so that duplicates are common.

    ``min_distinct``: the ids take at least this many distinct values (at most ``n``).
    """
    lower = max(1, min(min_distinct, n))

    def ids_from(distinct: int) -> st.SearchStrategy[torch.Tensor]:
        # ``lower`` positions get the values 0 .. lower-1, the others any of ``distinct`` values.
        rest = st.lists(st.integers(0, distinct - 1), min_size=n - lower, max_size=n - lower)
        return st.tuples(rest, st.permutations(range(n))).map(
            lambda drawn: torch.tensor(list(range(lower)) + drawn[0], dtype=torch.int64)[
                torch.tensor(drawn[1], dtype=torch.int64)
            ]
        )

    if lower == 1:  # the original strategy (its examples stay reproducible)
        return st.integers(1, max(n, 1)).flatmap(
            lambda distinct: st.lists(st.integers(0, distinct - 1), min_size=n, max_size=n).map(
                lambda values: torch.tensor(values, dtype=torch.int64)
            )
        )
    return st.integers(lower, n).flatmap(ids_from)


@st.composite
def gcl_batches(
    draw: st.DrawFn,
    *,
    min_n: int = 1,
    max_n: int = 64,
    min_k: int = 1,
    max_k: int = 32,
    dtype: torch.dtype = torch.float64,
    weights: bool | None = None,
    ids: bool | None = None,
    max_logit_scale: float = 100.0,
    min_loss: float = 0.0,
) -> GCLBatch:
    """Random GCL batches: ``N`` in ``[min_n, max_n]``, ``k`` in ``[min_k, max_k]``.

    Documents are a random mix of their query and noise, so that positives stand out by a
    varying margin (the loss is not always near ``log N``). ``weights`` and ``ids``: True always,
    False never, None (default) sometimes.

    ``min_loss > 0`` keeps away from the degenerate batches whose loss is 0 or nearly so (a single
    pair, ids that leave no negative, all weights 0, a confident model at a large scale), where
    an absolute tolerance hides relative errors: ``N >= 2``, at least one weight of 0.1 or more,
    and only batches whose mean loss (``definition_loss`` in float64) is at least ``min_loss``.
    Test those cases explicitly instead.
    """
    nontrivial = min_loss > 0
    n = draw(st.integers(max(min_n, 2) if nontrivial else min_n, max_n), label="N")
    k = draw(st.integers(min_k, max_k), label="k")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    alignment = draw(st.floats(0.0, 0.95), label="alignment")
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(n, k, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, k, generator=generator, dtype=torch.float64)
    doc = alignment * query + (1 - alignment) * noise
    # A row that is exactly zero cannot be normalised: nudge it (probability ~0 except for k = 1).
    doc = torch.where(doc.abs().sum(-1, keepdim=True) == 0, noise, doc)
    use_weights = draw(st.booleans()) if weights is None else weights
    use_ids = draw(st.booleans()) if ids is None else ids
    pair_w = draw(pair_weights(n)) if use_weights else None
    if pair_w is not None and nontrivial and float(pair_w.max()) < 0.1:
        pair_w[draw(st.integers(0, n - 1), label="heavy pair")] = draw(st.floats(0.1, 100.0))
    batch = GCLBatch(
        query=query.to(dtype),
        doc=doc.to(dtype),
        weights=None if pair_w is None else pair_w.to(dtype),
        logit_scale=draw(logit_scales(max_value=max_logit_scale), label="logit_scale"),
        query_ids=draw(duplicate_ids(n, min_distinct=2 if nontrivial else 1)) if use_ids else None,
        doc_ids=draw(duplicate_ids(n, min_distinct=2 if nontrivial else 1)) if use_ids else None,
    )
    if nontrivial:
        value = definition_loss(
            batch.query, batch.doc, batch.weights, batch.logit_scale, **batch.ids()
        )
        assume(float(value) >= min_loss)
    return batch


def definition_loss(
    query: torch.Tensor,
    doc: torch.Tensor,
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
    *,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """The GCL loss from its formula, materialised, in the inputs' dtype (pass float64 for the
    ground truth); differentiable. Written out here, independent of the package's paths::

        Z = t * Q^ @ D^.T                       (Q^ = Q / |Q| row by row when normalize)
        Z[i, j] = -inf where j != i and query_ids or doc_ids of i and j are equal
        L = -(1/2N) sum_i w_i (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])

    ``reduction="sum"`` is ``N L``; ``"none"`` gives the ``(N,)`` terms
    ``-w_i / 2 (log softmax_row(Z)[i, i] + log softmax_col(Z)[i, i])``.
    """
    if normalize:
        query = query / torch.linalg.vector_norm(query, dim=1, keepdim=True)
        doc = doc / torch.linalg.vector_norm(doc, dim=1, keepdim=True)
    z = (logit_scale * query) @ doc.T
    n = z.shape[0]
    same = torch.zeros(n, n, dtype=torch.bool, device=z.device)
    for ids in (query_ids, doc_ids):
        if ids is not None:
            same = same | (ids.reshape(n, 1) == ids.reshape(1, n))
    same = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
    z = z.masked_fill(same, float("-inf"))
    diagonal = torch.arange(n, device=z.device)
    log_p_row = z.log_softmax(dim=1)[diagonal, diagonal]
    log_p_col = z.log_softmax(dim=0)[diagonal, diagonal]
    w = torch.ones_like(log_p_row) if weights is None else weights.to(log_p_row.dtype)
    per_pair = -0.5 * w * (log_p_row + log_p_col)
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.sum() / n


#: dtype -> (rtol, atol of the loss value, atol of the gradients); the value margins are Cut
#: Cross-Entropy's (its fp32 margin covers the ~eps * t * w error of any log-sum-exp form).
_DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-10, 1e-10),
    torch.float32: (1e-5, 5e-4, 1e-4),
    torch.float16: (1e-3, 1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2, 1e-2),
}


def assert_matches_reference(
    loss_fn: Callable[..., torch.Tensor],
    batch: GCLBatch,
    *,
    reduction: Reduction = "mean",
    normalize: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> None:
    """Check ``loss_fn`` and its gradients against the materialised definition in float64.

    ``loss_fn(query, doc, weights, logit_scale, **batch.ids())`` is called with the batch's
    tensors (``logit_scale`` as a 0-dim tensor that requires grad) and must return the loss for
    ``reduction`` (a scalar, or ``(N,)`` for ``"none"``). Its value and its gradients w.r.t.
    ``query``, ``doc`` and ``logit_scale``, under a random upstream gradient, are compared with
    ``definition_loss`` in float64 (the ground truth) on the same inputs.

    The rule (Cut Cross-Entropy's): the error against the ground truth may be no worse than that
    of the naive PyTorch loss run in the batch's own dtype, plus a margin. Elementwise,
    ``|actual - truth| <= 2 * max|naive - truth| + atol * max(1, max|truth|) + rtol * |truth|``.
    The margin ``atol`` defaults by dtype (value / gradients: fp64 ``1e-10``; fp32 ``5e-4`` /
    ``1e-4``; fp16 ``1e-3``; bf16 ``1e-2``) and scales with the tensor's largest entry, since
    rounding error in one entry of a gradient follows the magnitudes it was computed from.
    Raises ``AssertionError`` naming what differs.
    """
    default_rtol, value_atol, grad_atol = _DEFAULT_TOLERANCES.get(
        batch.query.dtype, (1e-5, 5e-4, 1e-4)
    )
    rtol = default_rtol if rtol is None else rtol
    atols = [value_atol, grad_atol, grad_atol, grad_atol] if atol is None else [atol] * 4
    generator = torch.Generator().manual_seed(seed)

    def run(
        fn: Callable[..., torch.Tensor], dtype: torch.dtype | None, upstream: torch.Tensor
    ) -> list[torch.Tensor]:
        """Loss and gradients of ``fn`` with fresh leaves in ``dtype`` (None: the batch's)."""
        query = batch.query.detach().to(dtype=dtype).requires_grad_()
        doc = batch.doc.detach().to(dtype=dtype).requires_grad_()
        scale_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        scale = torch.tensor(batch.logit_scale, dtype=scale_dtype, device=query.device)
        scale.requires_grad_()
        weights = None if batch.weights is None else batch.weights.to(dtype=dtype)
        loss = fn(query, doc, weights, scale, **batch.ids())
        if loss.shape != upstream.shape:
            raise AssertionError(
                f"loss has shape {tuple(loss.shape)}, expected {tuple(upstream.shape)} "
                f"for reduction={reduction!r}"
            )
        leaves = (query, doc, scale)
        # A wrapper that drops an input's gradient (detaches it) gets zeros, and then fails below.
        grads = torch.autograd.grad(loss, leaves, upstream.to(loss), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        return [loss.detach(), *grads]

    def naive(query, doc, weights, scale, **ids):
        return definition_loss(
            query, doc, weights, scale, reduction=reduction, normalize=normalize, **ids
        )

    upstream = torch.randn(
        (batch.n,) if reduction == "none" else (), generator=generator, dtype=torch.float64
    )
    actual = run(loss_fn, None, upstream)
    truth = run(naive, torch.float64, upstream)
    baseline = run(naive, None, upstream)
    names = (
        "loss value",
        "gradient w.r.t. query",
        "gradient w.r.t. doc",
        "gradient w.r.t. logit_scale",
    )
    for name, got, want, same_dtype, margin in zip(names, actual, truth, baseline, atols):
        baseline_error = float((same_dtype.double() - want).abs().max())
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(
            got.double(),
            want,
            rtol=rtol,
            atol=margin * scale + 2 * baseline_error,
            msg=lambda m, name=name: f"{name}: {m}",
        )
