"""Gradient caching: contrastive batches far larger than the encoders' activations allow.

Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup". A contrastive loss couples every pair of the batch, but it depends on the
encoders only through the embeddings. So one step can run in three phases:

1. encode every chunk of every field under ``torch.no_grad()`` (no activations kept), recording
   the random state before each chunk;
2. compute the loss on the whole batch of (detached, grad-requiring) embeddings and
   backpropagate: this gives ``g = dL/de`` for every embedding, and the gradient of the loss's
   own parameters (``logit_scale``) directly;
3. re-encode each chunk with gradients under its recorded random state (dropout draws the same
   masks, so the activations are identical) and backpropagate ``sum(e * g)``, whose gradient
   w.r.t. the parameters is exactly the chunk's share of ``dL/dtheta``.

Peak activation memory is that of one chunk; the cost is one extra forward pass (about +20-30%).

Known caveats: layers with running statistics (BatchNorm) update them twice per step (phase 1
and phase 3), as in every gradient-caching implementation; make them eval-mode or use LayerNorm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return _batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0].shape[0]
    return len(inputs)


def split_batch(inputs: Any, chunk_size: int) -> list[Any]:
    """Split one field's inputs along the batch dimension into chunks of ``chunk_size``.

    A tensor is split on dim 0; a mapping (``{"input_ids": ..., "attention_mask": ...}``) and a
    tuple or list of tensors are split member by member; any other sequence is sliced.
    """
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(chunk_size))
    if isinstance(inputs, Mapping):
        keys = list(inputs)
        parts = [split_batch(inputs[key], chunk_size) for key in keys]
        return [dict(zip(keys, values)) for values in zip(*parts)]
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], torch.Tensor):
        return [
            type(inputs)(values) for values in zip(*(split_batch(x, chunk_size) for x in inputs))
        ]
    return [inputs[start : start + chunk_size] for start in range(0, len(inputs), chunk_size)]


def _cuda_devices(inputs: Any) -> list[torch.device]:
    """CUDA devices of the tensors in ``inputs`` (whose random state must be replayed)."""
    found: set[torch.device] = set()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_cuda:
            found.add(x.device)
        elif isinstance(x, Mapping):
            for value in x.values():
                visit(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                visit(value)

    visit(inputs)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        found.add(torch.device("cuda", torch.cuda.current_device()))
    return sorted(found, key=lambda d: d.index or 0)


class RandomState:
    """The CPU and CUDA random states at one moment, to run code again with the same draws."""

    def __init__(self, cuda_devices: Sequence[torch.device]) -> None:
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state; the global random state is restored afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def cached_step(
    encoders: Sequence[Callable[[Any], torch.Tensor]],
    inputs: Sequence[Any],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    chunk_size: int | Sequence[int],
    *,
    scaler: torch.amp.GradScaler | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """One training step's forward and backward with gradient caching; returns the loss.

    After it returns, every parameter's ``.grad`` holds (accumulates) the same gradient as a
    plain ``loss_fn([encoder(x) for ...]).backward()`` over the whole batch; call the
    optimizer (``scaler.step(optimizer)`` with a scaler) as usual.

    Args:
        encoders: one callable per field (query text, document title, document image, ...),
            mapping that field's inputs to ``(rows, k)`` embeddings. The same module may serve
            several fields (``lambda x: model.encode_text(x)``).
        inputs: one batch per field: a tensor, a mapping of tensors, a tuple/list of tensors, or
            a plain sequence (``split_batch``). Fields may differ in rows: hard negatives are a
            field of their own, ``H`` rows beside the ``B`` pairs, embedded in chunks like them.
        loss_fn: the loss of the whole batch from the list of embeddings (one per field), e.g.
            ``lambda e: criterion([e[0]], e[1:], model.logit_scale.exp(), w)``, or with a field
            of hard negatives ``lambda e: gcl_loss(e[0], e[1], w, t, negatives=e[2])``.
            Its own parameters get their gradient from this call.
        chunk_size: rows per encoder call, one for all fields or one per field.
        scaler: a ``torch.amp.GradScaler`` for fp16 training: the loss is scaled before its
            backward and the cached gradients carry the scale into the encoders.
        no_sync: for DDP, the wrapped model's ``no_sync``: every re-encoding's backward but the
            last runs under it, so gradients are all-reduced once per step. The encoders must
            call the DDP module (not ``ddp.module``) and DDP needs
            ``find_unused_parameters=True`` when one forward touches only one tower.

    Returns:
        The loss, detached (unscaled).

    Works under ``torch.autocast``: call it inside the autocast context as usual; phase 3
    re-runs the encoders in the same context.
    """
    if len(encoders) != len(inputs) or not encoders:
        raise ValueError(
            f"need one input per encoder, got {len(encoders)} encoders and {len(inputs)} inputs"
        )
    sizes = [chunk_size] * len(encoders) if isinstance(chunk_size, int) else list(chunk_size)
    if len(sizes) != len(encoders) or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"chunk_size must be a positive int or one per field, got {chunk_size!r}")
    empty = [index for index, x in enumerate(inputs) if _batch_size(x) == 0]
    if empty:
        raise ValueError(f"field {empty[0]} has no rows: every field needs at least one")
    devices = _cuda_devices(inputs)

    # Phase 1: embeddings without activations, and each chunk's random state.
    chunks = [split_batch(x, size) for x, size in zip(inputs, sizes)]
    states: list[list[RandomState]] = []
    embeddings: list[torch.Tensor] = []
    with torch.no_grad():
        for encoder, field_chunks in zip(encoders, chunks):
            field_states, parts = [], []
            for chunk in field_chunks:
                field_states.append(RandomState(devices))
                parts.append(encoder(chunk))
            states.append(field_states)
            embeddings.append(torch.cat(parts).detach().requires_grad_())

    # Phase 2: the loss on the whole batch; gradients of the embeddings (and loss parameters).
    loss = loss_fn(embeddings)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    cached = [e.grad for e in embeddings]
    if any(g is None for g in cached):
        raise ValueError("loss_fn did not use every field's embeddings")

    # Phase 3: re-encode with gradients under the recorded random states.
    jobs = [(f, c) for f in range(len(encoders)) for c in range(len(chunks[f]))]
    for number, (field, index) in enumerate(jobs):
        start = index * sizes[field]
        chunk = chunks[field][index]
        grad = cached[field][start : start + _batch_size(chunk)]
        last = number == len(jobs) - 1
        sync = contextlib.nullcontext() if (no_sync is None or last) else no_sync()
        with sync, states[field][index].replay():
            embedding = encoders[field](chunk)
            if not embedding.requires_grad:
                raise ValueError(
                    f"encoder {field} gives embeddings without gradient (a frozen encoder?): "
                    "embed constant fields outside cached_step and use them inside loss_fn"
                )
            # d/dtheta of sum(e * g) = (de/dtheta)^T g, this chunk's share of dL/dtheta.
            torch.sum(embedding * grad.to(embedding.dtype)).backward()
    return loss.detach()
