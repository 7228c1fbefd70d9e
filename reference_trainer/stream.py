"""The training stream of MarqoGS-10M: one epoch of one rank's batches, in an order that is a
pure function of the settings, decoded in DataLoader workers.

Training order (``TrainStream``)
--------------------------------
An epoch is a pure function of ``(seed, epoch, batch_size, window_batches, world_size,
num_workers)``:

1. The split's pieces (parquet row groups or CSV chunks) are shuffled, and their rows
   concatenated in that order form the epoch's row stream.
2. Each rank gets ``R = rows // (batch_size * world_size)`` batches. The stream is cut into
   windows of ``window_batches * batch_size`` rows, dealt round-robin to the ranks (window ``w``
   to rank ``w % world_size``); the last round's windows are shortened to ``R % window_batches``
   batches so that every rank gets exactly ``R`` batches (fewer than ``batch_size * world_size``
   rows are left out).
3. Inside a window the rows are shuffled, grouped by query (queries in random order) and dealt
   round-robin to the window's batches: a query with ``n`` rows in the window has at most
   ``ceil(n / window_batches)`` rows in any batch. ``max_docs_per_query`` then drops a query's
   rows beyond that many per batch (counted in ``"capped"``), and each batch is shuffled.
4. A rank's windows are dealt to its DataLoader workers round-robin (window ``i`` to worker
   ``i % num_workers``); each worker yields its windows' batches in order, and the DataLoader
   takes one batch from each worker in turn, skipping exhausted workers. The rank's batch
   order is that interleaving, so it depends on ``num_workers`` (the batches themselves do not).
   ``start_batch=n`` gives each worker the suffix of its sequence from position ``n`` on and
   rotates the workers' roles so that the interleaving continues exactly at batch ``n``; windows
   wholly before ``n`` are not read and batches before ``n`` are not decoded.
5. Random image transforms run under a seed derived from ``(seed, epoch, window, batch in
   window)``, so a resumed epoch decodes bit-identical tensors.

Memory: a worker holds one window (its rows' image bytes as Arrow buffers) and up to two pieces.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from reference_trainer.marqo import (
    DataError,
    MarqoGS,
    decode_rows,
    stable_ids,
    tokenize,
)

_PIECE_ORDER, _WINDOW_DEAL, _TRANSFORM = 0, 1, 2  # seed-sequence tags of an epoch's random draws


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's, ``random``'s and numpy's global generators for a block, then restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------- training order


@dataclass(frozen=True)
class Window:
    """``batches * batch_size`` consecutive rows of the epoch's row stream, from ``row_start``."""

    index: int  # in the epoch, round-major: window w goes to rank w % world_size
    row_start: int
    batches: int


def epoch_windows(rows: int, batch_size: int, window_batches: int, world_size: int) -> list[Window]:
    """The windows of an epoch over ``rows`` rows: every rank gets ``rows // (batch_size *
    world_size)`` batches, in windows of ``window_batches`` (the last round's shorter)."""
    full_rounds, last = divmod(rows // (batch_size * world_size), window_batches)
    sizes = [window_batches] * (full_rounds * world_size) + [last] * (world_size if last else 0)
    starts = np.cumsum([0] + sizes[:-1]) * batch_size
    return [Window(i, int(start), size) for i, (start, size) in enumerate(zip(starts, sizes))]


def interleave_workers(windows: Sequence[Window], num_workers: int) -> list[tuple[int, int, int]]:
    """A rank's batch order with ``num_workers`` DataLoader workers when worker ``k`` yields the
    batches of windows ``k, k + num_workers, ...`` in order and the DataLoader takes one batch
    from each worker in turn, skipping exhausted workers: ``(worker, window slot, batch in
    window)`` for every position, the slot indexing ``windows``."""
    workers = max(num_workers, 1)
    queues = [
        [
            (slot, b)
            for slot in range(k, len(windows), workers)
            for b in range(windows[slot].batches)
        ]
        for k in range(workers)
    ]
    longest = max(map(len, queues), default=0)
    return [(k, *q[turn]) for turn in range(longest) for k, q in enumerate(queues) if turn < len(q)]


def deal_window(
    query_ids: np.ndarray,
    batches: int,
    rng: np.random.Generator,
    max_docs_per_query: int | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Deal a window's rows (``(n,)`` query ids, ``n`` a multiple of ``batches``) to ``batches``
    batches that each mix many queries: shuffle, group by query (queries in random order), deal
    round-robin, keep at most ``max_docs_per_query`` rows of a query per batch, shuffle each
    batch. Returns each batch's row indices and how many rows the cap dropped from it."""
    shuffled = rng.permutation(len(query_ids))
    _, query_of_row = np.unique(query_ids, return_inverse=True)
    query_rank = rng.permutation(int(query_of_row.max(initial=-1)) + 1)[query_of_row]
    grouped = shuffled[np.argsort(query_rank[shuffled], kind="stable")]
    dealt, capped = [], []
    for b in range(batches):
        rows = grouped[b::batches]  # a query's rows stay together
        if max_docs_per_query is not None and len(rows):
            ranks = query_rank[rows]
            starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
            within = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
            capped.append(int((within >= max_docs_per_query).sum()))
            rows = rows[within < max_docs_per_query]
        else:
            capped.append(0)
        dealt.append(rows[rng.permutation(len(rows))])
    return dealt, capped


# ---------------------------------------------------------------------------- streams


@dataclass
class _DealtWindow:
    window: Window
    table: pa.Table
    batches: list[np.ndarray]
    capped: list[int]


class TrainStream(torch.utils.data.IterableDataset):
    """One epoch of one rank's training batches, decoded in DataLoader workers (the order: see
    the module docstring). Iterate it with ``train_loader(stream)``.

    Items are dicts: ``images`` (B, 3, H, W) float32 from ``transform``; ``query_tokens`` and
    ``title_tokens`` (B, L) int64 from ``tokenizer``; ``scores`` (B,) float32 ``score_linear``;
    ``query_ids`` (B,) int64; ``doc_ids`` (B,) int64 (``stable_id`` of the product id);
    ``skipped`` (rows dropped for a missing or unreadable image), ``capped`` (rows dropped by
    ``max_docs_per_query``) and ``batch`` (the position in this rank's epoch, also when resumed).
    B is ``batch_size`` less the skipped and capped rows.
    """

    def __init__(
        self,
        dataset: MarqoGS,
        *,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], Any],
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        window_batches: int = 16,
        max_docs_per_query: int | None = None,
        split: str = "in_domain",
    ) -> None:
        super().__init__()
        positive = {"batch_size": batch_size, "world_size": world_size}
        positive |= {
            "window_batches": window_batches,
            "max_docs_per_query": max_docs_per_query or 1,
        }
        natural = {"seed": seed, "epoch": epoch, "start_batch": start_batch}
        for name, value in positive.items():
            if value < 1:
                raise DataError(f"{name} must be positive, got {value}")
        for name, value in (natural | {"num_workers": num_workers}).items():
            if value < 0:
                raise DataError(f"{name} must not be negative, got {value}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset, self.split = dataset, split
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.window_batches = batch_size, window_batches
        self.max_docs_per_query = max_docs_per_query
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        pieces = dataset.pieces(split)
        rows = sum(p.rows for p in pieces)
        if rows < batch_size * world_size:
            raise DataError(
                f"{split} has {rows} rows, too few for one batch of {batch_size} on each of "
                f"{world_size} rank(s) (needs {batch_size * world_size})"
            )
        order = np.random.default_rng(_seed_of(seed, epoch, _PIECE_ORDER)).permutation(len(pieces))
        self._pieces = [pieces[i] for i in order]
        self._piece_starts = np.cumsum([0] + [p.rows for p in self._pieces])
        windows = epoch_windows(rows, batch_size, window_batches, world_size)
        self._windows = windows[rank::world_size]
        self._schedule = interleave_workers(self._windows, num_workers)
        if start_batch > len(self._schedule):
            raise DataError(
                f"start_batch {start_batch} is past the epoch's {len(self._schedule)} batches"
            )

    def __len__(self) -> int:
        """Batches still to come in this epoch (from ``start_batch`` on)."""
        return len(self._schedule) - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        return len(self._schedule)

    def _my_positions(self) -> list[int]:
        positions = range(self.start_batch, len(self._schedule))
        info = torch.utils.data.get_worker_info()
        if info is None or not positions:  # a single process yields every batch, in order
            return list(positions)
        if info.num_workers != self.num_workers:
            raise DataError(
                f"the stream was built for num_workers={self.num_workers} but the DataLoader has "
                f"{info.num_workers}; build the loader with train_loader(stream)"
            )
        # The DataLoader asks worker 0 first: it plays the role of the worker owning batch
        # start_batch, worker 1 the next role, and so on; the round-robin then goes on exactly.
        role = (self._schedule[self.start_batch][0] + info.id) % self.num_workers
        return [p for p in positions if self._schedule[p][0] == role]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        positions = self._my_positions()
        last_use = {self._schedule[p][1]: p for p in positions}
        windows: dict[int, _DealtWindow] = {}
        for position in positions:
            _, slot, batch = self._schedule[position]
            if slot not in windows:
                windows[slot] = self._load_window(self._windows[slot])
            item = self._decode_batch(windows[slot], batch, position)
            if last_use[slot] == position:
                del windows[slot]
            yield item

    def _load_window(self, window: Window) -> _DealtWindow:
        start, stop = window.row_start, window.row_start + window.batches * self.batch_size
        first = int(np.searchsorted(self._piece_starts, start, side="right")) - 1
        last = int(np.searchsorted(self._piece_starts, stop, side="left"))
        parts = []
        for k in range(first, last):
            table, offset = self.dataset.read_piece(self._pieces[k]), int(self._piece_starts[k])
            low, high = max(start - offset, 0), min(stop - offset, table.num_rows)
            parts.append(table.slice(low, high - low))
        table = pa.concat_tables(parts)
        rng = np.random.default_rng(_seed_of(self.seed, self.epoch, window.index, _WINDOW_DEAL))
        batches, capped = deal_window(
            table["query_id"].to_numpy(), window.batches, rng, self.max_docs_per_query
        )
        return _DealtWindow(window, table, batches, capped)

    def _decode_batch(self, dealt: _DealtWindow, batch: int, position: int) -> dict[str, Any]:
        rows = dealt.table.take(pa.array(dealt.batches[batch]))
        with _seeded(_seed_of(self.seed, self.epoch, dealt.window.index, batch, _TRANSFORM)):
            images, rows, skipped = decode_rows(self.dataset, rows, self.transform)
        return {
            "images": images,
            "query_tokens": tokenize(self.tokenizer, rows["query"].to_pylist()),
            "title_tokens": tokenize(self.tokenizer, rows["title"].to_pylist()),
            "scores": torch.from_numpy(rows["score_linear"].to_numpy().astype(np.float32)),
            "query_ids": torch.from_numpy(rows["query_id"].to_numpy().astype(np.int64)),
            "doc_ids": torch.from_numpy(stable_ids(rows["product_id"].to_pylist())),
            "skipped": skipped,
            "capped": dealt.capped[batch],
            "batch": position,
        }


def train_loader(stream: TrainStream) -> torch.utils.data.DataLoader:
    """The DataLoader of ``stream``: its items as they are, from ``stream.num_workers`` workers."""
    workers = stream.num_workers
    # Its own generator: creating the iterator then draws no number from torch's global random
    # state (which a resumed run must find exactly as the uninterrupted one left it).
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(0), pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
