"""GCLLoss / CachedGCLLoss against sentence-transformers' MultipleNegativesRankingLoss /
CachedMultipleNegativesRankingLoss: time per training step and peak memory at large batches,
pairs or rows with hard negatives (gradient caching: mini-batches of 64).

    python benchmarks/bench_sentence_transformers.py        # CPU: 1024 and 4096 pairs, cached
    python benchmarks/bench_sentence_transformers.py --batches 2048 16384 --hidden 128
    python benchmarks/bench_sentence_transformers.py --device cuda --batches 16384 65536
    python benchmarks/bench_sentence_transformers.py --batches 256 1024 --negatives 0 1 3 7
    python benchmarks/bench_sentence_transformers.py --negatives 3 --losses gcl_uncached mnrl_sym

``--negatives 0 1 3 7``: each configuration with that many hard-negative columns per row,
``(anchor, positive, negative_1 .. negative_n)`` as MNRL takes them (0: pairs), each column its own
random texts; a ``score`` column (1-100) is passed as ``labels`` as the trainer's collator does.

The model is a randomly initialised BERT built offline (``--hidden``, ``--layers``; a word-piece
vocabulary written here; nothing is downloaded) with mean pooling; texts are random word
sequences of 8-24 words, tokenized once outside the timed region (the collator's work). Two
modes:

* ``step``: what the trainer runs per batch, ``loss(features, labels).backward()`` (no optimizer).
  Cached losses: encode every mini-batch without gradient, the loss stage, re-encode with
  gradient; uncached losses: encode every column of the whole batch with gradient, the loss,
  back-propagate through the encoder (no mini-batches);
* ``stage``: the loss stage alone on given (random) embeddings: the loss and its gradient w.r.t.
  the embeddings of the whole batch, where the implementations differ (the encoder work is the
  same for all). Cached losses: ``calculate_loss(reps, labels, with_backward=True)`` on the
  mini-batches' embeddings; uncached: ``compute_loss_from_embeddings(embeddings, labels)`` and
  ``backward`` to the embeddings. GCL's stage includes hashing the token ids for its duplicate
  ids (``batch_ids``), which its forward does.

Losses (cached ones first; the names of the pairs-only results are kept):

* ``gcl``: ``CachedGCLLoss`` with the defaults: scores through ``score_to_weight`` (inverse) and
  in-batch duplicates masked by hashing token ids (``mask_duplicates="all_columns"``);
* ``gcl_plain``: ``CachedGCLLoss(weights_from="none", mask_duplicates="none")``, the same
  function as the next one;
* ``cmnrl_sym``: ``CachedMultipleNegativesRankingLoss(directions=("query_to_doc",
  "doc_to_query"), partition_mode="per_direction")``, the symmetric loss GCL equals with unit
  weights (hard negatives included);
* ``cmnrl``: ``CachedMultipleNegativesRankingLoss`` with its defaults (one direction), for
  reference;
* ``gcl_uncached``: ``GCLLoss`` with the defaults (as ``gcl``, without gradient caching);
* ``gcl_uncached_plain``: ``GCLLoss(weights_from="none", mask_duplicates="none")``, the same
  function as the next one;
* ``mnrl_sym``: ``MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
  partition_mode="per_direction")``.

Without ``--negatives`` the default losses are the four cached ones (the pairs-only benchmark);
with it, all seven. Every (batch, negatives, mode, loss) runs in a fresh subprocess. Its first call is measured for memory
(before the allocator has grown): on the CPU the peak resident set (``VmHWM`` from
``/proc/self/status``, reset just before where the kernel allows it) minus the resident set before
the call, on CUDA ``torch.cuda.max_memory_allocated`` beyond what was allocated before. The next
``--steps`` calls are timed (median and minimum: on a shared machine the minimum is the more
stable). ``loadavg_1min`` records how busy the machine was. Rows go, with the hardware line, to
``benchmarks/results/st_cached_<device>.csv`` (pairs, the default), with ``--negatives`` to
``benchmarks/results/st_negatives_<device>.csv``, or to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import process_status_kib, reset_peak_rss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
CACHED_LOSSES = ("gcl", "gcl_plain", "cmnrl_sym", "cmnrl")
UNCACHED_LOSSES = ("gcl_uncached", "gcl_uncached_plain", "mnrl_sym")
LOSSES = CACHED_LOSSES + UNCACHED_LOSSES
SYMMETRIC = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
# fmt: off
WORDS = [
    "the", "a", "red", "blue", "green", "small", "large", "old", "new", "fast", "slow", "cat",
    "dog", "bird", "fish", "tree", "house", "car", "road", "river", "book", "lamp", "chair",
    "table", "apple", "bread", "water", "stone", "cloud", "light", "sat", "ran", "flew", "swam",
    "grew", "stood", "on", "under", "near", "over", "with", "from", "into", "shoe", "shirt",
    "phone", "cable", "lens", "bag", "watch", "ring",
]
# fmt: on
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_model(directory: Path, hidden: int, layers: int, device: str):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    (directory / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    modules = [Transformer(str(directory), max_seq_length=32), Pooling(hidden, "mean")]
    return SentenceTransformer(modules=modules, device=device)


def make_loss(name: str, model, mini_batch_size: int):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from gcl_ops.sentence_transformers import CachedGCLLoss, GCLLoss

    plain = {"weights_from": "none", "mask_duplicates": "none"}
    losses = {
        "gcl": lambda: CachedGCLLoss(model, mini_batch_size=mini_batch_size),
        "gcl_plain": lambda: CachedGCLLoss(model, mini_batch_size=mini_batch_size, **plain),
        "cmnrl_sym": lambda: CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=mini_batch_size, **SYMMETRIC
        ),
        "cmnrl": lambda: CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
        "gcl_uncached": lambda: GCLLoss(model),
        "gcl_uncached_plain": lambda: GCLLoss(model, **plain),
        "mnrl_sym": lambda: MultipleNegativesRankingLoss(model, **SYMMETRIC),
    }
    return losses[name]()


def texts(n: int, generator) -> list[str]:
    import torch

    lengths = torch.randint(8, 25, (n,), generator=generator)
    words = torch.randint(0, len(WORDS), (n, 24), generator=generator)
    return [" ".join(WORDS[int(w)] for w in row[:length]) for row, length in zip(words, lengths)]


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: ``--mode step`` (the trainer's forward and
    backward) or ``stage`` (the loss stage alone), ``--negative-columns`` hard negatives per row.
    The first call is measured for memory, the next ``--steps`` calls are timed."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.hidden, args.layers, device)
    generator = torch.Generator().manual_seed(1)
    columns = 2 + args.negative_columns  # anchor, positive, negative_1 .. negative_n
    batch = [
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(column).items()}
        for column in (texts(args.batch, generator) for _ in range(columns))
    ]
    scores = torch.randint(1, 101, (args.batch,), generator=generator).to(device)
    loss_fn = make_loss(args.loss, model, args.mini_batch_size)
    cached = args.loss in CACHED_LOSSES

    if args.mode == "step":

        def call() -> None:
            loss_fn(batch, scores).backward()
            model.zero_grad(set_to_none=True)

    elif cached:  # the cached embeddings (random: the encoder plays no part) in mini-batches
        sizes = [min(args.mini_batch_size, args.batch - i)
                 for i in range(0, args.batch, args.mini_batch_size)]  # fmt: skip
        reps = [
            [torch.randn(size, args.hidden, generator=generator).to(device) for size in sizes]
            for _ in range(columns)
        ]

        def call() -> None:
            leaves = [[r.detach().requires_grad_() for r in column] for column in reps]
            if args.loss.startswith("gcl"):  # the ids the forward pass stashes
                loss_fn._ids = loss_fn.batch_ids(batch)
            loss_fn.calculate_loss(leaves, scores, with_backward=True)

    else:  # uncached: the whole batch's (random) embeddings, one tensor per column
        embeddings = [
            torch.randn(args.batch, args.hidden, generator=generator).to(device)
            for _ in range(columns)
        ]

        def call() -> None:
            leaves = [e.detach().requires_grad_() for e in embeddings]
            if args.loss.startswith("gcl"):  # the ids its forward computes from the token ids
                loss = loss_fn.compute_loss_from_embeddings(
                    leaves, scores, loss_fn.batch_ids(batch)
                )
            else:
                loss = loss_fn.compute_loss_from_embeddings(leaves, scores)
            loss.backward()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    hwm_reset = reset_peak_rss()
    rss_before = process_status_kib("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    call()
    sync()
    peak_rss = process_status_kib("VmHWM")
    cuda_peak = (
        (torch.cuda.max_memory_allocated() - cuda_before) / 2**20 if device == "cuda" else None
    )
    samples = []
    for _ in range(args.steps):
        start = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - start)
    return {
        "mode": args.mode,
        "loss": args.loss,
        "batch": args.batch,
        "negatives": args.negative_columns,
        "mini_batch_size": args.mini_batch_size if cached else None,
        "hidden": args.hidden,
        "layers": args.layers,
        "tokens_per_text": int(batch[1]["input_ids"].shape[1]),
        "repeats": args.steps,
        "seconds_median": round(statistics.median(samples), 4),
        "seconds_min": round(min(samples), 4),
        "peak_rss_mib": None if peak_rss is None else round(peak_rss / 1024, 1),
        "peak_rss_increase_mib": (
            None if peak_rss is None or not hwm_reset else round((peak_rss - rss_before) / 1024, 1)
        ),
        "cuda_peak_increase_mib": None if cuda_peak is None else round(cuda_peak, 1),
        "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def hardware(device: str) -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"CPU ({cpu}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument(
        "--negatives", type=int, nargs="+", default=None,
        help="hard-negative columns per row, one configuration each (e.g. 0 1 3 7); default: pairs "
        "only, written to st_cached_<device>.csv, else to st_negatives_<device>.csv",
    )  # fmt: skip
    parser.add_argument(
        "--losses", nargs="+", default=None, choices=LOSSES,
        help=f"default: {' '.join(CACHED_LOSSES)}; with --negatives all: {' '.join(LOSSES)}",
    )  # fmt: skip
    parser.add_argument("--mini-batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed repeats per configuration")
    parser.add_argument("--modes", nargs="+", default=["step", "stage"], choices=["step", "stage"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="gcl", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--negative-columns", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.negatives is not None and min(args.negatives) < 0:
        parser.error("--negatives: counts must be >= 0")
    negatives = args.negatives if args.negatives is not None else [0]
    losses = args.losses or list(LOSSES if args.negatives is not None else CACHED_LOSSES)
    name = "st_negatives" if args.negatives is not None else "st_cached"
    out = args.out or RESULTS / f"{name}_{args.device}.csv"
    line = hardware(args.device)
    rows = []
    for batch, negative_columns, mode in itertools.product(args.batches, negatives, args.modes):
        for loss in losses:  # interleaved: the losses of a row see the same machine state
            command = [
                sys.executable, __file__, "--worker", "--mode", mode, "--loss", loss,
                "--batch", str(batch), "--negative-columns", str(negative_columns),
                "--device", args.device, "--mini-batch-size", str(args.mini_batch_size),
                "--hidden", str(args.hidden), "--layers", str(args.layers),
                "--steps", str(args.steps), "--threads", str(args.threads),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                row = {"mode": mode, "loss": loss, "batch": batch, "negatives": negative_columns,
                       "status": f"failed ({done.returncode})"}  # fmt: skip
            else:
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}
            row.update(line)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
