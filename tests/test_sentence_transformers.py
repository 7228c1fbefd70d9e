"""The sentence-transformers integration (gcl_ops.sentence_transformers) on a tiny BERT built
offline: a 2-layer, 32-wide BertConfig and a word-piece vocabulary written by the test; nothing is
downloaded. Needs the ``st`` extra (a test dependency).

The model runs in float64 (the CPU path of gcl_ops), so the comparisons with
sentence-transformers' own losses and between code paths are tight.
"""

from __future__ import annotations

import os

# Nothing may be downloaded: the hub is never contacted (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: E402

import gcl_ops  # noqa: E402
from gcl_ops.sentence_transformers import (  # noqa: E402
    CachedGCLLoss,
    GCLLoss,
    duplicate_ids,
    text_groups,
)

# fmt: off
WORDS = [
    "the", "a", "red", "blue", "green", "small", "large", "old", "new", "fast", "slow", "cat",
    "dog", "bird", "fish", "tree", "house", "car", "road", "river", "book", "lamp", "chair",
    "table", "apple", "bread", "water", "stone", "cloud", "light", "sat", "ran", "flew", "swam",
    "grew", "stood", "on", "under", "near", "over", "with",
]
# fmt: on
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WIDTH = 32


# ----------------------------------------------------------------------------------------------
# The tiny model, data and helpers
# ----------------------------------------------------------------------------------------------


def build_model_dir(path: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, 2 heads, no dropout) and a word-piece
    tokenizer from a vocabulary file, saved under ``path`` for ``Transformer`` to load."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(path))
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=WIDTH, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def load_model(model_dir: Path, dtype: torch.dtype = torch.float64) -> SentenceTransformer:
    """Transformer + mean Pooling from ``model_dir``: the same weights on every call."""
    transformer = Transformer(str(model_dir), max_seq_length=32)
    model = SentenceTransformer(modules=[transformer, Pooling(WIDTH, "mean")], device="cpu")
    return model.to(dtype)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny_bert"))


def sentences(n: int, seed: int, lengths: tuple[int, int] = (2, 7)) -> list[str]:
    """``n`` distinct lower-case sentences from the vocabulary (so decoding round-trips)."""
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    while len(out) < n:
        length = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=generator))
        words = torch.randint(0, len(WORDS), (length,), generator=generator)
        text = " ".join(WORDS[int(i)] for i in words)
        if text not in out:
            out.append(text)
    return out


def features(model: SentenceTransformer, *columns: list[str]) -> list[dict]:
    return [model.preprocess(column) for column in columns]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros where none reached it, e.g. BERT's unused pooler)."""
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


def run_loss(loss_fn, model, batch, labels, upstream: float = 1.0):
    """Loss value and every model parameter's gradient of ``upstream * loss``."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(batch, labels)
    (loss * upstream).backward()
    return loss.detach(), gradients(model)


def assert_same_gradients(
    got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-12, slack: float = 0.0
) -> None:
    """Equal gradients, each within ``rtol`` and ``atol + slack * max |want|`` (``slack``: for
    fp32, where entries that cancel carry rounding relative to the tensor's scale)."""
    assert got.keys() == want.keys()
    for name in want:
        bound = atol + slack * float(want[name].abs().max())
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=bound, msg=lambda m, name=name: f"{name}: {m}"
        )


def embed(model, batch) -> list[torch.Tensor]:
    return [model(dict(f))["sentence_embedding"] for f in batch]


# ----------------------------------------------------------------------------------------------
# Against sentence-transformers' MultipleNegativesRankingLoss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_from", ["none", "weight", "score"])
def test_unit_weights_equal_symmetric_mnrl(model_dir, weights_from: str) -> None:
    # Weights 1 (no column; a weight column of ones; scores through the constant weight), no
    # duplicates, the same scale: the loss and every parameter's gradient are those of the
    # symmetric MultipleNegativesRankingLoss.
    model = load_model(model_dir)
    batch = features(model, sentences(10, seed=1), sentences(10, seed=2))
    labels = {
        "none": None,
        "weight": torch.ones(10),
        "score": torch.randint(1, 101, (10,), generator=torch.Generator().manual_seed(0)),
    }[weights_from]
    gcl = GCLLoss(model, scale=20.0, weights_from=weights_from, weight_kind="constant")
    mnrl = MultipleNegativesRankingLoss(
        model,
        scale=20.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
    )
    got_loss, got_grads = run_loss(gcl, model, batch, labels)
    want_loss, want_grads = run_loss(mnrl, model, batch, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got_grads, want_grads)
    assert any(g.abs().max() > 0 for g in want_grads.values())


SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")


@pytest.mark.parametrize("negative_columns", [1, 3])
def test_hard_negatives_equal_symmetric_mnrl_and_cmnrl(model_dir, negative_columns: int) -> None:
    # (anchor, positive, negative_1 .. negative_n), weights 1 through a constant-weighted score
    # column: loss and every parameter gradient equal MNRL's and CMNRL's with the same negatives.
    model = load_model(model_dir)
    columns = [sentences(9, seed=20 + c) for c in range(2 + negative_columns)]
    batch = features(model, *columns)
    scores = torch.randint(1, 101, (9,), generator=torch.Generator().manual_seed(4))
    want, want_grads = run_loss(
        MultipleNegativesRankingLoss(model, scale=20.0, **SYMMETRIC), model, batch, scores
    )
    got, got_grads = run_loss(
        GCLLoss(model, scale=20.0, weight_kind="constant"), model, batch, scores
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got_grads, want_grads)
    # Without the negatives it is another loss (they are not ignored).
    pairs_only = GCLLoss(model, weights_from="none")(batch[:2], None)
    assert abs(float(pairs_only.detach() - want)) > 1e-3

    cmnrl = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=4, **SYMMETRIC)
    want_cached, want_cached_grads = run_loss(cmnrl, model, batch, scores)
    cached = CachedGCLLoss(model, scale=20.0, weights_from="none", mini_batch_size=4)
    got_cached, got_cached_grads = run_loss(cached, model, batch, None)
    torch.testing.assert_close(want_cached, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_cached, want_cached, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got_cached_grads, want_cached_grads)


def test_graded_hard_negatives_equal_gcl_loss(model_dir) -> None:
    # Scores weight the pairs; the negatives join every anchor's row; the weighted mean divides
    # by the sum of the weights.
    model = load_model(model_dir)
    batch = features(model, sentences(6, seed=30), sentences(6, seed=31), sentences(6, seed=32))
    scores = torch.tensor([100, 90, 75, 40, 20, 5])
    weights = gcl_ops.score_to_weight(scores, "inverse", s_max=100.0)
    query, doc, negative = embed(model, batch)
    for reduction in ("mean", "weighted_mean"):
        loss = GCLLoss(model, reduction=reduction)(batch, scores)
        want = gcl_ops.gcl_loss(query, doc, weights, 20.0, negatives=negative, reduction=reduction)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_graded_weights_differ_from_mnrl_and_equal_gcl_loss(model_dir) -> None:
    model = load_model(model_dir)
    batch = features(model, sentences(8, seed=3), sentences(8, seed=4))
    scores = torch.tensor([100, 90, 75, 60, 40, 20, 5, 1])
    loss = GCLLoss(model, weight_kind="inverse")(batch, scores)
    query, doc = embed(model, batch)
    want = gcl_ops.gcl_loss(
        query, doc, gcl_ops.score_to_weight(scores, "inverse", s_max=100.0), 20.0
    )
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    mnrl = MultipleNegativesRankingLoss(
        model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    )(batch, None)
    assert not torch.allclose(loss, mnrl)
    # A column used as the weights directly.
    weights = torch.rand(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    loss = GCLLoss(model, weights_from="weight")(batch, weights)
    torch.testing.assert_close(loss, gcl_ops.gcl_loss(query, doc, weights, 20.0))


# ----------------------------------------------------------------------------------------------
# In-batch duplicates
# ----------------------------------------------------------------------------------------------


def test_repeated_query_and_document_are_masked(model_dir) -> None:
    model = load_model(model_dir)
    queries, docs = sentences(8, seed=5), sentences(8, seed=6)
    queries[5] = queries[1]  # one query with two documents
    docs[6] = docs[2]  # one document for two queries
    batch = features(model, queries, docs)
    scores = torch.tensor([100, 80, 60, 95, 30, 70, 50, 10])
    query_ids = torch.tensor([0, 1, 2, 3, 4, 1, 6, 7])
    doc_ids = torch.tensor([0, 1, 2, 3, 4, 5, 2, 7])
    weights = gcl_ops.score_to_weight(scores, "inverse", s_max=100.0)

    masked, masked_grads = run_loss(GCLLoss(model), model, batch, scores)
    query, doc = embed(model, batch)
    model.zero_grad(set_to_none=True)
    want = gcl_ops.gcl_loss(query, doc, weights, 20.0, query_ids=query_ids, doc_ids=doc_ids)
    want.backward()
    torch.testing.assert_close(masked, want.detach(), rtol=1e-12, atol=1e-12)
    assert_same_gradients(masked_grads, gradients(model))

    unmasked, _ = run_loss(GCLLoss(model, mask_duplicates=False), model, batch, scores)
    assert abs(float(masked - unmasked)) > 1e-4
    # The cached loss masks the same pairs.
    cached, cached_grads = run_loss(CachedGCLLoss(model, mini_batch_size=3), model, batch, scores)
    torch.testing.assert_close(cached, masked, rtol=1e-12, atol=1e-12)
    assert_same_gradients(cached_grads, masked_grads)


def test_duplicate_ids_hash_texts_not_padding(model_dir) -> None:
    model = load_model(model_dir)
    texts = ["red cat", "the old house near the river", "red cat", "red", "cat red"]
    ids = duplicate_ids(model.preprocess(texts))
    assert ids.dtype == torch.int64 and ids.shape == (5,)
    assert ids[0] == ids[2]
    assert len(set(ids.tolist())) == 4  # "red", "cat red" and "red cat" all differ
    # The same text padded to other lengths (right or left) or flattened without padding.
    alone = duplicate_ids(model.preprocess(["red cat"]))
    assert alone[0] == ids[0]
    padded = model.preprocess(texts)
    input_ids, mask = padded["input_ids"], padded["attention_mask"]
    lengths = mask.sum(dim=1)
    left_ids, left_mask = torch.zeros_like(input_ids), torch.zeros_like(mask)
    for row, length in enumerate(lengths.tolist()):
        left_ids[row, -length:] = input_ids[row, :length]
        left_mask[row, -length:] = 1
    assert torch.equal(duplicate_ids({"input_ids": left_ids, "attention_mask": left_mask}), ids)
    flat = {
        "input_ids": input_ids[mask.bool()][None],
        "cu_seq_lens_q": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    }
    assert torch.equal(duplicate_ids(flat), ids)
    with pytest.raises(ValueError, match="mask_duplicates=False"):
        duplicate_ids({"pixel_values": torch.zeros(2, 3)})


def test_duplicate_ids_are_exact_integer_hashes() -> None:
    # int64 arithmetic without overflow: the same as Python integers, for large token ids and
    # positions too.
    from gcl_ops.sentence_transformers import _BASES, _MODULI

    generator = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, 2**40, (3, 300), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 150:] = 0
    got = duplicate_ids({"input_ids": input_ids, "attention_mask": mask})
    for row in range(3):
        tokens = input_ids[row][mask[row].bool()].tolist()
        parts = [
            sum((t % m + 1) * pow(b, j, m) for j, t in enumerate(tokens)) % m
            for b, m in zip(_BASES, _MODULI)
        ]
        assert int(got[row]) == parts[0] * _MODULI[1] + parts[1]


def test_text_groups_join_rows_sharing_any_text() -> None:
    # Rows 0-1 share a text across columns (anchor 1 = positive 0), rows 1-2 share positive
    # texts (a chain: 0, 1, 2 are one group); row 3 is alone. Negatives: text 5 is row 3's
    # anchor, text 99 is in no row.
    anchor = torch.tensor([10, 20, 30, 5])
    positive = torch.tensor([20, 40, 40, 6])
    group, negative_ids = text_groups(anchor, positive, torch.tensor([5, 99, 30]))
    assert group.tolist() == [10, 10, 10, 5]
    assert negative_ids.tolist() == [5, 99, 10]


@pytest.mark.parametrize("seed", range(20))
def test_text_groups_equal_union_find(seed: int) -> None:
    # Random small batches with many repeated texts: the groups are the connected components of
    # "shares a text", each named by its smallest text id; a negative gets its text's group.
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 30, (), generator=generator))
    anchor, positive = (torch.randint(0, 20, (n,), generator=generator) for _ in range(2))
    negatives = torch.randint(0, 25, (7,), generator=generator)
    parent = list(range(n))

    def root(row: int) -> int:
        while parent[row] != row:
            row = parent[row]
        return row

    texts = [{int(anchor[i]), int(positive[i])} for i in range(n)]
    for i in range(n):
        for j in range(i):
            if texts[i] & texts[j]:
                parent[root(i)] = root(j)
    want = [min(min(texts[j]) for j in range(n) if root(j) == root(i)) for i in range(n)]
    group, negative_ids = text_groups(anchor, positive, negatives)
    assert group.tolist() == want
    for text, got in zip(negatives.tolist(), negative_ids.tolist()):
        holders = [i for i in range(n) if text in texts[i]]
        assert got == (want[holders[0]] if holders else text)


def test_a_text_repeated_across_columns_is_masked(model_dir) -> None:
    # A[1], P[1] = P[0], A[0] (symmetric tasks): with the default one id space the two rows are
    # not each other's negatives (no cosine-1 negative); a hard negative equal to row 3's anchor
    # is not row 3's negative. Per column, both stay negatives.
    model = load_model(model_dir)
    anchors, positives, negatives = sentences(6, 40), sentences(6, 41), sentences(6, 42)
    anchors[1], positives[1] = positives[0], anchors[0]
    negatives[4] = anchors[3]
    batch = features(model, anchors, positives, negatives)
    scores = torch.tensor([100, 90, 75, 40, 20, 5])
    weights = gcl_ops.score_to_weight(scores, "inverse", s_max=100.0)

    masked, masked_grads = run_loss(GCLLoss(model), model, batch, scores)
    query, doc, negative = embed(model, batch)
    model.zero_grad(set_to_none=True)
    groups = torch.tensor([0, 0, 2, 3, 4, 5])
    want = gcl_ops.gcl_loss(
        query, doc, weights, 20.0, query_ids=groups, doc_ids=groups, negatives=negative,
        negative_ids=torch.tensor([10, 11, 12, 13, 3, 15]),
    )  # fmt: skip
    want.backward()
    torch.testing.assert_close(masked, want.detach(), rtol=1e-12, atol=1e-12)
    assert_same_gradients(masked_grads, gradients(model))
    cached, cached_grads = run_loss(CachedGCLLoss(model, mini_batch_size=4), model, batch, scores)
    torch.testing.assert_close(cached, masked, rtol=1e-12, atol=1e-12)
    assert_same_gradients(cached_grads, masked_grads)

    per_column = GCLLoss(model, mask_duplicates="per_column")(batch, scores)
    unmasked = GCLLoss(model, mask_duplicates=False)(batch, scores)
    torch.testing.assert_close(per_column, unmasked, rtol=1e-12, atol=1e-12)
    assert float((unmasked - masked).detach()) > 1e-3  # the cosine-1 negatives cost loss


# ----------------------------------------------------------------------------------------------
# Gradient caching
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mini_batch_size", [4, 5, 64])  # divides 12, does not, exceeds it
def test_cached_equals_uncached(model_dir, mini_batch_size: int) -> None:
    # Scores as weights, a repeated query and a learnable scale; the backward is scaled as AMP
    # and gradient accumulation scale it: the scale's gradient must follow.
    model = load_model(model_dir)
    queries, docs = sentences(12, seed=7), sentences(12, seed=8)
    queries[9] = queries[4]
    batch = features(model, queries, docs)
    scores = torch.randint(1, 101, (12,), generator=torch.Generator().manual_seed(2))
    options = dict(scale=12.0, weight_kind="piecewise", learnable_scale=True)
    plain = GCLLoss(model, **options)
    cached = CachedGCLLoss(model, mini_batch_size=mini_batch_size, **options)
    want, want_grads = run_loss(plain, model, batch, scores, upstream=0.25)
    got, got_grads = run_loss(cached, model, batch, scores, upstream=0.25)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got_grads, want_grads)
    torch.testing.assert_close(
        cached.log_scale.grad, plain.log_scale.grad, rtol=1e-6, atol=0.0
    )  # fp32
    assert float(plain.log_scale.grad.abs()) > 0
    # Without gradients (evaluation) the cached loss is the same value.
    with torch.no_grad():
        torch.testing.assert_close(cached(batch, scores), want, rtol=1e-12, atol=1e-12)


def test_cached_under_matryoshka(model_dir) -> None:
    model = load_model(model_dir)
    batch = features(model, sentences(10, seed=9), sentences(10, seed=10))
    scores = torch.randint(1, 101, (10,), generator=torch.Generator().manual_seed(3))
    dims, dim_weights = [32, 16, 8], [1.0, 0.5, 0.25]
    options = dict(weight_kind="inverse", learnable_scale=True)
    plain = GCLLoss(model, **options)
    cached = CachedGCLLoss(model, mini_batch_size=3, **options)
    want, want_grads = run_loss(
        MatryoshkaLoss(model, plain, dims, dim_weights), model, batch, scores
    )
    got, got_grads = run_loss(
        MatryoshkaLoss(model, cached, dims, dim_weights), model, batch, scores
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_same_gradients(got_grads, want_grads)
    # log_scale is fp32: the dimensions' shares are summed in another order.
    torch.testing.assert_close(cached.log_scale.grad, plain.log_scale.grad, rtol=1e-6, atol=0.0)
    # The Matryoshka sum is not the full-width loss alone.
    with torch.no_grad():
        assert abs(float(want - GCLLoss(model, **options)(batch, scores))) > 1e-3


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class RecordingGCLLoss(GCLLoss):
    """GCLLoss that keeps what the trainer passed and what it returned."""

    def __init__(self, model, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.calls: list[dict] = []

    def forward(self, sentence_features, labels=None):
        sentence_features = list(sentence_features)
        self.calls.append(
            {
                "input_ids": sentence_features[0]["input_ids"].clone(),
                "columns": len(sentence_features),
            }
        )
        return super().forward(sentence_features, labels)

    def compute_loss_from_embeddings(self, embeddings, labels, ids=(None, None, None)):
        loss = super().compute_loss_from_embeddings(embeddings, labels, ids)
        self.calls[-1].update(
            query=embeddings[0].detach(), doc=embeddings[1].detach(), labels=labels,
            loss=loss.detach(),
        )  # fmt: skip
        return loss


@pytest.mark.slow
def test_trainer_passes_scores_to_the_loss(model_dir, tmp_path) -> None:
    import datasets
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    model = load_model(model_dir, torch.float32)
    queries, docs = sentences(16, seed=11), sentences(16, seed=12)
    scores = [
        int(s) for s in torch.randint(1, 101, (16,), generator=torch.Generator().manual_seed(4))
    ]
    score_of = dict(zip(queries, scores))
    dataset = datasets.Dataset.from_dict({"query": queries, "document": docs, "score": scores})
    loss = RecordingGCLLoss(model, weight_kind="inverse", s_max=100.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()

    tokenizer = model[0].tokenizer
    assert len(loss.calls) == 3
    for call in loss.calls:
        # The labels are the score column of exactly the rows in the batch ...
        texts = tokenizer.batch_decode(call["input_ids"], skip_special_tokens=True)
        assert call["labels"].tolist() == [score_of[text] for text in texts]
        # ... and the loss is gcl_loss with score_to_weight of them.
        weights = gcl_ops.score_to_weight(call["labels"], "inverse", s_max=100.0)
        want = gcl_ops.gcl_loss(call["query"], call["doc"], weights, 20.0)
        torch.testing.assert_close(call["loss"], want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    # The model card names the loss, its configuration and the GCL paper.
    model.save(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "RecordingGCLLoss" in card and "2404.08535" in card
    assert '"weights_from": "score"' in card and '"weight_kind": "inverse"' in card


# ----------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------


def without_pooler(model: SentenceTransformer) -> SentenceTransformer:
    """Drop BERT's pooler, which mean pooling never uses: DDP without find_unused_parameters
    needs every parameter to get a gradient."""
    for module in model.modules():
        if getattr(module, "pooler", None) is not None:
            module.pooler = None
    return model


def distributed_case(world: int, n_local: int) -> dict:
    """A global batch with a query and a document repeated across ranks, and a hard negative
    column with a negative that is another rank's anchor."""
    queries, docs = sentences(world * n_local, seed=13), sentences(world * n_local, seed=14)
    negatives = sentences(world * n_local, seed=15)
    queries[n_local + 2] = queries[1]  # rank 1 repeats rank 0's query
    docs[3] = docs[n_local]  # rank 0 repeats rank 1's document
    negatives[n_local + 1] = queries[0]  # rank 1 holds rank 0's anchor as a negative
    scores = torch.randint(1, 101, (world * n_local,), generator=torch.Generator().manual_seed(5))
    return {
        "queries": queries, "docs": docs, "negatives": negatives, "scores": scores,
        "n_local": n_local,
    }  # fmt: skip


def distributed_worker(rank: int, world: int, store: str, out: str, case: dict) -> None:
    """Rank ``rank``'s slice through DDP and both losses with ``gather_across_devices=True``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = without_pooler(load_model(Path(case["model_dir"])))
        # GCLLoss embeds each column in its own forward (as sentence-transformers' own
        # MultipleNegativesRankingLoss does); DDP refuses two forwards before one backward with
        # find_unused_parameters=True (the trainer's default for SentenceTransformer models):
        # "Expected to mark a variable ready only once". CachedGCLLoss works with either.
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        rows = slice(rank * case["n_local"], (rank + 1) * case["n_local"])
        batch = features(model, case["queries"][rows], case["docs"][rows], case["negatives"][rows])
        results = {}
        for name, loss_fn in [
            ("plain", GCLLoss(ddp, gather_across_devices=True, learnable_scale=True)),
            ("cached", CachedGCLLoss(ddp, gather_across_devices=True, learnable_scale=True,
                                     mini_batch_size=2)),
        ]:  # fmt: skip
            loss, grads = run_loss(loss_fn, ddp, batch, case["scores"][rows])
            results[name] = {
                "loss": loss, "scale_grad": loss_fn.log_scale.grad.clone(),
                "grads": {n.removeprefix("module."): g for n, g in grads.items()},
            }  # fmt: skip
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, tmp_path: Path, case: dict) -> list[dict]:
    """``world`` gloo ranks of ``worker`` (as tests/distributed_workers.run); what each saved."""
    out = tmp_path / "out"
    out.mkdir()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(
        worker, args=(world, str(tmp_path / "store"), str(out), case), nprocs=world, join=True
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_gather_equal_one_process(model_dir, tmp_path) -> None:
    world, n_local = 2, 5
    case = {**distributed_case(world, n_local), "model_dir": str(model_dir)}
    ranks = spawn(distributed_worker, world, tmp_path, case)

    model = without_pooler(load_model(model_dir))
    batch = features(model, case["queries"], case["docs"], case["negatives"])
    single = GCLLoss(model, learnable_scale=True)
    want, want_grads = run_loss(single, model, batch, case["scores"])
    with torch.no_grad():
        unmasked = GCLLoss(model, mask_duplicates=False)(batch, case["scores"])
    assert abs(float(want - unmasked)) > 1e-4  # the cross-rank duplicates matter
    for name in ("plain", "cached"):
        # The mean over ranks is the global loss; DDP's average gives the global gradients; the
        # scale's gradient, outside DDP, is averaged by the loss.
        got = torch.stack([r[name]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for r in ranks:
            assert_same_gradients(r[name]["grads"], want_grads, rtol=1e-8, atol=1e-11)
            torch.testing.assert_close(  # log_scale is fp32: two ranks' shares, summed
                r[name]["scale_grad"], single.log_scale.grad, rtol=1e-5, atol=1e-7
            )


# ----------------------------------------------------------------------------------------------
# Backends, configuration, errors, import
# ----------------------------------------------------------------------------------------------


def test_triton_kernels_match_the_torch_path(model_dir) -> None:
    # The fused kernels (compiled on a GPU, under the Triton interpreter on a CPU) through the
    # loss, in fp32, with duplicates.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, torch.float32).to(device)
    queries, docs = sentences(6, seed=15), sentences(6, seed=16)
    queries[4] = queries[0]
    batch = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()}
             for f in features(model, queries, docs)]  # fmt: skip
    scores = torch.tensor([100, 50, 20, 80, 60, 5], device=device)
    want, want_grads = run_loss(GCLLoss(model, impl="torch"), model, batch, scores)
    got, got_grads = run_loss(GCLLoss(model, impl="triton"), model, batch, scores)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_gradients(got_grads, want_grads, rtol=1e-4, atol=1e-7, slack=1e-3)


def test_config_and_citation(model_dir) -> None:
    model = load_model(model_dir)
    loss = CachedGCLLoss(model, scale=30.0, weight_kind="piecewise", mini_batch_size=16)
    assert loss.get_config_dict() == {
        "scale": 30.0, "learnable_scale": False, "weights_from": "score",
        "weight_kind": "piecewise", "s_max": 100.0, "reduction": "mean",
        "mask_duplicates": "all_columns",
        "gather_across_devices": False, "impl": "auto", "mini_batch_size": 16,
        "mini_batch_num_tokens": None,
    }  # fmt: skip
    assert "2404.08535" in loss.citation and "2101.06983" in loss.citation
    learnable = GCLLoss(model, scale=20.0, weights_from="none", learnable_scale=True)
    assert [n for n, _ in learnable.named_parameters() if not n.startswith("model.")] == [
        "log_scale"
    ]
    assert math.isclose(learnable.scale, 20.0, rel_tol=1e-6)  # log_scale is fp32
    assert math.isclose(learnable.temperature, 0.05, rel_tol=1e-6)
    assert "weight_kind" not in learnable.get_config_dict()


def test_errors(model_dir) -> None:
    model = load_model(model_dir)
    pairs = features(model, sentences(4, seed=17), sentences(4, seed=18))
    with pytest.raises(ValueError, match="1 text column"):
        GCLLoss(model)(pairs[:1], torch.full((4,), 50))
    with pytest.raises(ValueError, match="1 text column"):
        CachedGCLLoss(model)(pairs[:1], torch.full((4,), 50))
    with pytest.raises(TypeError, match="score column must be numeric"):
        GCLLoss(model)(pairs, ["high", "low", "high", "low"])
    with pytest.raises(TypeError, match="score column must be numeric"):
        GCLLoss(model)(pairs, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_duplicates"):
        GCLLoss(model, mask_duplicates="rows")
    with pytest.raises(ValueError, match="reduction"):
        GCLLoss(model, reduction="sum")
    with pytest.raises(TypeError, match="positional"):
        GCLLoss(model, 20.0)  # options are keyword-only
    negatives = features(model, sentences(3, seed=19))  # a negative column of the wrong length
    with pytest.raises(ValueError, match=r"negative column 1 has 3 rows, expected one per"):
        GCLLoss(model)(pairs + negatives, torch.full((4,), 50))
    with pytest.raises(ValueError, match="needs a numeric 'score' or 'label' column"):
        GCLLoss(model)(pairs, None)
    with pytest.raises(ValueError, match=r"scores must lie in \(0, s_max=10.0\]"):
        GCLLoss(model, s_max=10.0)(pairs, torch.tensor([1, 5, 10, 11]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        GCLLoss(model)(pairs, torch.ones(4, 3))
    with pytest.raises(ValueError, match="weights_from"):
        GCLLoss(model, weights_from="scores")
    with pytest.raises(ValueError, match="kind"):
        GCLLoss(model, weight_kind="log")
    with pytest.raises(ValueError, match="max_scale"):
        GCLLoss(model, scale=200.0, learnable_scale=True)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedGCLLoss(model, mini_batch_size=0)


def test_import_gcl_ops_does_not_import_sentence_transformers() -> None:
    code = "import sys, gcl_ops; sys.exit('sentence_transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_scores_far_below_s_max_warn_once(model_dir) -> None:
    # Scores in (0, 1] with s_max=100: inverse weights 100 / (101 - s) all lie in [0.99, 1.0].
    model = load_model(model_dir)
    scores = torch.tensor([0.2, 0.5, 1.0, 0.9], dtype=torch.float64)
    loss = GCLLoss(model, weight_kind="inverse", s_max=100.0)
    with pytest.warns(UserWarning, match=r"s_max=100") as record:
        weights = loss.pair_weights(scores, 4)
    assert len(record) == 1
    assert float(weights.max() - weights.min()) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loss
        loss.pair_weights(scores, 4)
        # Scores on the scale of s_max, and linear weights (which keep the ratios), do not warn.
        GCLLoss(model, weight_kind="inverse", s_max=1.0).pair_weights(scores, 4)
        GCLLoss(model, weight_kind="linear", s_max=100.0).pair_weights(scores, 4)
        GCLLoss(model, weight_kind="inverse").pair_weights(scores * 100, 4)
