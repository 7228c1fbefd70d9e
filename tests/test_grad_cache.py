"""Gradient caching gives the gradients of full-batch backpropagation, in chunk-sized memory."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import gcl_ops
from gcl_ops.grad_cache import cached_step, split_batch


class TextTower(torch.nn.Module):
    """A tiny open_clip-style text tower: token embedding, mean pool, dropout, projection."""

    def __init__(self, vocab: int = 50, width: int = 24, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 32), torch.nn.GELU(), torch.nn.Dropout(0.2)
        )
        self.proj = torch.nn.Linear(32, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.mlp(self.embed(tokens).mean(dim=1))), dim=-1)


class ImageTower(torch.nn.Module):
    """A tiny image tower: conv, dropout, pooled projection."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.2)
        self.proj = torch.nn.Linear(8, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.drop(F.relu(self.conv(images))).mean(dim=(2, 3))), dim=-1)


def make_setup(batch: int, seed: int = 0):
    torch.manual_seed(seed)
    query_tower, title_tower, image_tower = TextTower(), TextTower(), ImageTower()
    logit_scale = torch.nn.Parameter(torch.tensor(2.3))
    inputs = [
        torch.randint(0, 50, (batch, 7)),
        torch.randint(0, 50, (batch, 9)),
        torch.randn(batch, 3, 8, 8),
    ]
    weights = gcl_ops.score_to_weight(torch.randint(1, 101, (batch,)).float())
    ids = torch.randint(0, batch // 2 + 1, (batch,))
    modules = [query_tower, title_tower, image_tower]
    parameters = [p for m in modules for p in m.parameters()] + [logit_scale]
    return modules, logit_scale, inputs, weights, ids, parameters


def loss_of(embeddings, logit_scale, weights, ids, fields):
    if fields == 1:
        return gcl_ops.gcl_loss(
            embeddings[0], embeddings[1], weights, logit_scale.exp(), query_ids=ids
        )
    return gcl_ops.multi_field_gcl_loss(
        embeddings[:1], embeddings[1:], weights, logit_scale.exp(), query_ids=ids
    )


def reference_gradients(modules, logit_scale, inputs, weights, ids, parameters, sizes, fields):
    """Full-batch backpropagation through one graph; the encoders run chunk by chunk in the same
    order as the cached step so that dropout draws the same masks."""
    embeddings = [
        torch.cat([module(chunk) for chunk in split_batch(x, size)])
        for module, x, size in zip(modules[: fields + 1], inputs[: fields + 1], sizes)
    ]
    loss = loss_of(embeddings, logit_scale, weights, ids, fields)
    return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)


@pytest.mark.parametrize("fields", [1, 2], ids=["query-vs-title", "query-vs-title+image"])
@pytest.mark.parametrize("chunk_size", [8, 7, (5, 16, 3)], ids=["divides", "ragged", "per-field"])
def test_cached_step_equals_full_batch_backprop(fields: int, chunk_size) -> None:
    batch = 32
    modules, logit_scale, inputs, weights, ids, parameters = make_setup(batch)
    encoders, used = modules[: fields + 1], inputs[: fields + 1]
    sizes = (
        [chunk_size] * (fields + 1)
        if isinstance(chunk_size, int)
        else list(chunk_size[: fields + 1])
    )

    torch.manual_seed(123)
    want_loss, want = reference_gradients(
        modules, logit_scale, inputs, weights, ids, parameters, sizes, fields
    )
    torch.manual_seed(123)
    got_loss = cached_step(
        encoders, used, lambda e: loss_of(e, logit_scale, weights, ids, fields), sizes
    )
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    for parameter, expected in zip(parameters, want):
        if expected is None:  # a tower this configuration does not use
            assert parameter.grad is None
            continue
        # fp32, rtol 1e-5; entries near 0 get an absolute slack of 1e-5 of the largest entry.
        torch.testing.assert_close(
            parameter.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )


@pytest.mark.parametrize("chunk_size", [8, (5, 7, 6)], ids=["one-size", "per-field"])
def test_hard_negatives_field_equals_full_batch_backprop(chunk_size) -> None:
    # Hard negatives are a field of their own (H = 2N rows, through the document tower), chunked
    # like the documents; the loss takes them as gcl_loss's negatives, with ids.
    batch, per_row = 16, 2
    modules, logit_scale, inputs, weights, ids, parameters = make_setup(batch)
    query_tower, doc_tower = modules[0], modules[1]
    negative_tokens = torch.randint(0, 50, (batch * per_row, 9))
    doc_ids = torch.arange(batch)
    negative_ids = torch.randint(0, 2 * batch, (batch * per_row,))  # some equal a positive

    def loss_fn(e):
        return gcl_ops.gcl_loss(
            e[0], e[1], weights, logit_scale.exp(), query_ids=ids, doc_ids=doc_ids,
            negatives=e[2], negative_ids=negative_ids,
        )  # fmt: skip

    encoders = [query_tower, doc_tower, doc_tower]
    fields = [inputs[0], inputs[1], negative_tokens]
    sizes = [chunk_size] * 3 if isinstance(chunk_size, int) else list(chunk_size)
    torch.manual_seed(5)
    embeddings = [
        torch.cat([encoder(chunk) for chunk in split_batch(x, size)])
        for encoder, x, size in zip(encoders, fields, sizes)
    ]
    want_loss = loss_fn(embeddings)
    want = torch.autograd.grad(want_loss, parameters, allow_unused=True)
    torch.manual_seed(5)
    got_loss = cached_step(encoders, fields, loss_fn, sizes)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-6, atol=1e-7)
    checked = 0
    for parameter, expected in zip(parameters, want):
        if expected is None:
            assert parameter.grad is None
            continue
        torch.testing.assert_close(
            parameter.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )
        checked += 1
    assert checked == sum(1 for _ in query_tower.parameters()) * 2 + 1


def test_dropout_replay_is_what_makes_them_equal(monkeypatch) -> None:
    # cached_step equals the reference because phase 3 replays each chunk's random state. With
    # the replay disabled it draws new dropout masks and its gradients differ: the equality in
    # test_cached_step_equals_full_batch_backprop is not vacuous.
    import gcl_ops.grad_cache as grad_cache

    modules, logit_scale, inputs, weights, ids, parameters = make_setup(32)

    def run_cached() -> list[torch.Tensor]:
        for parameter in parameters:
            parameter.grad = None
        torch.manual_seed(1)
        cached_step(modules[:2], inputs[:2], lambda e: loss_of(e, logit_scale, weights, ids, 1), 8)
        return [p.grad.clone() for p in parameters if p.grad is not None]

    torch.manual_seed(1)
    _, want = reference_gradients(modules, logit_scale, inputs, weights, ids, parameters, [8, 8], 1)
    want = [g for g in want if g is not None]
    replayed = run_cached()
    for got, expected in zip(replayed, want):
        torch.testing.assert_close(
            got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )
    monkeypatch.setattr(grad_cache.RandomState, "replay", lambda self: contextlib.nullcontext())
    fresh_masks = run_cached()
    assert not torch.allclose(fresh_masks[0], want[0], rtol=1e-3)


def test_under_bf16_autocast() -> None:
    modules, logit_scale, inputs, weights, ids, parameters = make_setup(24)
    sizes = [5, 5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        want_loss, want = reference_gradients(
            modules, logit_scale, inputs, weights, ids, parameters, sizes, 1
        )
        torch.manual_seed(7)
        got_loss = cached_step(
            modules[:2], inputs[:2], lambda e: loss_of(e, logit_scale, weights, ids, 1), sizes
        )
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=1e-3)
    for parameter, expected in zip(parameters, want):
        if expected is not None:
            torch.testing.assert_close(parameter.grad, expected, rtol=5e-2, atol=5e-3)


def test_with_a_grad_scaler() -> None:
    modules, logit_scale, inputs, weights, ids, parameters = make_setup(24)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    torch.manual_seed(9)
    _, want = reference_gradients(modules, logit_scale, inputs, weights, ids, parameters, [6, 6], 1)
    torch.manual_seed(9)
    cached_step(
        modules[:2],
        inputs[:2],
        lambda e: loss_of(e, logit_scale, weights, ids, 1),
        6,
        scaler=scaler,
    )
    scaler.unscale_(optimizer)  # the cached gradients carried the scale into every parameter
    for parameter, expected in zip(parameters, want):
        if expected is not None:
            torch.testing.assert_close(
                parameter.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
            )


def test_split_batch_structures() -> None:
    tokens = {"ids": torch.arange(10).reshape(5, 2), "mask": torch.ones(5, 2)}
    chunks = split_batch(tokens, 2)
    assert [c["ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert [len(c) for c in split_batch(["a", "b", "c"], 2)] == [2, 1]
    pairs = split_batch((torch.zeros(5, 1), torch.ones(5, 3)), 4)
    assert [tuple(x.shape[0] for x in pair) for pair in pairs] == [(4, 4), (1, 1)]


def test_bad_arguments() -> None:
    modules, logit_scale, inputs, weights, ids, _ = make_setup(8)
    loss = lambda e: loss_of(e, logit_scale, weights, ids, 1)  # noqa: E731
    with pytest.raises(ValueError, match="one input per encoder"):
        cached_step(modules[:2], inputs[:1], loss, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_step(modules[:2], inputs[:2], loss, 0)
    with pytest.raises(ValueError, match="doc has 5 rows, expected 8"):  # gcl_loss says so
        cached_step(modules[:2], [inputs[0], inputs[1][:5]], loss, 4)
    with pytest.raises(ValueError, match="field 1 has no rows"):
        cached_step(modules[:2], [inputs[0], inputs[1][:0]], loss, 4)
    with pytest.raises(ValueError, match="did not use"):
        cached_step(modules[:2], inputs[:2], lambda e: e[0].sum(), 4)
    frozen = TextTower().requires_grad_(False)
    with pytest.raises(ValueError, match="encoder 1 gives embeddings without gradient"):
        cached_step([modules[0], frozen], inputs[:2], lambda e: e[0].sum() + e[1].sum(), 4)


# Peak resident memory of one training step (cached or plain) in a fresh process, minus the
# resident memory before it; Linux's VmHWM is reset first (see tests/test_memory.py).
STEP_MEMORY = textwrap.dedent(
    """
    import json, sys
    import torch
    import gcl_ops
    from gcl_ops.grad_cache import cached_step

    batch, chunk, cached = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "cached"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    def tower():  # activations of ~50 KiB per sample, 4 MiB per weight matrix
        layers = [torch.nn.Linear(64, 1024), torch.nn.GELU()]
        for _ in range(5):
            layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(1024, 32))
    towers = [tower(), tower()]
    inputs = [torch.randn(batch, 64), torch.randn(batch, 64)]
    loss_fn = lambda e: gcl_ops.gcl_loss(e[0], e[1], logit_scale=20.0)
    for t in towers:  # allocate the gradient buffers before measuring
        for p in t.parameters():
            p.grad = torch.zeros_like(p)

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(field + ":")).split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS")
    if cached:
        cached_step(towers, inputs, loss_fn, chunk)
    else:
        loss_fn([t(x) for t, x in zip(towers, inputs)]).backward()
    print(json.dumps({"extra_bytes": status_bytes("VmHWM") - before}))
    """
)


def step_memory(batch: int, chunk: int, mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEP_MEMORY, str(batch), str(chunk), mode],
                            capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/status")
def test_peak_memory_follows_the_chunk_size_not_the_batch_size() -> None:
    mib = 2**20
    cached = {batch: step_memory(batch, 32, "cached") for batch in (256, 2048)}
    plain = {batch: step_memory(batch, 32, "plain") for batch in (256, 2048)}
    cached_growth, plain_growth = cached[2048] - cached[256], plain[2048] - plain[256]
    # Eight times the batch: the plain step's activations grow with it (~50 KiB a sample) ...
    assert plain_growth > 64 * mib, f"plain step grew by only {plain_growth / mib:.0f} MiB"
    # ... the cached step's only by the (B, k) embeddings and their gradients.
    assert cached_growth < 0.15 * plain_growth, (
        f"cached step grew by {cached_growth / mib:.0f} MiB, plain by {plain_growth / mib:.0f} MiB"
    )
