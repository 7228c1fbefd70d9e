"""Input checks shared by the public functions: each error names the argument and the problem.

Shape and dtype checks are free and always run. Value checks (non-finite numbers, negative
weights, zero-norm rows, a non-positive scale) read the data back from the device: all of one
call's value checks are reduced on the device to a few flags read back together
(``check_all_values``), so a call costs one synchronisation, and only a failing call pays for
the detailed message. The public functions run them unless called with ``validate=False`` (and
skip them while ``torch.compile`` traces or a CUDA graph is captured: ``should_validate``).
"""

from __future__ import annotations

import math

import torch

IMPLS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "weighted_mean", "none")


def should_validate(validate: bool) -> bool:
    """Value checks read data back to the host: not while ``torch.compile`` traces (a graph
    break) nor while a CUDA graph is captured (CUDA refuses to synchronise inside a capture)."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_embeddings(
    tensor: torch.Tensor, name: str, *, rows: int | None = None, width: int | None = None
) -> None:
    """``tensor`` is a non-empty floating ``(rows, width)`` matrix."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (N, k), got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0): the loss needs at least one pair")
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has embedding width k = 0")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows}")
    if width is not None and tensor.shape[1] != width:
        raise ValueError(f"{name} has width {tensor.shape[1]}, expected {width}")


def check_values(tensor: torch.Tensor, name: str, *, nonzero_rows: bool = False) -> None:
    """Finite entries; with ``nonzero_rows``, no all-zero row (it has no direction to normalise)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name} has non-finite values (NaN or inf), first at index {bad}")
    if nonzero_rows:
        zero = (tensor == 0).all(dim=-1)
        if bool(zero.any()):
            row = int(zero.nonzero()[0, 0])
            raise ValueError(
                f"{name} row {row} is all zeros and cannot be normalised (normalize=True)"
            )


def check_weights(weights: torch.Tensor | None, n: int, validate: bool) -> None:
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if should_validate(validate):
        check_values(weights, "weights")
        if bool((weights < 0).any()):
            row = int((weights < 0).nonzero()[0, 0])
            raise ValueError(f"weights must be >= 0, weights[{row}] = {weights[row].item()}")


def check_ids(ids: torch.Tensor | None, n: int, name: str) -> None:
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(ids).__name__}")
    if ids.shape != (n,):
        raise ValueError(f"{name} must have shape (N,) = ({n},), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")


def check_negatives(
    negatives: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    doc: torch.Tensor,
    doc_ids: torch.Tensor | None,
    name: str = "negatives",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Hard negatives ``(H, k)``, or ``(N, h, k)`` flattened row by row (``H = N h``), of
    ``doc``'s width, dtype and device, with integer ids ``(H,)`` (or ``(N, h)``, flattened alike)
    beside ``doc_ids``. Returns both flattened (or None)."""
    if negatives is None:
        if negative_ids is not None:
            raise ValueError(f"negative_ids were given without {name}")
        return None, None
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(negatives).__name__}")
    n, k = doc.shape
    if negatives.dim() == 3:
        if negatives.shape[0] != n:
            raise ValueError(
                f"{name} of shape (N, h, k) must have N = {n} rows like the documents, got "
                f"{tuple(negatives.shape)}"
            )
        if isinstance(negative_ids, torch.Tensor) and negative_ids.shape == negatives.shape[:2]:
            negative_ids = negative_ids.reshape(-1)
        negatives = negatives.reshape(-1, negatives.shape[-1])
    if negatives.dim() != 2:
        raise ValueError(
            f"{name} must have shape (H, k) or (N, h, k), got {tuple(negatives.shape)}"
        )
    if negatives.shape[0] == 0:
        raise ValueError(f"{name} holds no hard negative (H = 0): pass None instead")
    check_embeddings(negatives, name, width=k)
    if negatives.dtype != doc.dtype:
        raise TypeError(f"{name} must have the documents' dtype {doc.dtype}, got {negatives.dtype}")
    if negatives.device != doc.device:
        raise ValueError(
            f"{name} must be on the documents' device {doc.device}, got {negatives.device}"
        )
    if negative_ids is not None:
        check_negative_ids(negative_ids, negatives.shape[0], doc_ids)
        check_same_device(negatives=negatives, negative_ids=negative_ids)
    return negatives, negative_ids


def check_negative_ids(
    negative_ids: torch.Tensor, count: int, doc_ids: torch.Tensor | None
) -> None:
    """``(count,)`` integer ids of the negatives, which are compared with ``doc_ids``."""
    if doc_ids is None:
        raise ValueError(
            "negative_ids are compared with doc_ids (a negative equal to a row's positive is "
            "not its negative): pass doc_ids too"
        )
    check_ids(negative_ids, count, "negative_ids")


def check_logit_scale(logit_scale: float | torch.Tensor, validate: bool) -> None:
    """A positive finite float, or a 0-dim (or one-element) floating tensor."""
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must be a scalar, got a tensor of shape {tuple(logit_scale.shape)}"
            )
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be floating point, got {logit_scale.dtype}")
        if not should_validate(validate):
            return
        value = float(logit_scale.detach())
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        value = float(logit_scale)
    else:
        raise TypeError(
            f"logit_scale must be a float or a tensor, got {type(logit_scale).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"logit_scale must be positive and finite (already exponentiated, as open_clip "
            f"passes logit_scale.exp()), got {value}"
        )


def check_all_values(
    tensors: list[tuple[str, torch.Tensor, bool]] = (),
    weights: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor | None = None,
) -> None:
    """Every value check of one call with one device synchronisation.

    ``tensors`` holds ``(name, tensor, nonzero_rows)`` triples (``check_values``); ``weights`` must
    be finite and ``>= 0``; ``logit_scale`` positive and finite. The flags of all checks are
    computed on the device and read back at once; when one is raised, the individual checks run
    again to name the problem.
    """
    flags = []
    for _, tensor, nonzero_rows in tensors:
        flags.append(~torch.isfinite(tensor).all())
        if nonzero_rows:
            flags.append((tensor == 0).all(dim=-1).any())
    if weights is not None:
        flags.append(~torch.isfinite(weights).all() | (weights < 0).any())
    scale_tensor = isinstance(logit_scale, torch.Tensor)
    if scale_tensor:
        scale = logit_scale.detach().reshape(())
        flags.append(~(torch.isfinite(scale) & (scale > 0)))
    if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).any()):  # one sync
        return
    for name, tensor, nonzero_rows in tensors:
        check_values(tensor, name, nonzero_rows=nonzero_rows)
    check_weights(weights, weights.shape[0] if weights is not None else 0, True)
    if logit_scale is not None:
        check_logit_scale(logit_scale, True)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
