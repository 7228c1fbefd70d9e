"""The MarqoGS-10M readers: both layouts (with ``datasets`` as the oracle of the Hugging Face
format), bounded memory, the deterministic and resumable epoch order, the official evaluation
sample (with pandas as the oracle) and the errors."""

from __future__ import annotations

import csv
import io
import json
import math
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from trainer_helpers import row_keys, same_batch, tiny_dataset, tokenizer, transform

from reference_trainer.eval_sets import corpus_batches, eval_queries
from reference_trainer.marqo import (
    CSV_SPLIT_FILES,
    OFFICIAL_QUERY_KEY_SUFFIX,
    SPLITS,
    DataError,
    open_dataset,
    stable_id,
)
from reference_trainer.stream import (
    TrainStream,
    deal_window,
    epoch_windows,
    interleave_workers,
    train_loader,
)
from reference_trainer.synthetic import HF_FEATURES

datasets = pytest.importorskip("datasets")

BATCH = 32  # the tiny splits have 768 rows: 24 batches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both layouts in one directory; 2 products with a corrupt and 2 with a missing image."""
    return tiny_dataset(tmp_path_factory.mktemp("tiny") / "gs", corrupt_images=2, missing_images=2)


@pytest.fixture(scope="module")
def manifest(tiny: Path) -> dict:
    return json.loads((tiny / "synthetic.json").read_text())


def make_stream(dataset, **options) -> TrainStream:
    settings = {
        "batch_size": BATCH,
        "transform": transform(),
        "tokenizer": tokenizer(),
        "window_batches": 5,
    }
    return TrainStream(dataset, **(settings | options))


def epoch(dataset, **options) -> list[dict]:
    return list(train_loader(make_stream(dataset, **options)))


def split_frame(root: Path, split: str) -> pd.DataFrame:
    """A split of the synthetic data as the official code reads it (pandas on the CSV)."""
    return pd.read_csv(root / CSV_SPLIT_FILES[split], dtype={"product_id": str})


def bad_rows(root: Path, split: str, manifest: dict) -> int:
    bad = set(manifest["corrupt_products"]) | set(manifest["missing_products"])
    return int(split_frame(root, split)["product_id"].isin(bad).sum())


# ---------------------------------------------------------------------------- layouts


def test_synthetic_shards_are_what_datasets_writes(tiny: Path, tmp_path: Path) -> None:
    shards = sorted((tiny / "data").glob("in_domain-*.parquet"))
    assert [s.name for s in shards] == [f"in_domain-0000{i}-of-00003.parquet" for i in range(3)]
    assert all(pq.ParquetFile(s).metadata.num_row_groups > 1 for s in shards)
    ours = datasets.Dataset.from_parquet(str(shards[0]), cache_dir=str(tmp_path / "cache"))
    assert ours.features == datasets.Features.from_dict(HF_FEATURES)
    assert isinstance(ours.features["image"], datasets.Image)
    first = ours[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (32, 32)
    assert first["score_linear"] == 101 - first["position"] and first["no_score"] == 1
    # datasets writing the same rows gives the same schema, metadata included
    rows = pq.read_table(shards[0]).slice(0, 10).to_pylist()
    reference = tmp_path / "reference.parquet"
    datasets.Dataset.from_list(rows, features=ours.features).to_parquet(str(reference))
    assert pq.read_schema(reference).equals(pq.read_schema(shards[0]), check_metadata=True)


def test_synthetic_relevance_is_graded(tiny: Path) -> None:
    """Better positions share more of the query's words with the title (and its image)."""
    frame = split_frame(tiny, "in_domain")
    shared = [
        len(set(query.split()) & set(title.lower().replace(",", "").split()))
        for query, title in zip(frame["query"], frame["title"])
    ]
    by_position = pd.Series(shared).groupby((frame["position"] - 1) // 4).mean()
    assert by_position.is_monotonic_decreasing and by_position.iloc[0] > by_position.iloc[-1] + 0.2
    assert (
        frame.groupby("query")["position"].apply(list).map(lambda p: p == list(range(1, 17))).all()
    )


def write_with_datasets(root: Path, split: str, queries: int, docs: int, shards: int) -> list[dict]:
    """``queries * docs`` rows written by ``datasets`` (Image feature) in ``shards`` shards of
    8-row groups; row 3 has no image, row 7 bytes that are not an image."""
    rng = np.random.default_rng(0)
    rows = []
    for q in range(queries):
        for position in range(1, docs + 1):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            rows.append(
                {"image": Image.fromarray(pixels), "query": f"query {q}", "product_id": f"p{q}-{position}",
                 "position": position, "title": f"title {q} {position}", "score_linear": 101 - position,
                 "query_id": 1000 + q}
            )  # fmt: skip
    rows[3]["image"] = None
    rows[7]["image"] = {"bytes": b"\x89PNG but not really", "path": None}
    features = datasets.Features(
        {"image": datasets.Image(), "query": datasets.Value("string"), "product_id": datasets.Value("string"),
         "position": datasets.Value("int64"), "title": datasets.Value("string"),
         "score_linear": datasets.Value("int64"), "query_id": datasets.Value("int64")}
    )  # fmt: skip
    table = datasets.Dataset.from_list(rows, features=features)
    (root / "data").mkdir(parents=True)
    for i in range(shards):
        shard = table.shard(shards, i, contiguous=True)
        shard.to_parquet(
            str(root / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet"), batch_size=8
        )
    return rows


def test_reads_parquet_written_by_datasets(tmp_path: Path) -> None:
    rows = write_with_datasets(tmp_path, "in_domain", queries=8, docs=8, shards=2)
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "huggingface" and dataset.splits == ("in_domain",)
    assert len(dataset.pieces("in_domain")) == 8  # 2 shards x 4 row groups
    batches = epoch(dataset, batch_size=8, window_batches=2, transform=transform(train=False))
    assert sum(b["skipped"] for b in batches) == 2
    expected = {
        (r["query_id"], stable_id(r["product_id"])) for i, r in enumerate(rows) if i not in (3, 7)
    }
    assert sorted(row_keys(batches)) == sorted(expected)
    # the decoded pixels are the source image's
    first = batches[0]
    source = next(
        r for r in rows if (r["query_id"], stable_id(r["product_id"])) == row_keys([first])[0]
    )
    assert torch.equal(first["images"][0], transform(train=False)(source["image"]))
    assert first["scores"].dtype == torch.float32 and first["query_tokens"].dtype == torch.int64


def test_csv_layout_with_quoting_and_bad_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    titles = ["plain", "with, comma", 'with "quotes"', "two\nlines", "three\r\nlines\nhere", ""]
    rows = []
    for i in range(30):
        path = f"images/{i}.png"
        if i == 4:
            (tmp_path / path).write_bytes(b"not an image")
        elif i != 9:  # image 9 is missing
            buffer = io.BytesIO()
            Image.new("RGB", (10, 10), (i, 0, 0)).save(buffer, format="PNG")
            (tmp_path / path).write_bytes(buffer.getvalue())
        rows.append([f"q{i // 6}", str(i), titles[i % len(titles)], path, 100 - i % 6, i // 6])
    with open(tmp_path / CSV_SPLIT_FILES["in_domain"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "product_id", "title", "image_local", "score_linear", "query_id"])
        writer.writerows(rows)
        f.write("\n")  # a trailing blank line is no record
    dataset = open_dataset(tmp_path, csv_rows_per_chunk=4)
    assert dataset.layout == "csv" and dataset.num_rows("in_domain") == 30
    assert [p.rows for p in dataset.pieces("in_domain")] == [4] * 7 + [2]
    read = pa.concat_tables(dataset.read_piece(p) for p in dataset.pieces("in_domain"))
    assert read["title"].to_pylist() == [r[2] for r in rows]
    assert read["product_id"].to_pylist() == [r[1] for r in rows]
    batches = epoch(dataset, batch_size=5, window_batches=2)
    assert sum(b["skipped"] for b in batches) == 2
    assert sorted(row_keys(batches)) == sorted(
        (r[5], stable_id(r[1])) for r in rows if r[1] not in ("4", "9")
    )


def test_layouts_give_the_same_data(tiny: Path, manifest: dict) -> None:
    huggingface = open_dataset(tiny)
    csv_layout = open_dataset(tiny, layout="csv", csv_rows_per_chunk=100)
    assert (huggingface.layout, csv_layout.layout) == ("huggingface", "csv")
    assert huggingface.splits == csv_layout.splits == SPLITS
    assert "12 row groups/768 rows" in huggingface.describe()
    frame = split_frame(tiny, "in_domain")
    bad = set(manifest["corrupt_products"]) | set(manifest["missing_products"])
    expected = sorted(
        (query_key(q), stable_id(p))
        for q, p in zip(frame["query_id"], frame["product_id"])
        if p not in bad
    )
    for dataset in (huggingface, csv_layout):
        batches = epoch(dataset)
        assert sorted(row_keys(batches)) == expected  # 768 rows = 24 full batches: none left out
        assert sum(b["skipped"] for b in batches) == bad_rows(tiny, "in_domain", manifest) > 0
    for corpus in ("corpus_1", "corpus_2"):
        documents = [list(huggingface.iter_corpus(corpus)), list(csv_layout.iter_corpus(corpus))]
        assert documents[0] == documents[1]
    a, b = eval_queries(huggingface, "novel_query", 10), eval_queries(csv_layout, "novel_query", 10)
    assert a.queries == b.queries and a.judged_products == b.judged_products
    assert np.array_equal(a.judged_grades, b.judged_grades)


def query_key(query_id) -> int:
    """The id the loader gives a query: a string hashed as product ids are, an integer as is."""
    return stable_id(query_id) if isinstance(query_id, str) else int(query_id)


@pytest.mark.parametrize("query_id_dtype", ["string", "int64"])
def test_string_and_integer_query_ids_in_both_layouts(tmp_path: Path, query_id_dtype: str) -> None:
    root = tiny_dataset(tmp_path / "gs", queries_per_set=8, docs_per_query=8,
                        query_id_dtype=query_id_dtype)  # fmt: skip
    arrow_type = pq.read_schema(next((root / "data").glob("in_domain-*.parquet"))).field("query_id")
    assert str(arrow_type.type) == query_id_dtype
    frame = split_frame(root, "in_domain")
    assert all(isinstance(q, str) == (query_id_dtype == "string") for q in frame["query_id"])
    expected = sorted(
        (query_key(q), stable_id(p)) for q, p in zip(frame["query_id"], frame["product_id"])
    )
    samples = []
    for layout in ("huggingface", "csv"):
        dataset = open_dataset(root, layout=layout)
        assert sorted(row_keys(epoch(dataset, batch_size=8, window_batches=2))) == expected
        samples.append(eval_queries(dataset, "novel_query"))
    assert samples[0].queries == samples[1].queries and samples[0].queries
    assert np.array_equal(samples[0].judged_grades, samples[1].judged_grades)


def test_card_dtypes_are_checked_and_extra_columns_ignored(tiny: Path, tmp_path: Path) -> None:
    def with_column(name: str, values):
        def change(table: pa.Table) -> pa.Table:
            column = pa.array(values(table.num_rows))
            if name in table.column_names:
                return table.set_column(table.schema.get_field_index(name), name, column)
            return table.append_column(name, column)

        return change

    extra = copy_split(tiny, tmp_path / "extra", change=with_column("notes", lambda n: ["x"] * n))
    assert open_dataset(extra).num_rows("in_domain") == 768
    for name, values, found in (
        ("position", lambda n: [str(i) for i in range(n)], "string"),
        ("score_reciprocal", lambda n: ["0.5"] * n, "string"),
        ("query_id", lambda n: [0.5] * n, "double"),
        ("title", lambda n: list(range(n)), "int64"),
    ):
        root = copy_split(tiny, tmp_path / name, change=with_column(name, values))
        with pytest.raises(DataError, match=rf"column '{name}' has type {found}; expected"):
            open_dataset(root)
    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    frame = split_frame(tiny, "in_domain")
    frame.assign(score_linear="high").to_csv(csv_root / CSV_SPLIT_FILES["in_domain"], index=False)
    with pytest.raises(DataError, match=r"column 'score_linear'"):
        eval_queries(open_dataset(csv_root), "in_domain")


# ---------------------------------------------------------------------------- memory


def streaming_peaks(root: Path) -> tuple[int, int]:
    """Peak Python memory (tracemalloc) and peak Arrow memory over one epoch of ``root``."""
    stream = make_stream(
        open_dataset(root), batch_size=16, window_batches=4,
        transform=lambda image: torch.from_numpy(np.asarray(image).copy()),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
    )  # fmt: skip
    next(iter(train_loader(stream)))  # first-use costs (PIL plugins, ...) are not streaming's
    arrow_peak = 0
    tracemalloc.start()
    try:
        for _ in train_loader(stream):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return python_peak, arrow_peak


def test_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    # 64x64 noise PNGs (about 12 kB): 512 rows (6 MB of images per split) against 2048 rows in
    # 4x the shards and row groups; a window is 64 rows
    common = {"docs_per_query": 16, "rows_per_group": 32, "image_size": 64, "texture_block": 1}
    small = tiny_dataset(
        tmp_path / "x", queries_per_set=32, shards_per_split=2, layout="huggingface", **common
    )
    large = tiny_dataset(
        tmp_path / "4x", queries_per_set=128, shards_per_split=8, layout="huggingface", **common
    )
    shard = sorted((large / "data").glob("in_domain-*"))[0]
    shard_image_bytes = pq.read_table(shard, columns=["image"]).nbytes
    python_small, arrow_small = streaming_peaks(small)
    python_large, arrow_large = streaming_peaks(large)
    assert python_large < 1.2 * python_small, (python_small, python_large)
    assert arrow_large < 1.2 * arrow_small, (arrow_small, arrow_large)
    assert max(python_large, arrow_large) < shard_image_bytes  # one of the 8 shards
    assert pq.ParquetFile(shard).metadata.num_row_groups == 8


# ---------------------------------------------------------------------------- order


def test_same_seed_and_epoch_same_batches_other_epochs_reorder(tiny: Path) -> None:
    dataset = open_dataset(tiny)
    first, again = epoch(dataset, seed=5, epoch=1), epoch(dataset, seed=5, epoch=1)
    assert len(first) == len(again) == 24
    assert all(same_batch(a, b) for a, b in zip(first, again))
    for other in (epoch(dataset, seed=5, epoch=2), epoch(dataset, seed=6, epoch=1)):
        assert row_keys(other) != row_keys(first)
        assert sorted(row_keys(other)) == sorted(row_keys(first))  # the same rows, reordered
    assert [b["batch"] for b in first] == list(range(24))


class CountingTransform:
    def __init__(self, transform) -> None:
        self.transform, self.calls = transform, 0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.calls += 1
        return self.transform(image)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_rest_of_the_epoch(tiny: Path, num_workers: int) -> None:
    dataset = open_dataset(tiny)
    # 24 batches in windows of 5, 5, 5, 5, 4: with two workers, worker 0 has 14 batches and
    # worker 1 has 10, so the DataLoader's round-robin runs out of worker 1 at batch 20
    full = epoch(dataset, num_workers=num_workers, epoch=3)
    assert [b["batch"] for b in full] == list(range(24))
    for start in (1, 7, 21):
        counted = CountingTransform(transform())
        resumed = epoch(
            dataset, num_workers=num_workers, epoch=3, start_batch=start, transform=counted
        )
        assert [b["batch"] for b in resumed] == list(range(start, 24))
        assert all(same_batch(a, b) for a, b in zip(full[start:], resumed, strict=True))
        if num_workers == 0:  # nothing before start_batch was decoded
            assert counted.calls == sum(len(b["scores"]) for b in resumed)


def test_workers_change_the_order_not_the_batches(tiny: Path) -> None:
    dataset = open_dataset(tiny, layout="csv", csv_rows_per_chunk=100)
    alone, two = epoch(dataset, num_workers=0), epoch(dataset, num_workers=2)
    assert row_keys(alone) != row_keys(two)
    by_rows = {tuple(row_keys([b])): b for b in alone}
    assert len(by_rows) == len(two) == 24
    assert all(
        same_batch(b | {"batch": 0}, by_rows[tuple(row_keys([b]))] | {"batch": 0}) for b in two
    )


def test_ranks_partition_the_epoch(tiny: Path) -> None:
    dataset = open_dataset(tiny)
    ranks = [epoch(dataset, rank=r, world_size=3, window_batches=3) for r in range(3)]
    assert [len(r) for r in ranks] == [8, 8, 8]  # 768 // (32 * 3)
    assert [len(make_stream(dataset, rank=r, world_size=3)) for r in range(3)] == [8, 8, 8]
    keys = [set(row_keys(r)) for r in ranks]
    assert all(len(k) + sum(b["skipped"] for b in r) == 8 * BATCH for k, r in zip(keys, ranks))
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_every_batch_mixes_many_queries(tiny: Path) -> None:
    dataset = open_dataset(tiny)
    window_batches = 4
    bound = math.ceil(16 / window_batches)  # 16 documents per query
    for batch in epoch(dataset, window_batches=window_batches):
        counts = Counter(batch["query_ids"].tolist())
        assert max(counts.values()) <= bound and len(counts) >= BATCH // bound - 1
    for batch in epoch(dataset, window_batches=window_batches, max_docs_per_query=2):
        assert max(Counter(batch["query_ids"].tolist()).values()) <= 2
        assert len(batch["scores"]) + batch["skipped"] + batch["capped"] == BATCH
        assert batch["capped"] > 0


@given(
    query_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=30),
    batches=st.integers(1, 6),
    cap=st.none() | st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_deal_window_spreads_each_query(
    query_sizes: list[int], batches: int, cap: int | None, seed: int
) -> None:
    query_ids = np.repeat(np.arange(len(query_sizes)) * 7, query_sizes)
    query_ids = query_ids[: len(query_ids) // batches * batches]
    if len(query_ids) == 0:
        return
    dealt, capped = deal_window(query_ids, batches, np.random.default_rng(seed), cap)
    sizes = Counter(query_ids.tolist())
    assert sorted(np.concatenate(dealt).tolist()) == sorted(set(np.concatenate(dealt).tolist()))
    for rows, dropped in zip(dealt, capped):
        assert len(rows) + dropped == len(query_ids) // batches
        for query, count in Counter(query_ids[rows].tolist()).items():
            assert count <= math.ceil(sizes[query] / batches) and (cap is None or count <= cap)
    if cap is None:
        assert sorted(np.concatenate(dealt).tolist()) == list(range(len(query_ids)))


def test_epoch_windows_and_worker_interleaving() -> None:
    # 200 rows, batches of 10 on 2 ranks: 10 batches per rank, in windows of 4, 4 and 2
    windows = epoch_windows(rows=200, batch_size=10, window_batches=4, world_size=2)
    assert [(w.row_start, w.batches) for w in windows] == [
        (0, 4),
        (40, 4),
        (80, 4),
        (120, 4),
        (160, 2),
        (180, 2),
    ]
    order = interleave_workers(
        windows[0::2], num_workers=2
    )  # worker 0: slots 0 and 2; worker 1: slot 1
    expected = [(k, k, b) for b in range(4) for k in (0, 1)] + [(0, 2, 0), (0, 2, 1)]
    assert order == expected
    assert interleave_workers(windows[0::2], num_workers=0) == [
        (0, s, b) for s in range(3) for b in range(windows[2 * s].batches)
    ]


# ---------------------------------------------------------------------------- evaluation


def official_sample(
    frame: pd.DataFrame, top_q: int, rescale: bool = False
) -> tuple[set[str], pd.Series]:
    """The official ``get_test_queries`` of evals/eval_gs_v1.py, restated with pandas."""
    frame = frame.copy()
    frame["key"] = frame["query"] + OFFICIAL_QUERY_KEY_SUFFIX
    weight = frame["score_linear"]
    if rescale:
        frame["score_linear"] = (
            ((weight - weight.min()) / (weight.max() - weight.min())) * 99 + 1
        ).astype(int)
    summed = frame[["key", "score_linear"]].groupby("key").sum()
    drawn = summed.sample(n=top_q, weights=summed["score_linear"], random_state=1, replace=False)
    return {k[: -len(OFFICIAL_QUERY_KEY_SUFFIX)] for k in drawn.index}, frame.set_index(
        ["query", "product_id"]
    )["score_linear"]


@pytest.mark.parametrize("rescale", [False, True])
def test_eval_queries_are_the_official_sample(tiny: Path, rescale: bool) -> None:
    dataset = open_dataset(tiny)
    frame = split_frame(tiny, "zero_shot")
    expected, grade_of = official_sample(frame, 20, rescale)
    sample = eval_queries(dataset, "zero_shot", max_queries=20, official_rescale=rescale)
    assert len(sample.queries) == 20 and set(sample.queries) == expected
    assert sample.split == "zero_shot"
    summed = frame.groupby("query")["score_linear"].sum() if not rescale else None
    if summed is not None:
        assert list(summed[sample.queries]) == sorted(summed[sample.queries], reverse=True)
    first_id = frame.groupby("query")["query_id"].first()
    assert sample.query_ids.tolist() == [query_key(first_id[q]) for q in sample.queries]
    judged = frame[frame["query"].isin(expected)]
    assert len(sample.judged_products) == len(judged)
    for row, product, grade in zip(
        sample.judged_rows, sample.judged_products, sample.judged_grades
    ):
        assert grade == grade_of[(sample.queries[row], product)]
    if rescale:  # the official rescaling moved some grades (16 positions: 85..100 -> 1..100)
        assert not np.array_equal(
            sample.judged_grades, eval_queries(dataset, "zero_shot", 20).judged_grades
        )


def test_small_splits_keep_every_query_and_corpora_follow_the_product_sets(tiny: Path) -> None:
    dataset = open_dataset(tiny)
    sample = eval_queries(dataset, "in_domain")  # 48 queries < 2000
    frame = split_frame(tiny, "in_domain")
    assert sorted(sample.queries) == sorted(frame["query"].unique())
    assert np.all(sample.judged_grades == 101 - frame.set_index(["query", "product_id"]).loc[
        list(zip([sample.queries[r] for r in sample.judged_rows], sample.judged_products)), "position"
    ].to_numpy())  # fmt: skip
    products = {split: set(split_frame(tiny, split)["product_id"]) for split in SPLITS}
    corpus_1 = [d.product_id for d in dataset.iter_corpus("corpus_1")]
    corpus_2 = [d.product_id for d in dataset.iter_corpus("corpus_2")]
    assert len(corpus_1) == len(set(corpus_1)) and len(corpus_2) == len(set(corpus_2))
    assert set(corpus_1) == products["in_domain"] | products["novel_query"]
    assert set(corpus_2) == products["novel_document"] | products["zero_shot"]
    assert not set(corpus_1) & set(corpus_2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corpus_batches_cover_the_corpus_once(tiny: Path, manifest: dict, num_workers: int) -> None:
    dataset = open_dataset(tiny)
    bad = set(manifest["corrupt_products"]) | set(manifest["missing_products"])
    expected = [d.product_id for d in dataset.iter_corpus("corpus_1")]
    batches = list(corpus_batches(dataset, "corpus_1", transform=transform(train=False),
                                  tokenizer=tokenizer(), batch_size=50, num_workers=num_workers))  # fmt: skip
    seen = [p for b in batches for p in b["product_ids"]]
    assert sorted(seen) == sorted(set(expected) - bad)
    assert sum(b["skipped"] for b in batches) == len(bad) == 4
    for b in batches:
        assert b["images"].shape == (len(b["product_ids"]), 3, 32, 32)
        assert b["title_tokens"].shape[0] == len(b["product_ids"])
        assert b["doc_ids"].tolist() == [stable_id(p) for p in b["product_ids"]]


# ---------------------------------------------------------------------------- errors


def copy_split(
    tiny: Path, out: Path, split: str = "in_domain", change=None, **write_options
) -> Path:
    """The Hugging Face shards of ``split``, each table passed through ``change``."""
    (out / "data").mkdir(parents=True)
    for shard in sorted((tiny / "data").glob(f"{split}-*.parquet")):
        table = pq.read_table(shard)
        pq.write_table(
            change(table) if change else table,
            out / "data" / shard.name,
            row_group_size=64,
            **write_options,
        )
    return out


def test_a_loader_with_other_workers_is_refused(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as seen from DataLoader worker 0 of 2 (a real loader would hold its failed workers for 10 s)
    worker = SimpleNamespace(id=0, num_workers=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    with pytest.raises(DataError, match="built for num_workers=0 but the DataLoader has 2"):
        next(iter(make_stream(open_dataset(tiny))))


def test_errors_name_what_is_wrong(tiny: Path, tmp_path: Path) -> None:
    only_in_domain = open_dataset(copy_split(tiny, tmp_path / "one"))
    with pytest.raises(DataError, match=r"split 'zero_shot' is missing .*present: in_domain"):
        make_stream(only_in_domain, split="zero_shot")
    with pytest.raises(DataError, match="unknown split 'train'"):
        eval_queries(only_in_domain, "train")
    with pytest.raises(
        DataError, match=r"768 rows, too few for one batch of 300 on each of 3 rank"
    ):
        make_stream(only_in_domain, batch_size=300, world_size=3)
    with pytest.raises(DataError, match="start_batch 25 is past the epoch's 24 batches"):
        make_stream(only_in_domain, start_batch=25)
    no_title = copy_split(tiny, tmp_path / "no_title", change=lambda t: t.drop_columns(["title"]))
    with pytest.raises(DataError, match=r"in_domain-00000-of-00003.parquet has no column 'title'"):
        open_dataset(no_title)

    def set_score(value):
        return lambda t: t.set_column(t.schema.get_field_index("score_linear"), "score_linear",
                                      pa.array([value] + t["score_linear"].to_pylist()[1:]))  # fmt: skip

    with pytest.raises(
        DataError,
        match=r"00000-of-00003.parquet \(row group 0\): score_linear 0.0 is outside \(0, 100\]",
    ):
        open_dataset(copy_split(tiny, tmp_path / "zero", change=set_score(0)))  # parquet statistics
    unchecked = open_dataset(
        copy_split(tiny, tmp_path / "big", change=set_score(101), write_statistics=False)
    )
    with pytest.raises(
        DataError,
        match=r"in_domain-0000\d-of-00003.parquet \(row group 0\): score_linear 101.0 is outside",
    ):
        epoch(unchecked, window_batches=24)

    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    frame = split_frame(tiny, "in_domain")
    frame.drop(columns=["title"]).to_csv(csv_root / CSV_SPLIT_FILES["in_domain"], index=False)
    with pytest.raises(DataError, match=r"query_0_product_id_0.csv has no column 'title'"):
        open_dataset(csv_root)
    frame.assign(score_linear=frame["score_linear"] + 50).to_csv(
        csv_root / CSV_SPLIT_FILES["in_domain"], index=False
    )
    with pytest.raises(
        DataError, match=r"query_0_product_id_0.csv \(chunk 0\): score_linear 1\d\d.0 is outside"
    ):
        eval_queries(open_dataset(csv_root), "in_domain")
    with pytest.raises(DataError, match="corpus_1.json is missing"):
        list(open_dataset(csv_root).iter_corpus("corpus_1"))

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as error:
        open_dataset(stray)
    message = str(error.value)
    assert "data/<split>-*.parquet" in message and "query_0_product_id_0.csv" in message
    assert "found: notes.txt" in message
