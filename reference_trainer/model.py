"""open_clip models for the reference trainer: creation from local weights only, freezing a tower,
saving weights that open_clip itself loads back, and loading trained checkpoints.

* ``TINY_MODEL`` (``"gcl-tiny"``): a ~3.9M-parameter CLIP (ViT on 32x32 images with 8x8 patches,
  a 2-layer text transformer over open_clip's BPE tokenizer with 32-token contexts, 64-d
  embeddings) registered with open_clip from ``model_configs/``; it trains on a laptop CPU.
* ``create_model(name, pretrained=FILE)``: any open_clip architecture, weights from a local file
  (nothing is ever downloaded), with its train/val image transforms and its tokenizer.
* ``save_model(path, model)`` writes a plain open_clip state dict, so that the official GCL
  evaluation code (``open_clip.create_model_and_transforms(name, pretrained=path)``) loads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import nn

TINY_MODEL = "gcl-tiny"
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
FREEZE_CHOICES = ("text", "image")


def register_model_configs() -> None:
    """Add the configs in ``model_configs/`` (``gcl-tiny``) to open_clip's registry (idempotent)."""
    names = {path.stem for path in CONFIG_DIR.glob("*.json")}
    if not names <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


@dataclasses.dataclass
class ModelBundle:
    """An open_clip model with what it needs to see data.

    Attributes:
        model: the open_clip ``CLIP`` (or ``CustomTextCLIP``) module.
        name: its open_clip architecture name.
        preprocess_train: PIL image -> ``(3, H, W)`` float tensor, with training augmentation.
        preprocess_val: PIL image -> ``(3, H, W)`` float tensor, deterministic.
        tokenizer: ``list[str]`` -> ``(B, L)`` int64 token ids (``L`` the context length).
    """

    model: nn.Module
    name: str
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


class _QuietRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model {name!r}: Hugging Face Hub and local-dir models are not supported (the former "
            "would need a download); pass an architecture name and pretrained=<local weights file>"
        )
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(known)}")


def _local_weights(pretrained: str | os.PathLike) -> str:
    """The absolute path of a local weights file (an absolute path is never taken for a tag)."""
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return str(path.resolve())
    tags = {tag.lower() for _, tag in open_clip.list_pretrained()}
    if text.startswith("hf-hub:") or text.lower() in tags:
        raise ValueError(
            f"pretrained={text!r} is a pretrained tag or hub name, which would need a download; "
            "nothing is downloaded here: fetch the weights yourself and pass the local file"
        )
    if path.is_dir():
        raise ValueError(f"pretrained={text!r} is a directory; pass the weights file inside it")
    raise FileNotFoundError(f"pretrained weights file not found: {path}")


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    freeze: str | None = None,
) -> ModelBundle:
    """An open_clip model, its image transforms and its tokenizer.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``, plus ``gcl-tiny``).
            Architectures with a Hugging Face text tower or tokenizer (``roberta-*``, SigLIP,
            ...) read those files through ``transformers``: from its cache, else a download.
        pretrained: a local weights file: a state dict or ``{"state_dict": ...}``, keys optionally
            prefixed ``module.`` (what open_clip loads); None for random initialisation.
        device: where the model goes.
        freeze: None, ``"text"`` or ``"image"``: that tower's parameters get ``requires_grad =
            False`` (open_clip's ``lock_text_tower`` / ``lock_image_tower``, batch-norm statistics
            frozen too). The logit scale stays trainable.

    Raises:
        ValueError: unknown name, a pretrained tag or hub name (a download), a bad ``freeze``, or
            weights that do not fit the architecture.
        FileNotFoundError: ``pretrained`` names no file.
    """
    register_model_configs()
    _check_name(name)
    if freeze not in (None, *FREEZE_CHOICES):
        raise ValueError(f"freeze must be None, 'text' or 'image', got {freeze!r}")
    weights = None if pretrained is None else _local_weights(pretrained)
    # Random initialisation is asked for when there are no weights: keep open_clip's warning
    # about it ("No pretrained weights loaded") out of the log.
    quiet = _QuietRandomInit() if weights is None else None
    if quiet is not None:
        logging.getLogger().addFilter(quiet)
    try:  # an absolute path: open_clip cannot take it for a tag, so it loads the file
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=device, pretrained_text=False, pretrained_image=False
        )
    except Exception as error:
        if weights is None:
            raise
        raise ValueError(
            f"could not load {weights} into {name}: {type(error).__name__}: {error}"
        ) from error
    finally:
        if quiet is not None:
            logging.getLogger().removeFilter(quiet)
    if freeze == "text":
        model.lock_text_tower()
    elif freeze == "image":
        model.lock_image_tower(freeze_bn_stats=True)
    tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(model, name, preprocess_train, preprocess_val, tokenizer)


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip module inside ``DistributedDataParallel`` / ``DataParallel`` and
    ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def save_model(path: str | os.PathLike, model: nn.Module) -> None:
    """Write the plain state dict of ``model`` (wrappers stripped, tensors on the CPU) with
    ``torch.save``, atomically (a temporary file, then a rename).

    ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads the file, and so does
    ``create_model(name, pretrained=path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in unwrap(model).state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_trained(
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
) -> ModelBundle:
    """A trained model from a checkpoint.

    Args:
        checkpoint: a checkpoint directory holding ``model.pt`` and ``meta.json``
            (``{"model": name, ...}``), or a weights file (``meta.json`` beside it is read when
            ``model_name`` is not given).
        device: where the model goes.
        model_name: the architecture; required when there is no ``meta.json``. When both are
            given they must agree.

    Raises:
        FileNotFoundError: no such checkpoint, or no ``model.pt`` in the directory.
        ValueError: the architecture is unknown or disagrees with ``meta.json``.
    """
    path = Path(checkpoint).expanduser()
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file():
        where = f"{path} holds no model.pt" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"checkpoint not found: {where}")
    meta_path = weights.parent / "meta.json"
    saved_name = json.loads(meta_path.read_text()).get("model") if meta_path.is_file() else None
    if model_name is None and saved_name is None:
        raise ValueError(
            f"cannot tell the architecture of {weights}: {meta_path} is missing or has no "
            "'model' key; pass model_name"
        )
    if model_name is not None and saved_name is not None and model_name != saved_name:
        raise ValueError(
            f"model_name={model_name!r} but {meta_path} says the checkpoint is {saved_name!r}"
        )
    return create_model(model_name or saved_name, pretrained=weights, device=device)
