"""Multi-field GCL training: a text query against a product's title and image (paper Eq. 5).

The story of one run, top to bottom: set up (devices, ranks), data, model, optimiser, resume,
then the loop (batch -> weights -> loss -> step), logging and checkpoints, and the plot.

* Loss: ``gcl_ops.MultiFieldGCLLoss`` with the query text on the left and (title, image) on the
  right, pair weights ``gcl_ops.score_to_weight(score_linear, weight_kind)`` (``constant`` is the
  CLIP baseline), query and product ids so that in-batch duplicates are not negatives, and the
  learnable logit scale of open_clip, clamped to ``max_logit_scale`` after every step.
* Big batches: with ``chunk_size < batch_size`` a step runs ``gcl_ops.grad_cache.cached_step``
  (embed in chunks without activations, the loss on the whole batch, re-embed chunk by chunk).
* Multi-process (``torchrun``): DDP on the towers and the distributed loss (each rank holds its
  pairs; the loss is the global batch's). The logit scale is kept out of DDP and its gradient
  averaged by hand, since the loss (not a DDP forward) uses it.
* Resume: a checkpoint holds the model (a plain open_clip state dict, ``model.pt``), optimiser,
  scheduler, scaler, step, data position and random states (``state.pt``); continuing from it
  gives bit-identical weights to an uninterrupted run on the same machine and settings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import gcl_ops
from gcl_ops.grad_cache import cached_step, split_batch
from reference_trainer.config import TrainConfig
from reference_trainer.marqo import DataError, MarqoGS, open_dataset
from reference_trainer.model import ModelBundle, create_model, save_model, unwrap
from reference_trainer.stream import TrainStream, train_loader

LOG_FIELDS = ("step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "skipped_images")


# ----------------------------------------------------------------------------------- set-up
def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPUs."""
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def cosine_with_warmup(config: TrainConfig):
    """Multiplier of the peak learning rate at each step: linear warmup, cosine decay to min_lr."""
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; as open_clip, no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "logit_scale" in name or "ln" in name or "bias" in name
        (no_decay if exempt else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


# ------------------------------------------------------------------------------ checkpoints
def random_states() -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return states


def gather_random_states(world: int) -> list[dict[str, Any]]:
    """Every rank's random states, indexed by rank (each rank resumes from its own)."""
    if world == 1:
        return [random_states()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, random_states())
    return states


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(
    directory: Path, bundle: ModelBundle, training: dict[str, Any], config: TrainConfig
) -> Path:
    """``directory/model.pt`` (plain open_clip state dict), ``meta.json``, then ``state.pt``
    (written last and atomically: its presence marks a complete checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory / "model.pt", unwrap(bundle.model))
    meta = {"model": bundle.name, "step": training["step"], "config": config.to_dict()}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    partial = directory / "state.pt.partial"
    torch.save(training, partial)
    os.replace(partial, directory / "state.pt")
    return directory


#: Settings that fix the data order and the model: a resumed run must keep them.
RESUME_KEYS = ("seed", "batch_size", "num_workers", "window_batches", "max_docs_per_query",
               "split", "model", "freeze")  # fmt: skip


def find_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``resume`` itself, or the newest in ``out`` for 'latest'."""
    if config.resume is None:
        return None
    if config.resume != "latest":
        path = Path(config.resume)
        if not (path / "state.pt").is_file():
            raise ValueError(f"resume={path}: not a checkpoint directory (no state.pt)")
        return path
    found = [path.parent for path in (Path(config.out) / "checkpoints").glob("step_*/state.pt")]
    return max(found, key=lambda path: int(path.name.removeprefix("step_"))) if found else None


# ------------------------------------------------------------------------------------ data
def epoch_batches(
    dataset: MarqoGS, bundle: ModelBundle, config: TrainConfig, rank: int, world: int,
    epoch: int, start_batch: int,
) -> Iterator[tuple[int, int, dict[str, Any]]]:  # fmt: skip
    """(epoch, batches consumed in that epoch after this one, batch) forever, epoch after epoch;
    the first epoch starts at ``start_batch`` (resume)."""
    while True:
        stream = TrainStream(
            dataset, batch_size=config.batch_size, transform=bundle.preprocess_train,
            tokenizer=bundle.tokenizer, seed=config.seed, epoch=epoch, start_batch=start_batch,
            rank=rank, world_size=world, num_workers=config.num_workers,
            window_batches=config.window_batches, max_docs_per_query=config.max_docs_per_query,
            split=config.split,
        )  # fmt: skip
        position = start_batch
        for batch in train_loader(stream):
            position += 1
            yield epoch, position, batch
        epoch, start_batch = epoch + 1, 0


def trim_to_common_size(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Cut every rank's batch to the smallest one (a corrupt image shrinks a batch; the
    distributed loss needs the same number of pairs on every rank)."""
    size = torch.tensor([batch["scores"].shape[0]], device=device)
    if dist.is_initialized():
        dist.all_reduce(size, op=dist.ReduceOp.MIN)
    n = int(size)
    return {
        key: value[:n].to(device, non_blocking=True)
        if isinstance(value, torch.Tensor) and value.dim()
        else value
        for key, value in batch.items()
    }


# ------------------------------------------------------------------------------------ step
class MultiFieldStep:
    """Forward and backward of one batch: query text vs (title, image), multi-field GCL.

    With ``chunk_size < batch`` the encoders run under gradient caching; a frozen tower's fields
    are then embedded once without gradient and enter the loss as constants.
    """

    FIELDS = ("query_tokens", "title_tokens", "images")

    def __init__(
        self, model: torch.nn.Module, core: torch.nn.Module, config: TrainConfig, world: int
    ) -> None:
        self.model, self.core, self.config, self.world = model, core, config, world
        self.criterion = gcl_ops.MultiFieldGCLLoss(
            rhs_gamma=config.doc_gamma, renormalize=config.renormalize, impl=config.impl,
            distributed=world > 1, validate=False,  # no host syncs per step
            reduction="weighted_mean" if config.loss_normalization == "weights" else "mean",
        )  # fmt: skip
        self.encoders = [self.encode_text, self.encode_text, self.encode_image]
        self.frozen = {None: (), "text": (0, 1), "image": (2,)}[config.freeze]
        self.caching = config.chunk_size is not None and config.chunk_size < config.batch_size

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(text=tokens)[1]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(image=images)[0]

    def loss(self, embeddings: list[torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        query, title, image = embeddings
        config = self.config
        weights = gcl_ops.score_to_weight(batch["scores"], config.weight_kind, s_max=config.s_max)
        ids = (
            {"query_ids": batch["query_ids"], "doc_ids": batch["doc_ids"]}
            if config.mask_duplicates
            else {}
        )
        return self.criterion([query], [title, image], self.core.logit_scale.exp(), weights, **ids)

    def __call__(self, batch: dict[str, Any], scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Loss of the batch (detached); gradients accumulated in the parameters."""
        inputs = [batch[name] for name in self.FIELDS]
        if not self.caching:
            size = inputs[0].shape[0]
            image, text = self.model(image=inputs[2], text=torch.cat(inputs[:2]))[:2]
            loss = self.loss([text[:size], text[size:], image], batch)
            scaler.scale(loss).backward()
            return loss.detach()
        chunk = self.config.chunk_size
        with torch.no_grad():
            constant = {
                i: torch.cat([self.encoders[i](part) for part in split_batch(inputs[i], chunk)])
                for i in self.frozen
            }
        live = [i for i in range(3) if i not in constant]

        def live_loss(embeddings: list[torch.Tensor]) -> torch.Tensor:
            given = iter(embeddings)
            return self.loss(
                [constant[i] if i in constant else next(given) for i in range(3)], batch
            )

        return cached_step(
            [self.encoders[i] for i in live], [inputs[i] for i in live], live_loss, chunk,
            scaler=scaler, no_sync=self.model.no_sync if self.world > 1 else None,
        )  # fmt: skip


# ------------------------------------------------------------------------------------ train
def train(
    config: TrainConfig, batches: Iterator[tuple[int, int, dict[str, Any]]] | None = None
) -> Path:
    """Train as ``config`` says; returns the final checkpoint directory.

    ``batches`` replaces the data stream (``epoch_batches``): an iterator of ``(epoch, batches
    consumed in that epoch, batch)``, e.g. to feed one process the concatenated batches of
    several ranks in a test. The dataset directory is still opened and checked.
    """
    config.validate()
    rank, world, device = setup_distributed(config)
    is_main = rank == 0
    out = Path(config.out)
    if is_main:
        if config.resume is None and any((out / "checkpoints").glob("step_*")):
            raise ValueError(
                f"{out} already holds checkpoints: pass --resume latest, or another --out"
            )
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    # Data and model.
    dataset = open_dataset(config.data)
    bundle = create_model(
        config.model, pretrained=config.pretrained, device=device, freeze=config.freeze
    )
    core = bundle.model
    if config.init_logit_scale is not None:
        with torch.no_grad():
            core.logit_scale.fill_(math.log(config.init_logit_scale))
    if is_main:
        print(f"data: {dataset.describe()}")
        millions = sum(p.numel() for p in core.parameters()) / 1e6
        print(f"model: {config.model}, {millions:.2f}M parameters, device {device}, world {world}")

    # Optimiser, schedule, precision.
    optimizer = make_optimizer(core, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config))
    amp_dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 need no loss scaling

    # Resume: weights, optimiser, schedule, data position, random states.
    progress = {"step": 0, "epoch": 0, "position": 0, "skipped": 0}
    last_dir = None
    checkpoint = find_checkpoint(config)
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        now = {"world_size": world, **{key: getattr(config, key) for key in RESUME_KEYS}}
        for key, value in now.items():
            if state["settings"][key] != value:
                was = state["settings"][key]
                raise ValueError(
                    f"resume: the checkpoint was written with {key}={was!r}, now {value!r}"
                )
        core.load_state_dict(torch.load(checkpoint / "model.pt", map_location=device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = {key: state[key] for key in progress}
        last_dir = checkpoint
        set_random_states(state["random"][rank])
        if is_main:
            print(f"resumed from {checkpoint} at step {progress['step']} (epoch {progress['epoch']}, "
                  f"batch {progress['position']})")  # fmt: skip
    step, epoch, skipped = progress["step"], progress["epoch"], progress["skipped"]

    # Towers under DDP; the logit scale outside it (the loss, not a DDP forward, uses it).
    model: torch.nn.Module = core
    forward_backward = MultiFieldStep(model, core, config, world)
    if world > 1:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            core, ["logit_scale"]
        )
        model = forward_backward.model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=forward_backward.caching,  # a cached step embeds one tower at a time
            broadcast_buffers=False,  # open_clip's buffers (attention masks) never change
        )  # fmt: skip

    # The loop.
    log_path = out / "log.csv"
    if is_main:  # a resumed run keeps the rows up to its checkpoint
        kept = []
        if checkpoint is not None and log_path.exists():
            with log_path.open() as f:
                kept = [row for row in list(csv.reader(f))[1:] if int(row[0]) <= step]
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerows([LOG_FIELDS, *kept])
    if batches is None:
        batches = epoch_batches(dataset, bundle, config, rank, world, epoch, progress["position"])
    bar = tqdm(
        total=config.steps, initial=step, disable=not (is_main and config.progress), desc="train"
    )
    model.train()
    empty_in_a_row = 0
    while step < config.steps:
        started = time.perf_counter()
        new_epoch, position, batch = next(batches)
        if new_epoch != epoch and is_main:
            print(f"epoch {epoch} done: {skipped} corrupt or missing images skipped so far")
        epoch = new_epoch
        batch = trim_to_common_size(batch, device)
        skipped += int(batch["skipped"])
        size = batch["scores"].shape[0]
        if size == 0:  # every image of some rank's batch was bad: no step
            empty_in_a_row += 1
            if empty_in_a_row >= 100:
                raise DataError(
                    f"100 batches in a row had no readable image ({skipped} skipped): check the images"
                )
            continue
        empty_in_a_row = 0
        with (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        ):
            loss = forward_backward(batch, scaler)
        if world > 1 and core.logit_scale.grad is not None:
            dist.all_reduce(core.logit_scale.grad)
            core.logit_scale.grad /= world
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(core.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        with torch.no_grad():
            core.logit_scale.clamp_(0, math.log(config.max_logit_scale))
        step += 1
        bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            loss = loss.float()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            scale = core.logit_scale.detach().exp().item()
            if is_main:
                row = (step, epoch, f"{loss.item():.6f}", f"{lr:.6g}", f"{scale:.4f}",
                       f"{size * world / (time.perf_counter() - started):.1f}", skipped)  # fmt: skip
                with log_path.open("a", newline="") as f:
                    csv.writer(f).writerow(row)
                bar.set_postfix(loss=f"{loss.item():.4f}", scale=f"{scale:.1f}")
        if step == config.steps or (
            config.checkpoint_every and step % config.checkpoint_every == 0
        ):
            training = {
                "step": step, "epoch": epoch, "position": position, "skipped": skipped,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "random": gather_random_states(world),
                "settings": {"world_size": world, **{key: getattr(config, key) for key in RESUME_KEYS}},
            }  # fmt: skip
            last_dir = out / "checkpoints" / f"step_{step:06d}"
            if is_main:
                save_checkpoint(last_dir, bundle, training, config)
            if world > 1:
                dist.barrier()
    bar.close()
    if is_main:
        print(
            f"done: {step} steps, {skipped} corrupt or missing images skipped; checkpoint {last_dir}"
        )
        plot_curves(log_path, out / "curves.png")
    if world > 1:
        dist.destroy_process_group()
    return last_dir


def plot_curves(log_path: Path, png: Path) -> Path:
    """Loss, logit scale, learning rate and throughput against the step, from ``log.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_path.open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, label in zip(axes, ("loss", "logit_scale", "lr", "samples_per_s"),
                              ("training loss", "logit scale", "learning rate", "samples / s")):  # fmt: skip
        ax.plot(steps, [float(r[key]) for r in rows])
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{log_path.parent.name}: multi-field GCL training")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
