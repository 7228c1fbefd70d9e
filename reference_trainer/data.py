"""Streaming readers for MarqoGS-10M: training batches, evaluation queries and corpora.

Layouts
-------
Hugging Face (``Marqo/marqo-GS-10M``), detected first::

    DIR/data/<split>-00000-of-00004.parquet    any ``<split>-*.parquet`` (or DIR/<split>-*.parquet)

Columns ``image`` (the ``datasets`` Image feature: a struct ``{bytes: binary, path: string}``),
``query``, ``product_id``, ``title``, ``score_linear`` (``101 - position``, in 1..100),
``query_id`` and some this module does not use (``position``, ``pair_id``, ``score_reciprocal``,
``no_score``). Shards are read one row group at a time. The corpus of a split is the set of
distinct products of the two splits that share its product set (``SPLIT_CORPUS``).

CSV/JSON, the earlier release that the official evaluation code (github.com/marqo-ai/GCL,
``evals/eval_gs_v1.py``, ``scripts/eval-vitb32-ckpt.sh``) reads::

    DIR/query_0_product_id_0.csv   in_domain        (query set 0, product set 0)
    DIR/query_1_product_id_0.csv   novel_query      (query set 1, product set 0)
    DIR/query_0_product_id_1.csv   novel_document   (query set 0, product set 1)
    DIR/query_1_product_id_1.csv   zero_shot        (query set 1, product set 1)
    DIR/corpus_1.json, DIR/corpus_2.json   {product_id: {"image_local": path, "title": str}}

with columns ``query, product_id, title, image_local, score_linear`` (``query_id`` optional:
without it a query's id is a hash of its text) and image files at the ``image_local`` paths,
relative to DIR or absolute. A CSV is read in chunks of ``csv_rows_per_chunk`` records whose byte
offsets one scan of the file finds (quote-aware, so quoted newlines are fine).

Evaluation queries (``MarqoGS.eval_queries``)
---------------------------------------------
As ``get_test_queries`` in the official ``evals/eval_gs_v1.py``: group the split's rows by query
text, sum ``score_linear`` per query, and draw ``max_queries`` queries without replacement with
probability proportional to the sums, ``numpy.random.RandomState(seed)`` (seed 1), over the
queries in the order pandas' ``groupby`` sorts the official grouping key (the text followed by
``"_{!@#~}_"``). This is the draw of pandas ``DataFrame.sample(n, weights=..., random_state=1)``,
so the same queries come out. A split with at most ``max_queries`` queries keeps all of them.
Judgements are the split's rows of the drawn queries, graded by ``score_linear``.
``official_rescale=True`` also applies the official min-max rescaling
``int((s - min) / (max - min) * 99 + 1)`` (which maps 28, 55 and 60 to 27, 54 and 59 when the
split spans 1..100) to the sampling weights and grades.

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

import csv
import hashlib
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from PIL import Image

SPLITS = ("in_domain", "novel_query", "novel_document", "zero_shot")
SPLIT_CORPUS = {
    "in_domain": "corpus_1",
    "novel_query": "corpus_1",
    "novel_document": "corpus_2",
    "zero_shot": "corpus_2",
}
CORPORA = ("corpus_1", "corpus_2")
CSV_SPLIT_FILES = {
    "in_domain": "query_0_product_id_0.csv",
    "novel_query": "query_1_product_id_0.csv",
    "novel_document": "query_0_product_id_1.csv",
    "zero_shot": "query_1_product_id_1.csv",
}
CORPUS_FILES = {"corpus_1": "corpus_1.json", "corpus_2": "corpus_2.json"}
HF_REQUIRED_COLUMNS = ("image", "query", "product_id", "title", "score_linear")
CSV_REQUIRED_COLUMNS = ("query", "product_id", "title", "image_local", "score_linear")
MAX_SCORE = 100.0
OFFICIAL_QUERY_KEY_SUFFIX = "_{!@#~}_"  # eval_gs_v1.py groups rows by query text + this suffix

# The columns read_piece returns (the image as two: embedded bytes and a file path), their types.
ROW_COLUMNS = {
    "query": pa.string(),
    "product_id": pa.string(),
    "title": pa.string(),
    "score_linear": pa.float64(),
    "query_id": pa.int64(),
    "image_bytes": pa.binary(),
    "image_path": pa.string(),
}
_CSV_TYPES = {"image_local": pa.string()} | {k: ROW_COLUMNS[k] for k in list(ROW_COLUMNS)[:5]}
_UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_PIECE_ORDER, _WINDOW_DEAL, _TRANSFORM = 0, 1, 2  # seed-sequence tags of an epoch's random draws


class DataError(ValueError):
    """The data cannot be used as asked; the message names the file, column or value."""


@dataclass
class Document:
    """A corpus document; ``image`` is the encoded image file, None when it is missing."""

    product_id: str
    title: str
    image: bytes | None


@dataclass
class EvalQueries:
    """The sampled queries of one split and their graded judgements (J rows)."""

    split: str
    queries: list[str]  # (Q,) query texts, row q
    query_ids: np.ndarray  # (Q,) int64
    judged_rows: np.ndarray  # (J,) int64 query row of each judgement
    judged_products: list[str]  # (J,) product id of each judgement
    judged_grades: np.ndarray  # (J,) float32 grade (score_linear)


@dataclass(frozen=True)
class Piece:
    """What is read at once: a parquet row group, or a chunk of CSV records (a byte range)."""

    path: Path
    index: int  # row group (parquet) or chunk number (CSV)
    rows: int
    offset: int = 0  # CSV: the chunk's bytes
    length: int = 0

    def __str__(self) -> str:
        return f"{self.path} ({'row group' if self.path.suffix == '.parquet' else 'chunk'} {self.index})"


def stable_id(text: str) -> int:
    """A 63-bit hash of ``text``, the same in every process and run (BLAKE2b)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _stable_ids(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((stable_id(t) for t in texts), dtype=np.int64, count=len(texts))


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _check_scores(scores: np.ndarray, where: str) -> None:
    bad = ~((scores > 0) & (scores <= MAX_SCORE))  # NaN (a missing score) is bad too
    if bad.any():
        raise DataError(
            f"{where}: score_linear {scores[bad][0]} is outside (0, {MAX_SCORE:g}] "
            f"({int(bad.sum())} such rows)"
        )


def _check_columns(split: str, path: Path, names: Sequence[str], required: Sequence[str]) -> None:
    for column in required:
        if column not in names:
            raise DataError(
                f"{split}: {path} has no column {column!r} (columns: {', '.join(names)})"
            )


# ---------------------------------------------------------------------------- files


def _scan_parquet(split: str, path: Path) -> tuple[pq.FileMetaData, list[Piece]]:
    """A shard's footer and row groups; scores checked against the row-group statistics."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{split}: cannot read parquet file {path}: {err}") from err
    _check_columns(split, path, meta.schema.to_arrow_schema().names, HF_REQUIRED_COLUMNS)
    score = [meta.schema.column(i).path for i in range(meta.num_columns)].index("score_linear")
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(score).statistics
        if stats is not None and stats.has_min_max:
            _check_scores(np.array([stats.min, stats.max], float), f"{path} (row group {i})")
    return meta, [Piece(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]


def _csv_header(split: str, path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [""])
    header[0] = header[0].lstrip("\ufeff")
    _check_columns(split, path, header, CSV_REQUIRED_COLUMNS)
    return header


def _scan_csv(path: Path, rows_per_chunk: int, block_bytes: int = 1 << 24) -> list[Piece]:
    """Cut a CSV into chunks of ``rows_per_chunk`` records in one pass over its bytes: a newline
    ends a record when an even number of quote characters precede it (RFC 4180 escapes a quote
    as two); a newline alone is a blank line, not a record."""
    ends, quotes_before, position = [np.zeros(1, np.int64)], 0, 0
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            data = np.frombuffer(block, np.uint8)
            parity = (np.cumsum(data == ord('"'), dtype=np.int64) + quotes_before) & 1
            ends.append(position + np.flatnonzero((data == ord("\n")) & (parity == 0)) + 1)
            quotes_before, position = int(parity[-1]), position + len(block)
    ends = np.concatenate(ends)
    if ends[-1] < position:  # the last record has no newline
        ends = np.append(ends, position)
    ends = ends[np.r_[True, np.diff(ends) > 1]][1:]  # drop blank lines; the header comes first
    starts, ends = ends[:-1], ends[1:]
    return [
        Piece(
            path,
            k,
            len(starts[i : i + rows_per_chunk]),
            int(starts[i]),
            int(ends[min(i + rows_per_chunk, len(ends)) - 1] - starts[i]),
        )
        for k, i in enumerate(range(0, len(starts), rows_per_chunk))
    ]


def _image_columns(image: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """``(bytes, path)`` of an Image column (the ``{bytes, path}`` struct, or plain bytes)."""
    if not pa.types.is_struct(image.type):
        return image.cast(pa.binary()), pa.chunked_array([pa.nulls(len(image), pa.string())])
    fields = [image.type.field(i).name for i in range(image.type.num_fields)]
    return tuple(  # type: ignore[return-value]
        pc.struct_field(image, name)
        if name in fields
        else pa.chunked_array([pa.nulls(len(image), kind)])
        for name, kind in (("bytes", pa.binary()), ("path", pa.string()))
    )


def _normalise(raw: pa.Table, columns: Sequence[str]) -> pa.Table:
    """The ``columns`` of ``ROW_COLUMNS`` from a raw parquet or CSV table."""
    out = {}
    for column in columns:
        if column in ("image_bytes", "image_path"):
            if "image" in raw.column_names:
                out[column] = _image_columns(raw["image"])[column == "image_path"]
            else:
                path = raw["image_local"]
                out[column] = path if column == "image_path" else pa.nulls(len(path), pa.binary())
        elif column == "query_id" and column not in raw.column_names:  # a hash of the text
            out[column] = pa.array(_stable_ids(raw["query"].to_pylist()), pa.int64())
        else:
            out[column] = raw[column].cast(ROW_COLUMNS[column])
    if "title" in out:
        out["title"] = pc.fill_null(out["title"], "")
    return pa.table(out)


def _raw_columns(columns: Sequence[str], present: Sequence[str], image: str) -> list[str]:
    wanted = {image if c in ("image_bytes", "image_path") else c for c in columns}
    if "query_id" in wanted and "query_id" not in present:
        wanted = (wanted - {"query_id"}) | {"query"}
    return sorted(wanted)


# ---------------------------------------------------------------------------- datasets


class MarqoGS:
    """A MarqoGS-10M directory in either layout (see the module docstring); use ``open_dataset``."""

    def __init__(
        self, root: Path, layout: str, files: dict[str, list[Path]], csv_rows_per_chunk: int
    ) -> None:
        self.root, self.layout = root, layout
        self._files = {s: f for s, f in files.items() if f}
        self._csv_rows_per_chunk = csv_rows_per_chunk
        self._pieces: dict[str, list[Piece]] = {}
        self._footers: dict[Path, pq.FileMetaData] = {}
        self._headers: dict[Path, list[str]] = {}
        for split in self.splits:  # check the columns now (CSV chunks are found when needed)
            if layout == "huggingface":
                self.pieces(split)
            else:
                self._headers[files[split][0]] = _csv_header(split, files[split][0])

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits present, in ``SPLITS`` order."""
        return tuple(s for s in SPLITS if s in self._files)

    def require_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
        if split not in self._files:
            wanted = (
                f"data/{split}-*.parquet"
                if self.layout == "huggingface"
                else CSV_SPLIT_FILES[split]
            )
            raise DataError(
                f"split {split!r} is missing from {self.root} ({self.layout} layout: no {wanted}; "
                f"present: {', '.join(self.splits)})"
            )

    def pieces(self, split: str) -> list[Piece]:
        """The split's row groups (parquet) or record chunks (CSV), in file order."""
        self.require_split(split)
        if split not in self._pieces:
            if self.layout == "csv":
                self._pieces[split] = _scan_csv(self._files[split][0], self._csv_rows_per_chunk)
            else:
                self._pieces[split] = []
                for path in self._files[split]:
                    self._footers[path], pieces = _scan_parquet(split, path)
                    self._pieces[split] += pieces
        return self._pieces[split]

    def num_rows(self, split: str) -> int:
        return sum(p.rows for p in self.pieces(split))

    def describe(self) -> str:
        """One line: the layout and, per split, its files, pieces and rows."""
        unit = "row groups" if self.layout == "huggingface" else "chunks"
        return f"MarqoGS {self.layout} layout at {self.root}: " + "; ".join(
            f"{s} {len(self._files[s])} file(s)/{len(self.pieces(s))} {unit}/{self.num_rows(s):,} rows"
            for s in self.splits
        )

    def read_piece(self, piece: Piece, columns: Sequence[str] = tuple(ROW_COLUMNS)) -> pa.Table:
        """One piece as a table of ``columns`` (of ``ROW_COLUMNS``), scores checked."""
        try:
            if self.layout == "huggingface":
                footer = self._footers.get(piece.path) or pq.read_metadata(piece.path)
                present = footer.schema.to_arrow_schema().names
                handle = pq.ParquetFile(piece.path, metadata=footer)  # not kept: it holds buffers
                raw = handle.read_row_group(
                    piece.index, columns=_raw_columns(columns, present, "image")
                )
            else:
                header = self._headers[piece.path]
                with open(piece.path, "rb") as f:
                    f.seek(piece.offset)
                    data = f.read(piece.length)
                wanted = _raw_columns(columns, header, "image_local")
                raw = pacsv.read_csv(
                    io.BytesIO(data),
                    read_options=pacsv.ReadOptions(column_names=header),
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: t for c, t in _CSV_TYPES.items() if c in header},
                        include_columns=wanted,
                    ),
                )
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{piece}: cannot read: {err}") from err
        if raw.num_rows != piece.rows:
            raise DataError(
                f"{piece}: read {raw.num_rows} rows, expected {piece.rows} (file changed?)"
            )
        table = _normalise(raw, columns)
        if "score_linear" in columns:
            _check_scores(table["score_linear"].to_numpy(), str(piece))
        return table

    def load_image(self, image_bytes: bytes | None, image_path: str | None) -> bytes | None:
        """A row's encoded image: its embedded bytes, else the file at ``image_path`` (relative to
        the root, or absolute); None when there is neither."""
        if image_bytes is not None or not image_path:
            return image_bytes
        try:
            return (self.root / image_path).read_bytes()  # an absolute path replaces the root
        except OSError:
            return None

    # ------------------------------------------------------------------------ evaluation

    def eval_queries(
        self, split: str, max_queries: int = 2000, seed: int = 1, *, official_rescale: bool = False
    ) -> EvalQueries:
        """The official evaluation sample of ``split`` (see the module docstring): at most
        ``max_queries`` queries drawn without replacement, with probability proportional to their
        summed ``score_linear``; judgements graded by ``score_linear`` (or its official rescaling)."""
        if max_queries < 1:
            raise DataError(f"max_queries must be positive, got {max_queries}")
        pieces = self.pieces(split)
        grade = self._official_rescaler(pieces) if official_rescale else (lambda scores: scores)
        sums: dict[str, float] = {}
        for piece in pieces:  # pass 1: the summed grade of every query text
            table = self.read_piece(piece, ("query", "score_linear"))
            table = table.set_column(
                1, "score_linear", pa.array(grade(table["score_linear"].to_numpy()))
            )
            summed = table.group_by("query", use_threads=False).aggregate([("score_linear", "sum")])
            for query, total in zip(
                summed["query"].to_pylist(), summed["score_linear_sum"].to_pylist()
            ):
                sums[query] = sums.get(query, 0.0) + total
        texts = sorted(sums, key=lambda q: q + OFFICIAL_QUERY_KEY_SUFFIX)  # pandas groupby's order
        weights = np.array([sums[q] for q in texts], np.float64)
        drawn = np.arange(len(texts))
        if len(texts) > max_queries:  # as DataFrame.sample(n, weights=w, random_state=seed) draws
            p = weights / weights.sum()
            drawn = np.random.RandomState(seed).choice(len(texts), max_queries, replace=False, p=p)
        drawn = drawn[np.argsort(-weights[drawn], kind="stable")]  # heaviest first, as the official
        queries = [texts[i] for i in drawn]
        row_of = {q: r for r, q in enumerate(queries)}
        query_ids = np.zeros(len(queries), np.int64)
        grades: dict[tuple[int, str], float] = {}
        wanted = pa.array(queries, pa.string())
        for piece in pieces:  # pass 2: the judgements of the drawn queries
            table = self.read_piece(piece, ("query", "product_id", "score_linear", "query_id"))
            table = table.filter(pc.is_in(table["query"], value_set=wanted))
            columns = [table[c].to_pylist() for c in ("query", "product_id", "query_id")]
            for query, product, query_id, value in zip(
                *columns, grade(table["score_linear"].to_numpy())
            ):
                row = row_of[query]
                query_ids[row] = query_id
                grades[row, product] = max(grades.get((row, product), 0.0), float(value))
        pairs = sorted(grades, key=lambda pair: (pair[0], -grades[pair], pair[1]))
        return EvalQueries(
            split=split,
            queries=queries,
            query_ids=query_ids,
            judged_rows=np.array([row for row, _ in pairs], np.int64),
            judged_products=[product for _, product in pairs],
            judged_grades=np.array([grades[pair] for pair in pairs], np.float32),
        )

    def _official_rescaler(self, pieces: list[Piece]) -> Callable[[np.ndarray], np.ndarray]:
        """The official min-max rescaling over the split, ``int((s - min) / (max - min) * 99 + 1)``
        in float64 as pandas computes it (every grade 1 when all scores are equal)."""
        scores = [self.read_piece(p, ("score_linear",))["score_linear"].to_numpy() for p in pieces]
        low = min(s.min(initial=np.inf) for s in scores)
        high = max(s.max(initial=-np.inf) for s in scores)
        if low == high:
            return np.ones_like
        return lambda s: np.floor((s - low) / (high - low) * 99 + 1)

    # ------------------------------------------------------------------------ corpora

    def corpus_parts(self, corpus: str, documents_per_part: int = 4096) -> list[Any]:
        """The corpus as parts to read with ``read_corpus_part``: for the Hugging Face layout the
        pieces of its splits, each with a mask of the rows that first name a product (by
        ``stable_id``); for the CSV layout tables of its JSON's documents."""
        if corpus not in CORPORA:
            raise DataError(f"unknown corpus {corpus!r}; the corpora are {', '.join(CORPORA)}")
        if self.layout == "csv":
            path = self.root / CORPUS_FILES[corpus]
            if not path.is_file():
                raise DataError(
                    f"{corpus}: {path} is missing (the CSV layout keeps a corpus in JSON)"
                )
            try:
                with open(path, encoding="utf-8") as f:
                    entries = json.load(f)
                table = pa.table(
                    {
                        "product_id": pa.array(list(entries), pa.string()),
                        "title": pa.array(
                            [e.get("title") or "" for e in entries.values()], pa.string()
                        ),
                        "image_path": pa.array(
                            [e.get("image_local") for e in entries.values()], pa.string()
                        ),
                    }
                )
            except (json.JSONDecodeError, AttributeError, pa.ArrowException) as err:
                raise DataError(
                    f"{path}: expected {{product_id: {{'image_local': ..., 'title': ...}}}}: {err}"
                ) from err
            return [
                table.slice(i, documents_per_part)
                for i in range(0, table.num_rows, documents_per_part)
            ]
        splits = [s for s in SPLITS if SPLIT_CORPUS[s] == corpus and s in self._files]
        if not splits:
            raise DataError(
                f"{corpus}: none of its splits is in {self.root} (present: {', '.join(self.splits)})"
            )
        pieces = [p for s in splits for p in self.pieces(s)]
        ids = [
            _stable_ids(self.read_piece(p, ("product_id",))["product_id"].to_pylist())
            for p in pieces
        ]
        first = np.zeros(sum(map(len, ids)), bool)
        first[np.unique(np.concatenate(ids), return_index=True)[1]] = True
        return list(zip(pieces, np.split(first, np.cumsum([len(i) for i in ids])[:-1])))

    def read_corpus_part(self, part: Any) -> pa.Table:
        """A part's documents: ``product_id``, ``title``, ``image_bytes``, ``image_path``."""
        if isinstance(part, pa.Table):
            return part.append_column("image_bytes", pa.nulls(part.num_rows, pa.binary()))
        piece, first_mentions = part
        return self.read_piece(piece, ("product_id", "title", "image_bytes", "image_path")).filter(
            first_mentions
        )

    def iter_corpus(self, corpus: str) -> Iterator[Document]:
        """The corpus's documents, each product once, in a stable order (the JSON's for the CSV
        layout; first appearance in its splits for the Hugging Face layout)."""
        for part in self.corpus_parts(corpus):
            yield from _documents(self, self.read_corpus_part(part))


def _documents(dataset: MarqoGS, table: pa.Table) -> Iterator[Document]:
    columns = [table[c].to_pylist() for c in ("product_id", "title", "image_bytes", "image_path")]
    for product_id, title, data, path in zip(*columns):
        yield Document(product_id, title, dataset.load_image(data, path))


def open_dataset(
    root: str | Path, *, layout: str | None = None, csv_rows_per_chunk: int = 8192
) -> MarqoGS:
    """Open a MarqoGS-10M directory. ``layout`` ("huggingface" or "csv") picks one when both are
    present (the Hugging Face layout otherwise); ``csv_rows_per_chunk``: CSV records read at once."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    if layout not in (None, "huggingface", "csv"):
        raise DataError(f"unknown layout {layout!r}; use 'huggingface' or 'csv'")
    if csv_rows_per_chunk < 1:
        raise DataError(f"csv_rows_per_chunk must be positive, got {csv_rows_per_chunk}")
    for folder in (root / "data", root):
        shards = {
            s: sorted(folder.glob(f"{s}-*.parquet")) + sorted(folder.glob(f"{s}.parquet"))
            for s in SPLITS
        }
        if layout != "csv" and any(shards.values()):
            return MarqoGS(root, "huggingface", shards, csv_rows_per_chunk)
    tables = {s: [root / name] for s, name in CSV_SPLIT_FILES.items() if (root / name).is_file()}
    if layout != "huggingface" and tables:
        return MarqoGS(root, "csv", tables, csv_rows_per_chunk)
    looked = {
        "huggingface": f"the Hugging Face layout (data/<split>-*.parquet for the splits {', '.join(SPLITS)})",
        "csv": f"the CSV layout ({', '.join(CSV_SPLIT_FILES.values())})",
    }
    entries = sorted(p.name for p in root.iterdir())
    found = ", ".join(entries[:12]) + (
        f", ... ({len(entries)} entries)" if len(entries) > 12 else ""
    )
    raise DataError(
        f"no MarqoGS-10M data in {root}: looked for "
        + " and ".join(text for name, text in looked.items() if layout in (None, name))
        + f"; found: {found or 'nothing'}"
    )


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


# ---------------------------------------------------------------------------- decoding


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


def _decode_image(
    data: bytes | None, transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor | None:
    """``transform`` of the RGB image in ``data``; None when there is none or it cannot be read."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except _UNREADABLE_IMAGE:
        return None
    return transform(rgb)


def _decode_rows(
    dataset: MarqoGS, rows: pa.Table, transform: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor, pa.Table, int]:
    """The ``(b, 3, H, W)`` transformed images of the rows whose image decodes, those ``b`` rows,
    and the number of rows skipped for a missing or unreadable image."""
    images = [
        _decode_image(dataset.load_image(data, path), transform)
        for data, path in zip(rows["image_bytes"].to_pylist(), rows["image_path"].to_pylist())
    ]
    kept = [i for i, image in enumerate(images) if image is not None]
    if kept:
        pixels = torch.stack([images[i] for i in kept])
    else:  # (0, 3, H, W): the transform's output shape
        pixels = torch.zeros((0, *transform(Image.new("RGB", (8, 8))).shape))
    return pixels, rows.take(pa.array(kept, pa.int64())), len(images) - len(kept)


def _tokenize(tokenizer: Callable[[list[str]], Any], texts: list[str]) -> torch.Tensor:
    if not texts:
        return torch.as_tensor(tokenizer([""]), dtype=torch.long)[:0]
    return torch.as_tensor(tokenizer(texts), dtype=torch.long)


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
            images, rows, skipped = _decode_rows(self.dataset, rows, self.transform)
        return {
            "images": images,
            "query_tokens": _tokenize(self.tokenizer, rows["query"].to_pylist()),
            "title_tokens": _tokenize(self.tokenizer, rows["title"].to_pylist()),
            "scores": torch.from_numpy(rows["score_linear"].to_numpy().astype(np.float32)),
            "query_ids": torch.from_numpy(rows["query_id"].to_numpy().astype(np.int64)),
            "doc_ids": torch.from_numpy(_stable_ids(rows["product_id"].to_pylist())),
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


class _CorpusStream(torch.utils.data.IterableDataset):
    """A corpus in batches; of ``K`` workers, worker ``k`` reads parts ``k, k + K, ...``."""

    def __init__(
        self,
        dataset: MarqoGS,
        corpus: str,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.transform, self.tokenizer = dataset, transform, tokenizer
        self.batch_size = batch_size
        self.parts = dataset.corpus_parts(corpus, documents_per_part=8 * batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pending: list[pa.Table] = []
        for part in self.parts[worker::workers]:
            pending.append(self.dataset.read_corpus_part(part))
            while sum(t.num_rows for t in pending) >= self.batch_size:
                table = pa.concat_tables(pending)
                pending = [table.slice(self.batch_size)]
                yield self._batch(table.slice(0, self.batch_size))
        if sum(t.num_rows for t in pending):
            yield self._batch(pa.concat_tables(pending))

    def _batch(self, rows: pa.Table) -> dict[str, Any]:
        images, rows, skipped = _decode_rows(self.dataset, rows, self.transform)
        product_ids = rows["product_id"].to_pylist()
        return {
            "product_ids": product_ids,
            "doc_ids": torch.from_numpy(_stable_ids(product_ids)),
            "images": images,
            "title_tokens": _tokenize(self.tokenizer, rows["title"].to_pylist()),
            "skipped": skipped,
        }


def corpus_batches(
    dataset: MarqoGS,
    corpus: str,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], Any],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """The corpus's documents in batches of at most ``batch_size``, each document once (with
    workers the batches interleave: not ``iter_corpus``'s order). Dicts: ``product_ids`` (b
    str), ``doc_ids`` (b,) int64, ``images`` (b, 3, H, W), ``title_tokens`` (b, L) int64 and
    ``skipped`` (documents dropped for a missing or unreadable image)."""
    stream = _CorpusStream(dataset, corpus, transform, tokenizer, batch_size)
    if num_workers == 0:
        yield from stream
    else:
        yield from torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
