"""Shared helpers of the reference-trainer tests: a tiny synthetic dataset, a fast image transform
and tokenizer, and bit-exact batch comparison."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import open_clip
import torch

from reference_trainer.synthetic import make_synthetic

# 48 queries x 16 documents = 768 rows per split, 3 shards of 64-row groups (12 per split).
TINY = {
    "queries_per_set": 48,
    "products_per_set": 120,
    "docs_per_query": 16,
    "shards_per_split": 3,
    "rows_per_group": 64,
}


def tiny_dataset(out: Path, **overrides: Any) -> Path:
    """A tiny synthetic MarqoGS-10M (``TINY``, overridable) written to ``out``."""
    return make_synthetic(out, **(TINY | overrides))


@functools.cache
def tokenizer() -> Callable[[list[str]], torch.Tensor]:
    """open_clip's ViT-B-32 tokenizer (its vocabulary ships with the package: works offline)."""
    return open_clip.get_tokenizer("ViT-B-32")


def transform(train: bool = True, size: int = 32) -> Callable:
    """open_clip's image transform at ``size`` (random crops when ``train``)."""
    return open_clip.image_transform(size, is_train=train)


def same_batch(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two batches hold the same keys and bit-identical values."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            other = b[key]
            if value.dtype != other.dtype or value.shape != other.shape:
                return False
            if not torch.equal(value, other):
                return False
        elif value != b[key]:
            return False
    return True


def row_keys(batches: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(query id, document id)`` of every row of ``batches``, in order."""
    return [
        (int(q), int(d)) for b in batches for q, d in zip(b["query_ids"], b["doc_ids"], strict=True)
    ]
