"""MarqoGS-10M on disk, in both of its layouts: the files found, read a piece (a parquet row
group or a chunk of CSV records) at a time, checked against the dataset card, the corpora, and
image decoding. Training order: ``reference_trainer.stream``; evaluation sets:
``reference_trainer.eval_sets``.

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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
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
#: The CSV columns read with a type of their own (the others as Arrow infers them: a query_id
#: column of "Q00159" strings or of integers).
_CSV_TYPES = {"image_local": pa.string()} | {k: ROW_COLUMNS[k] for k in list(ROW_COLUMNS)[:4]}
#: The dataset card's columns (dtype first) and the kinds of Arrow type the loader accepts for
#: each; other columns are ignored. Ids that are strings are hashed (``stable_id``), integer ids
#: taken as they are; scores may be integers (the card) or floats.
CARD_COLUMNS = {
    "image": ("struct", "binary"),
    "query": ("string",),
    "product_id": ("string", "integer"),
    "position": ("integer",),
    "title": ("string",),
    "pair_id": ("string", "integer"),
    "score_linear": ("integer", "floating"),
    "score_reciprocal": ("floating", "integer"),
    "no_score": ("integer", "floating"),
    "query_id": ("string", "integer"),
    "image_local": ("string",),
}
_UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The data cannot be used as asked; the message names the file, column or value."""


@dataclass
class Document:
    """A corpus document; ``image`` is the encoded image file, None when it is missing."""

    product_id: str
    title: str
    image: bytes | None


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


def stable_ids(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((stable_id(t) for t in texts), dtype=np.int64, count=len(texts))


def _check_scores(scores: np.ndarray, where: str) -> None:
    bad = ~((scores > 0) & (scores <= MAX_SCORE))  # NaN (a missing score) is bad too
    if bad.any():
        raise DataError(
            f"{where}: score_linear {scores[bad][0]} is outside (0, {MAX_SCORE:g}] "
            f"({int(bad.sum())} such rows)"
        )


def _type_kind(kind: pa.DataType) -> str:
    for name, test in (("string", pa.types.is_string), ("string", pa.types.is_large_string),
                       ("integer", pa.types.is_integer), ("floating", pa.types.is_floating),
                       ("struct", pa.types.is_struct), ("binary", pa.types.is_binary),
                       ("binary", pa.types.is_large_binary), ("null", pa.types.is_null)):  # fmt: skip
        if test(kind):
            return name
    return str(kind)


def _check_types(where: str, schema: pa.Schema) -> None:
    """Each of the card's columns in ``schema`` has a type the loader accepts (an all-null
    column too); a column of another type is an error that names it."""
    for field in schema:
        allowed = CARD_COLUMNS.get(field.name)
        kind = _type_kind(field.type)
        if allowed is not None and kind not in (*allowed, "null"):
            raise DataError(
                f"{where}: column {field.name!r} has type {field.type}; expected "
                f"{' or '.join(allowed)} (the dataset card: {allowed[0]})"
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
    _check_types(f"{split}: {path}", meta.schema.to_arrow_schema())
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
            out[column] = pa.array(stable_ids(raw["query"].to_pylist()), pa.int64())
        elif column == "query_id" and _type_kind(raw[column].type) == "string":
            out[column] = pa.array(stable_ids(raw[column].to_pylist()), pa.int64())
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
            raise DataError(
                f"{piece}: cannot read: {_name_the_column(str(err), piece, self)}"
            ) from err
        if self.layout == "csv":
            _check_types(str(piece), raw.schema)
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
            stable_ids(self.read_piece(p, ("product_id",))["product_id"].to_pylist())
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


def _name_the_column(message: str, piece: Piece, dataset: MarqoGS) -> str:
    """Arrow's CSV errors say "CSV column #4": add the column's name."""
    found = re.search(r"column #(\d+)", message)
    header = dataset._headers.get(piece.path, [])
    if found and int(found.group(1)) < len(header):
        return f"column {header[int(found.group(1))]!r}: {message}"
    return message


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


# ---------------------------------------------------------------------------- decoding


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


def decode_rows(
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


def tokenize(tokenizer: Callable[[list[str]], Any], texts: list[str]) -> torch.Tensor:
    if not texts:
        return torch.as_tensor(tokenizer([""]), dtype=torch.long)[:0]
    return torch.as_tensor(tokenizer(texts), dtype=torch.long)
