"""Value checks cost one read-back from the device per call (``validate=True``, the default), and
still name the problem."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import gcl_ops

READ_BACKS = ("__bool__", "item", "tolist", "__float__", "__int__")


def count_read_backs(fn) -> int:
    """How many times ``fn()`` reads a tensor's value back to Python (a device sync on CUDA)."""
    calls = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def counting(name):
        def read(self, *args, **kwargs):
            calls["n"] += 1
            return originals[name](self, *args, **kwargs)

        return read

    with mock.patch.multiple(torch.Tensor, **{name: counting(name) for name in READ_BACKS}):
        fn()
    return calls["n"]


def inputs(n: int = 12, k: int = 6):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, k, generator=generator), torch.randn(n, k, generator=generator),
            torch.rand(n, generator=generator) + 0.1, torch.tensor(9.0))  # fmt: skip


@pytest.mark.parametrize("call", ["gcl_loss", "multi_field", "from_logits"])
def test_one_read_back_per_call(call: str) -> None:
    query, doc, weights, scale = inputs()
    ids = torch.arange(12) // 2
    loss = {
        "gcl_loss": lambda validate: gcl_ops.gcl_loss(
            query, doc, weights, scale, query_ids=ids, impl="torch", validate=validate
        ),
        "multi_field": lambda validate: gcl_ops.multi_field_gcl_loss(
            [query], [doc, doc.flip(0)], weights, scale, query_ids=ids, impl="torch",
            validate=validate,
        ),
        "from_logits": lambda validate: gcl_ops.gcl_loss_from_logits(
            scale * query @ doc.T, weights, query_ids=ids, impl="torch", validate=validate
        ),
    }[call]  # fmt: skip
    checked = count_read_backs(lambda: loss(True))
    # The checks add exactly one read-back to what the computation itself needs.
    assert checked - count_read_backs(lambda: loss(False)) == 1


@pytest.mark.parametrize(
    "spoil, message",
    [
        (
            lambda q, d, w, t: (q.index_fill(0, torch.tensor([3]), float("nan")), d, w, t),
            "query has non-finite",
        ),
        (
            lambda q, d, w, t: (q, d.index_fill(0, torch.tensor([5]), 0.0), w, t),
            "doc row 5 is all zeros",
        ),
        (lambda q, d, w, t: (q, d, w.index_fill(0, torch.tensor([2]), -1.0), t), r"weights\[2\]"),
        (lambda q, d, w, t: (q, d, w, torch.tensor(float("inf"))), "logit_scale must be positive"),
        (lambda q, d, w, t: (q, d, w, torch.tensor(-2.0)), "logit_scale must be positive"),
    ],
)
def test_the_single_check_still_names_the_problem(spoil, message: str) -> None:
    query, doc, weights, scale = spoil(*inputs())
    with pytest.raises(ValueError, match=message):
        gcl_ops.gcl_loss(query, doc, weights, scale, impl="torch")
