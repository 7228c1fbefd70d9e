"""The reference trainer end to end on CPU: synthetic data -> train -> evaluate; exact resume;
two gloo ranks against one process; the command line."""

from __future__ import annotations

import csv
import json
import socket

import definition
import pytest
import torch

import gcl_ops
from reference_trainer.cli import main as cli
from reference_trainer.config import TrainConfig, build_config
from reference_trainer.evaluate import METRICS, evaluate_model
from reference_trainer.marqo import SPLITS, open_dataset
from reference_trainer.model import TINY_MODEL, create_model, load_trained
from reference_trainer.stream import TrainStream
from reference_trainer.synthetic import make_synthetic
from reference_trainer.train import MultiFieldStep, train


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("trainer") / "gs", layout="huggingface", seed=3)


def tiny(dataset_dir, out, **values) -> TrainConfig:
    defaults = dict(steps=6, batch_size=24, chunk_size=10, checkpoint_every=3, warmup_steps=2,
                    lr=2e-3, progress=False, seed=5, device="cpu")  # fmt: skip
    defaults.update(values)
    return TrainConfig(data=str(dataset_dir), out=str(out), **defaults).validate()


def weights_of(checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "model.pt", map_location="cpu")


def test_train_with_grad_cache_evaluate_and_resume_exactly(dataset_dir, tmp_path) -> None:
    full = train(tiny(dataset_dir, tmp_path / "full"))
    with (tmp_path / "full" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(0 < float(r["loss"]) < float("inf") for r in rows)
    assert (tmp_path / "full" / "curves.png").stat().st_size > 0
    middle = tmp_path / "full" / "checkpoints" / "step_000003"
    assert json.loads((middle / "meta.json").read_text())["step"] == 3

    # Resume in a fresh run directory from the middle checkpoint: bit-identical final weights.
    resumed = train(tiny(dataset_dir, tmp_path / "resumed", resume=str(middle)))
    want, got, before = weights_of(full), weights_of(resumed), weights_of(middle)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert any(not torch.equal(want[n], before[n]) for n in want), (
        "the last 3 steps changed nothing"
    )

    # Evaluate the trained model on all four splits.
    results = evaluate_model(load_trained(full), open_dataset(dataset_dir), max_queries=40,
                             top_k=200, batch_size=128, progress=False)  # fmt: skip
    assert set(results) == set(SPLITS)
    for split in SPLITS:
        for metric in METRICS:
            assert 0.0 <= results[split][metric] <= 1.0, (split, metric)
        assert results[split]["queries"] > 0


def test_resume_refuses_a_different_batch_size(dataset_dir, tmp_path) -> None:
    first = train(tiny(dataset_dir, tmp_path / "a", steps=2, checkpoint_every=0, chunk_size=None,
                       init_logit_scale=50.0))  # fmt: skip
    with (tmp_path / "a" / "log.csv").open() as f:
        scales = [float(row["logit_scale"]) for row in csv.DictReader(f)]
    # two AdamW steps of lr 2e-3 move log(scale) by at most ~4e-3 from log(50)
    assert all(abs(scale / 50.0 - 1) < 1e-2 for scale in scales), scales
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny(dataset_dir, tmp_path / "b", steps=4, batch_size=16, resume=str(first)))


def test_frozen_image_tower_stays_fixed(dataset_dir, tmp_path) -> None:
    torch.manual_seed(5)
    initial = create_model(TINY_MODEL).model.visual.state_dict()
    final = weights_of(train(tiny(dataset_dir, tmp_path / "f", steps=2, freeze="image")))
    for name, value in initial.items():
        assert torch.equal(final[f"visual.{name}"], value), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, values: dict) -> None:
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**values))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _concatenated_rank_batches(config: TrainConfig, world: int):
    """What ``world`` ranks of batch ``config.batch_size // world`` read, rank after rank."""
    bundle = create_model(config.model)
    dataset = open_dataset(config.data)
    streams = [
        TrainStream(
            dataset,
            batch_size=config.batch_size // world,
            transform=bundle.preprocess_train,
            tokenizer=bundle.tokenizer,
            seed=config.seed,
            rank=r,
            world_size=world,
            window_batches=config.window_batches,
        )  # fmt: skip
        for r in range(world)
    ]
    for position, parts in enumerate(zip(*streams), start=1):
        tensors = [
            key
            for key, value in parts[0].items()
            if isinstance(value, torch.Tensor) and value.dim()
        ]
        batch = {key: torch.cat([p[key] for p in parts]) for key in tensors}
        yield 0, position, {**batch, "skipped": sum(int(p["skipped"]) for p in parts)}


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_same_global_batches(dataset_dir, tmp_path) -> None:
    # Adam divides by the gradient's magnitude, which turns rounding noise in a gradient that is
    # zero in exact arithmetic (the attention key bias) into full-size steps; a large epsilon
    # makes the update proportional to the gradient, so the two runs are comparable.
    world, steps, adam = 2, 3, dict(eps=1.0, lr=0.05)
    ranked = tiny(dataset_dir, tmp_path / "ddp", steps=steps, batch_size=12, chunk_size=5,
                  checkpoint_every=0, **adam)  # fmt: skip
    torch.multiprocessing.spawn(
        _rank_worker, args=(world, _free_port(), ranked.to_dict()), nprocs=world, join=True
    )
    single = tiny(dataset_dir, tmp_path / "one", steps=steps, batch_size=24, chunk_size=10,
                  checkpoint_every=0, **adam)  # fmt: skip
    one = train(single, batches=_concatenated_rank_batches(single, world))
    got = weights_of(tmp_path / "ddp" / "checkpoints" / f"step_{steps:06d}")
    want = weights_of(one)
    torch.manual_seed(ranked.seed)
    start = create_model(TINY_MODEL).model.state_dict()
    for name in want:
        change = (want[name] - start[name]).norm()
        assert change > 0, f"{name} did not train"
        # What the ranks changed equals what the one process changed, to rounding.
        assert (got[name] - want[name]).norm() <= 1e-4 * change, name


def test_cli_train_eval_and_errors(dataset_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert cli(["train", "--data", str(dataset_dir), "--out", str(run), "steps=2", "batch_size=16",
                "progress=false", "warmup_steps=1"]) == 0  # fmt: skip
    checkpoint = run / "checkpoints" / "step_000002"
    assert cli(["eval", "--data", str(dataset_dir), "--checkpoint", str(checkpoint),
                "--max-queries", "10", "--top-k", "50", "--out", str(tmp_path / "res")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert all(split in out for split in ("in_domain", "zero_shot"))
    table = json.loads((tmp_path / "res.json").read_text())
    assert set(SPLITS) <= set(table)

    assert cli(["train", "--data", str(dataset_dir), "--out", str(run), "learning_rate=1"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    assert cli(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    # A second fresh run into a run directory with checkpoints is refused (resume or move).
    assert cli(["train", "--data", str(dataset_dir), "--out", str(run), "steps=2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # Resuming a finished run is a no-op that names its checkpoint.
    assert cli(["train", "--data", str(dataset_dir), "--out", str(run), "--resume", "latest",
                "steps=2", "batch_size=16", "progress=false", "warmup_steps=1"]) == 0  # fmt: skip
    assert str(checkpoint) in capsys.readouterr().out
    with (run / "log.csv").open() as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2"]


def test_config_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nweight_kind: piecewise\ndoc_gamma: [0.3, 0.7]\n")
    config = build_config(path, ["lr=0.002", "chunk_size=none"], data="d", out="o")
    assert (config.lr, config.weight_kind, config.doc_gamma, config.chunk_size) == (
        0.002,
        "piecewise",
        [0.3, 0.7],
        None,
    )
    with pytest.raises(ValueError, match="doc_gamma"):
        build_config(None, ["doc_gamma=0.3,0.3"], data="d", out="o")
    with pytest.raises(ValueError, match="weight_kind"):
        build_config(None, ["weight_kind=cubic"], data="d", out="o")
    (tmp_path / "bad.json").write_text('{"lr": 1, "colour": 2}')
    with pytest.raises(ValueError, match="colour"):
        build_config(tmp_path / "bad.json", [], data="d", out="o")
    # YAML reads 1e-3 as a string: parsed like the command line; wrong types are named.
    path.write_text("lr: 1e-3\nrenormalize: 'false'\nsteps: 10\n")
    config = build_config(path, [], data="d", out="o")
    assert (config.lr, config.renormalize, config.steps) == (1e-3, False, 10)
    path.write_text("steps: 10.5\n")
    with pytest.raises(ValueError, match="steps takes a int"):
        build_config(path, [], data="d", out="o")
    path.write_text("lr: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        build_config(path, [], data="d", out="o")
    with pytest.raises(ValueError, match="max_docs_per_query"):
        build_config(None, ["max_docs_per_query=0"], data="d", out="o")
    with pytest.raises(ValueError, match="init_logit_scale"):
        build_config(None, ["init_logit_scale=150", "max_logit_scale=100"], data="d", out="o")
    with pytest.raises(ValueError, match="loss_normalization"):
        build_config(None, ["loss_normalization=tokens"], data="d", out="o")


@pytest.mark.parametrize(
    "chunk_size, normalization", [(None, "pairs"), (5, "pairs"), (None, "weights"), (5, "weights")]
)
def test_the_step_weights_the_document_fields_as_configured(
    tmp_path, chunk_size, normalization
) -> None:
    # Unequal gammas (title 0.8, image 0.2): the step's loss is the multi-field definition's with
    # the fields in that order, with and without gradient caching, and not the reversed one's;
    # normalised by the sum of weights, it is the weighted mean sum_i w_i l_i / sum_i w_i.
    config = TrainConfig(data="unused", out=str(tmp_path), batch_size=12, chunk_size=chunk_size,
                         doc_gamma=[0.8, 0.2], loss_normalization=normalization,
                         device="cpu").validate()  # fmt: skip
    torch.manual_seed(0)
    bundle = create_model(TINY_MODEL)
    model = bundle.model.eval()  # (no dropout: the two computations see the same network)
    generator = torch.Generator().manual_seed(1)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    words = ["red", "blue", "shoe", "bag", "wool", "steel", "lamp", "tiny"]
    texts = [" ".join(words[(i * j) % 8] for j in range(1, 4)) for i in range(24)]
    batch = {
        "query_tokens": bundle.tokenizer(texts[:12]),
        "title_tokens": bundle.tokenizer(texts[12:]),
        "images": torch.randn(12, 3, size, size, generator=generator),
        "scores": torch.randint(1, 101, (12,), generator=generator).double(),
        "query_ids": torch.arange(12) // 2,  # pairs of rows share a query: masked duplicates
        "doc_ids": torch.arange(12),
    }
    step = MultiFieldStep(model, model, config, world=1)
    loss = step(batch, torch.amp.GradScaler("cpu", enabled=False))
    with torch.no_grad():
        query = model.encode_text(batch["query_tokens"])
        title, image = model.encode_text(batch["title_tokens"]), model.encode_image(batch["images"])
        weights = gcl_ops.score_to_weight(batch["scores"], config.weight_kind, s_max=config.s_max)
        if normalization == "weights":
            weights = weights * len(weights) / weights.sum()

        def expected(gamma):
            return definition.multi_field_loss(
                [query], [title, image], weights, model.logit_scale.exp(), [1.0], gamma,
                config.renormalize, query_ids=batch["query_ids"], doc_ids=batch["doc_ids"],
            )  # fmt: skip

        intended, reversed_ = float(expected([0.8, 0.2])), float(expected([0.2, 0.8]))
    assert float(loss) == pytest.approx(intended, rel=1e-5)
    assert abs(intended - reversed_) > 1e-3 * abs(intended)
