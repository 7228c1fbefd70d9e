"""CachedGCLLoss against sentence-transformers' CachedMultipleNegativesRankingLoss: time per
training step and peak memory at large batches (gradient caching, mini-batches of 64).

    python benchmarks/bench_sentence_transformers.py        # CPU: 1024 and 4096 pairs
    python benchmarks/bench_sentence_transformers.py --batches 2048 16384 --hidden 128
    python benchmarks/bench_sentence_transformers.py --device cuda --batches 16384 65536

The model is a randomly initialised BERT built offline (``--hidden``, ``--layers``; a word-piece
vocabulary written here; nothing is downloaded) with mean pooling; texts are random word
sequences of 8-24 words, tokenized once outside the timed region (the collator's work). Two
modes:

* ``step``: what the trainer runs per batch, ``loss(features, labels).backward()`` (encode every
  mini-batch without gradient, the loss stage, re-encode with gradient; no optimizer);
* ``stage``: the loss stage alone, ``calculate_loss(reps, labels, with_backward=True)`` on cached
  (random) embeddings: the loss and its gradient w.r.t. the embeddings of the whole batch, where
  the two implementations differ (the encoder work is the same for both).

Losses:

* ``gcl``: ``CachedGCLLoss`` with the defaults: scores through ``score_to_weight`` (inverse) and
  in-batch duplicates masked by hashing token ids;
* ``gcl_plain``: ``CachedGCLLoss(weights_from="none", mask_duplicates=False)``, the same function
  as the next one;
* ``cmnrl_sym``: ``CachedMultipleNegativesRankingLoss(directions=("query_to_doc",
  "doc_to_query"), partition_mode="per_direction")``, the symmetric loss GCL equals with unit
  weights;
* ``cmnrl``: ``CachedMultipleNegativesRankingLoss`` with its defaults (one direction), for
  reference.

Every (batch, mode, loss) runs in a fresh subprocess. Its first call is measured for memory
(before the allocator has grown): on the CPU the peak resident set (``VmHWM`` from
``/proc/self/status``, reset just before where the kernel allows it) minus the resident set before
the call, on CUDA ``torch.cuda.max_memory_allocated`` beyond what was allocated before. The next
``--steps`` calls are timed (median and minimum: on a shared machine the minimum is the more
stable). ``loadavg_1min`` records how busy the machine was. Rows go to
``benchmarks/results/st_cached_<device>.csv`` with the hardware line.
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
LOSSES = ("gcl", "gcl_plain", "cmnrl_sym", "cmnrl")
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
    )

    from gcl_ops.sentence_transformers import CachedGCLLoss

    if name == "gcl":
        return CachedGCLLoss(model, mini_batch_size=mini_batch_size)
    if name == "gcl_plain":
        return CachedGCLLoss(
            model, weights_from="none", mask_duplicates=False, mini_batch_size=mini_batch_size
        )
    if name == "cmnrl_sym":
        return CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=mini_batch_size, directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )  # fmt: skip
    return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)


def texts(n: int, generator) -> list[str]:
    import torch

    lengths = torch.randint(8, 25, (n,), generator=generator)
    words = torch.randint(0, len(WORDS), (n, 24), generator=generator)
    return [" ".join(WORDS[int(w)] for w in row[:length]) for row, length in zip(words, lengths)]


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: ``--mode step`` (the trainer's forward and
    backward) or ``stage`` (the loss stage alone). The first call is measured for memory, the
    next ``--steps`` calls are timed."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.hidden, args.layers, device)
    generator = torch.Generator().manual_seed(1)
    batch = [
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(column).items()}
        for column in (texts(args.batch, generator), texts(args.batch, generator))
    ]
    scores = torch.randint(1, 101, (args.batch,), generator=generator).to(device)
    loss_fn = make_loss(args.loss, model, args.mini_batch_size)

    if args.mode == "step":

        def call() -> None:
            loss_fn(batch, scores).backward()
            model.zero_grad(set_to_none=True)

    else:  # the cached embeddings (random: the encoder plays no part) in mini-batches
        sizes = [min(args.mini_batch_size, args.batch - i)
                 for i in range(0, args.batch, args.mini_batch_size)]  # fmt: skip
        reps = [
            [torch.randn(size, args.hidden, generator=generator).to(device) for size in sizes]
            for _ in range(2)
        ]

        def call() -> None:
            leaves = [[r.detach().requires_grad_() for r in column] for column in reps]
            if args.loss.startswith("gcl"):  # the ids the forward pass stashes
                loss_fn._ids = loss_fn.batch_ids(batch)
            loss_fn.calculate_loss(leaves, scores, with_backward=True)

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
        "mini_batch_size": args.mini_batch_size,
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
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
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
    parser.add_argument("--mode", default="step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    out = args.out or RESULTS / f"st_cached_{args.device}.csv"
    line = hardware(args.device)
    rows = []
    for batch, mode in itertools.product(args.batches, args.modes):
        for loss in args.losses:  # interleaved: the losses of a row see the same machine state
            command = [
                sys.executable, __file__, "--worker", "--mode", mode, "--loss", loss,
                "--batch", str(batch),
                "--device", args.device, "--mini-batch-size", str(args.mini_batch_size),
                "--hidden", str(args.hidden), "--layers", str(args.layers),
                "--steps", str(args.steps), "--threads", str(args.threads),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                row = {"mode": mode, "loss": loss, "batch": batch,
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
