"""A small synthetic dataset in the exact MarqoGS-10M layouts, with graded relevance to learn.

Products have five attributes: colour and shape are drawn in the image (a shape in a shade of the
colour on a grey texture); brand, material and category are written in the title (the colour too,
in some titles). A query names two to four attributes ("acme red leather bag"). A query's
documents are the products of its product set sharing the most of its attributes (the match
count plus Gaussian noise ranks them), so the positions 1..n and ``score_linear = 101 - position``
are graded relevance that a model learns to order from both images and titles.

As in MarqoGS-10M there are two query sets and two product sets, and the four splits are their
combinations: ``in_domain`` = queries 0 x products 0, ``novel_query`` = 1 x 0,
``novel_document`` = 0 x 1, ``zero_shot`` = 1 x 1. ``make_synthetic`` writes the Hugging Face
layout (``data/<split>-0000k-of-0000n.parquet``: the Image struct, the ``huggingface`` schema
metadata, several row groups per shard, rows ordered by query), the CSV/JSON layout (the four
CSVs, ``corpus_1.json``, ``corpus_2.json``, ``images/``) or both, and ``synthetic.json``: the
settings and the ids of the products whose image is corrupt or missing.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from reference_trainer.marqo import CORPUS_FILES, CSV_SPLIT_FILES, SPLIT_CORPUS, SPLITS

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
# the attribute families, in the order a query names them
ATTRIBUTES = {
    "brand": ("acme", "zenith", "nova", "orbit", "lumen", "vertex", "aurora", "summit"),
    "colour": tuple(COLOURS),
    "material": ("leather", "cotton", "wool", "silk", "denim", "linen"),
    "shape": ("round", "square", "triangular", "cross", "ring"),
    "category": ("bag", "shoe", "hat", "scarf", "jacket", "lamp", "mug", "watch"),
}
SPLIT_SETS = {
    "in_domain": (0, 0),
    "novel_query": (1, 0),
    "novel_document": (0, 1),
    "zero_shot": (1, 1),
}
HF_FEATURES = {  # the ``datasets`` features of the published shards
    "image": {"_type": "Image"},
    "query": {"dtype": "string", "_type": "Value"},
    "product_id": {"dtype": "string", "_type": "Value"},
    "position": {"dtype": "int64", "_type": "Value"},
    "title": {"dtype": "string", "_type": "Value"},
    "pair_id": {"dtype": "string", "_type": "Value"},
    "score_linear": {"dtype": "int64", "_type": "Value"},
    "score_reciprocal": {"dtype": "float64", "_type": "Value"},
    "no_score": {"dtype": "int64", "_type": "Value"},
    "query_id": {"dtype": "string", "_type": "Value"},
}
_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}


def hf_schema(query_id_dtype: str = "string") -> pa.Schema:
    """The published shards' Arrow schema with its ``huggingface`` metadata; ``query_id_dtype``
    "int64" writes integer query ids instead of the card's strings."""
    features = HF_FEATURES | {"query_id": {"dtype": query_id_dtype, "_type": "Value"}}
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema(
        [(name, _ARROW_TYPES[f["dtype"]] if "dtype" in f else image)
         for name, f in features.items()],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )  # fmt: skip


CSV_COLUMNS = (
    "query",
    "product_id",
    "title",
    "image_local",
    "score_linear",
    "query_id",
    "position",
)


def draw_image(
    colour: str, shape: str, size: int, rng: np.random.Generator, texture_block: int | None = None
) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 image: the shape in a shade of the colour on a grey texture of
    ``texture_block``-pixel squares (default ``size // 8``; 1 gives pixel noise, which PNG cannot
    compress)."""
    block = texture_block or max(size // 8, 1)
    texture = rng.normal(128, 20, (-(-size // block), -(-size // block), 3))
    pixels = np.repeat(np.repeat(texture, block, 0), block, 1)[:size, :size]
    centre = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    radius = size * rng.uniform(0.25, 0.38)
    y, x = np.mgrid[:size, :size] + 0.5
    dy, dx = (y - centre[0]) / radius, (x - centre[1]) / radius
    distance = np.hypot(dx, dy)
    mask = {
        "round": distance < 1,
        "square": np.maximum(abs(dx), abs(dy)) < 0.85,
        "triangular": (dy < 0.8) & (abs(dx) < (dy + 1) / 2),
        "cross": ((abs(dx) < 0.3) & (abs(dy) < 1)) | ((abs(dy) < 0.3) & (abs(dx) < 1)),
        "ring": (distance < 1) & (distance > 0.55),
    }[shape]
    pixels[mask] = np.array(COLOURS[colour]) + rng.normal(0, 12, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _products(product_set: int, count: int, rng: np.random.Generator) -> list[dict]:
    products = []
    for i in range(count):
        product = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        words = [product["brand"].capitalize(), product["material"], product["category"]]
        if rng.random() < 0.3:
            words.insert(1, product["colour"])
        if rng.random() < 0.5:
            words[-1] += f", model {rng.integers(100, 999)}"
        product |= {"product_id": str((product_set + 1) * 10_000_000 + i), "title": " ".join(words)}
        products.append(product)
    return products


def _queries(
    count: int, first_id: int, taken: set[str], rng: np.random.Generator, string_ids: bool
) -> list[dict]:
    """``count`` queries with texts not in ``taken`` (which gains them), ids from ``first_id``
    (as strings ``Q00042`` with ``string_ids``, the dataset card's dtype)."""
    queries: list[dict] = []
    while len(queries) < count:
        families = sorted(rng.choice(len(ATTRIBUTES), size=rng.integers(2, 5), replace=False))
        named = {
            name: values[rng.integers(len(values))]
            for name, values in (list(ATTRIBUTES.items())[f] for f in families)
        }
        text = " ".join(named.values())
        if text not in taken:
            taken.add(text)
            number = first_id + len(queries)
            query_id = f"Q{number:05d}" if string_ids else number
            queries.append({"query": text, "query_id": query_id, "named": named})
    return queries


def _split_rows(
    queries: list[dict], products: list[dict], docs: int, noise: float, rng: np.random.Generator
) -> dict[str, list]:
    """The columns of a split: each query's ``docs`` best-matching products, by position."""
    columns: dict[str, list] = {
        "query": [],
        "query_id": [],
        "product_id": [],
        "title": [],
        "position": [],
    }
    for query in queries:
        matches = np.array(
            [sum(p[k] == v for k, v in query["named"].items()) for p in products], float
        )
        ranking = np.argsort(-(matches + noise * rng.standard_normal(len(products))), kind="stable")
        for position, j in enumerate(ranking[:docs], start=1):
            row = (
                query["query"],
                query["query_id"],
                products[j]["product_id"],
                products[j]["title"],
                position,
            )
            for column, value in zip(columns, row):
                columns[column].append(value)
    return columns


def make_synthetic(
    out: str | Path,
    *,
    layout: str = "both",
    seed: int = 0,
    queries_per_set: int = 160,
    products_per_set: int = 400,
    docs_per_query: int = 24,
    shards_per_split: int = 3,
    rows_per_group: int = 256,
    image_size: int = 32,
    image_format: str = "PNG",
    texture_block: int | None = None,
    noise: float = 0.7,
    corrupt_images: int = 0,
    missing_images: int = 0,
    query_id_dtype: str = "string",
) -> Path:
    """Write a MarqoGS-10M-shaped dataset to ``out`` (see the module docstring); returns ``out``.

    Args:
        layout: "huggingface", "csv" or "both" (in one directory).
        queries_per_set, products_per_set, docs_per_query: each split has ``queries_per_set *
            docs_per_query`` rows, ordered by query.
        shards_per_split, rows_per_group: the parquet shards of a split and their row groups.
        image_size, image_format, texture_block: the images (``draw_image``), "PNG" or "JPEG".
        noise: the standard deviation of the noise added to a product's match count before
            ranking (0: positions follow the match count exactly).
        corrupt_images, missing_images: products of ``in_domain`` whose image is bytes that are
            not an image, or absent (a null struct; a path to no file in the CSV layout).
        query_id_dtype: "string" (the dataset card's: ``Q00042``) or "int64".
    """
    if layout not in ("both", "huggingface", "csv"):
        raise ValueError(f"layout must be 'both', 'huggingface' or 'csv', got {layout!r}")
    if query_id_dtype not in ("string", "int64"):
        raise ValueError(f"query_id_dtype must be 'string' or 'int64', got {query_id_dtype!r}")
    if not 1 <= docs_per_query <= min(products_per_set, 100):
        raise ValueError(
            f"docs_per_query must be in 1..min(products_per_set, 100), got {docs_per_query}"
        )
    out = Path(out)
    rng = np.random.default_rng(seed)
    products = [_products(s, products_per_set, rng) for s in (0, 1)]
    taken: set[str] = set()
    string_ids = query_id_dtype == "string"
    queries = [
        _queries(queries_per_set, s * queries_per_set, taken, rng, string_ids) for s in (0, 1)
    ]
    splits = {
        split: _split_rows(queries[q], products[p], docs_per_query, noise, rng)
        for split, (q, p) in SPLIT_SETS.items()
    }
    images: dict[str, bytes | None] = {}
    for p in (p for group in products for p in group):
        buffer = io.BytesIO()
        pixels = draw_image(p["colour"], p["shape"], image_size, rng, texture_block)
        Image.fromarray(pixels).save(buffer, format=image_format)
        images[p["product_id"]] = buffer.getvalue()
    in_domain = sorted(set(splits["in_domain"]["product_id"]))
    bad = rng.choice(in_domain, size=corrupt_images + missing_images, replace=False).tolist()
    corrupt, missing = bad[:corrupt_images], bad[corrupt_images:]
    images |= {product_id: b"not an image: " + rng.bytes(64) for product_id in corrupt}
    images |= {product_id: None for product_id in missing}

    out.mkdir(parents=True, exist_ok=True)
    if layout in ("both", "huggingface"):
        _write_parquet(out / "data", splits, images, shards_per_split, rows_per_group,
                       hf_schema(query_id_dtype))  # fmt: skip
    if layout in ("both", "csv"):
        _write_csv(out, splits, images, "png" if image_format.upper() == "PNG" else "jpg")
    manifest = {
        "seed": seed,
        "query_id_dtype": query_id_dtype,
        "layout": layout,
        "rows_per_split": {split: len(rows["query"]) for split, rows in splits.items()},
        "corrupt_products": corrupt,
        "missing_products": missing,
    }
    (out / "synthetic.json").write_text(json.dumps(manifest, indent=1))
    return out


def _write_parquet(
    folder: Path, splits: dict, images: dict, shards: int, rows_per_group: int, schema: pa.Schema
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = splits[split]
        positions = np.array(rows["position"])
        table = (
            pa.table(
                rows
                | {
                    "image": [
                        None if images[i] is None else {"bytes": images[i], "path": None}
                        for i in rows["product_id"]
                    ],
                    "pair_id": [f"{q}-{p}" for q, p in zip(rows["query_id"], rows["product_id"])],
                    "score_linear": 101 - positions,
                    "score_reciprocal": 1 / positions,
                    "no_score": np.ones(len(positions), np.int64),
                }
            )
            .select(schema.names)
            .cast(schema)
        )
        bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
        for shard in range(shards):
            path = folder / f"{split}-{shard:05d}-of-{shards:05d}.parquet"
            pq.write_table(
                table.slice(bounds[shard], bounds[shard + 1] - bounds[shard]),
                path,
                row_group_size=rows_per_group,
            )


def _write_csv(out: Path, splits: dict, images: dict, suffix: str) -> None:
    (out / "images").mkdir(exist_ok=True)
    path_of = {product_id: f"images/{product_id}.{suffix}" for product_id in images}
    for product_id, data in images.items():
        if data is not None:  # a missing image: the path is listed, the file is absent
            (out / path_of[product_id]).write_bytes(data)
    for split, name in CSV_SPLIT_FILES.items():
        rows = splits[split]
        values = rows | {
            "image_local": [path_of[p] for p in rows["product_id"]],
            "score_linear": [101 - p for p in rows["position"]],
        }
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(zip(*(values[c] for c in CSV_COLUMNS)))
    for corpus, name in CORPUS_FILES.items():  # the products of its splits, first seen first
        entries: dict[str, dict] = {}
        for split in (s for s in SPLITS if SPLIT_CORPUS[s] == corpus):
            for product_id, title in zip(splits[split]["product_id"], splits[split]["title"]):
                entries.setdefault(product_id, {"image_local": path_of[product_id], "title": title})
        (out / name).write_text(json.dumps(entries))
