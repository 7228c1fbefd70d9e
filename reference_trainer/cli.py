"""``python -m reference_trainer make-synthetic | train | eval``: the trainer's command line."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from reference_trainer.config import build_config, describe_fields

EPILOG_TRAIN = """\
Config keys (set them in a YAML/JSON --config file or as key=value; the command line wins):
{fields}

Examples:
  python -m reference_trainer train --data synthetic --out runs/tiny steps=300
  torchrun --nproc-per-node 2 -m reference_trainer train --data DIR --out RUN --config cfg.yaml
  python -m reference_trainer train --data DIR --out RUN --resume latest
"""


def _literal(text: str):
    """A command-line value as int, float, bool or None where it reads as one, else a string."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _synthetic_options() -> str:
    from reference_trainer.synthetic import make_synthetic

    lines = []
    for name, parameter in inspect.signature(make_synthetic).parameters.items():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            lines.append(f"  {name}={parameter.default!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reference_trainer",
        description="Multi-field GCL on MarqoGS-10M with open_clip: synthetic data, training, evaluation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    synthetic = commands.add_parser(
        "make-synthetic",
        help="write a small MarqoGS-10M-shaped dataset with graded relevance",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options (key=value):\n" + _synthetic_options(),
    )
    synthetic.add_argument("out", help="output directory")
    synthetic.add_argument("options", nargs="*", help="key=value generator options (below)")

    train = commands.add_parser(
        "train",
        help="train a model (multi-field GCL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_TRAIN.format(fields=describe_fields()),
    )
    train.add_argument("--data", help="dataset directory (either layout)")
    train.add_argument("--out", help="run directory")
    train.add_argument("--config", help="YAML or JSON file of config keys")
    train.add_argument("--resume", help="checkpoint directory, or 'latest' (the newest in --out)")
    train.add_argument("overrides", nargs="*", help="key=value config overrides (below)")

    evaluation = commands.add_parser("eval", help="evaluate a checkpoint on the four splits")
    evaluation.add_argument("--data", required=True, help="dataset directory (either layout)")
    evaluation.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory, its model.pt, or a run directory (its newest checkpoint)",
    )
    evaluation.add_argument("--model", help="open_clip model name (default: from meta.json)")
    evaluation.add_argument(
        "--out", help="results file stem: writes .json and .csv (default: beside the checkpoint)"
    )
    evaluation.add_argument("--splits", nargs="+", help="splits to evaluate (default: all four)")
    evaluation.add_argument(
        "--max-queries", type=int, default=2000, help="queries sampled per split (default 2000)"
    )
    evaluation.add_argument(
        "--top-k", type=int, default=1000, help="documents retrieved per query (default 1000)"
    )
    evaluation.add_argument("--doc-gamma", type=float, nargs=2, default=(0.5, 0.5), metavar=("TITLE", "IMAGE"),
                            help="document field weights (default 0.5 0.5)")  # fmt: skip
    evaluation.add_argument(
        "--raw-grades",
        action="store_true",
        help="grade by raw score_linear instead of the official min-max rescaling to 1..100",
    )
    evaluation.add_argument(
        "--batch-size", type=int, default=256, help="embedding batch size (default 256)"
    )
    evaluation.add_argument(
        "--num-workers", type=int, default=0, help="image decoding workers (default 0)"
    )
    evaluation.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")

    args = parser.parse_args(argv)
    try:
        if args.command == "make-synthetic":
            return _make_synthetic(args)
        if args.command == "train":
            return _train(args)
        return _evaluate(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def _make_synthetic(args: argparse.Namespace) -> int:
    from reference_trainer.synthetic import make_synthetic

    options = {}
    for pair in args.options:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {pair!r}")
        options[key.replace("-", "_")] = _literal(value)
    known = inspect.signature(make_synthetic).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown make-synthetic options {unknown}; known: {', '.join(known)}")
    path = make_synthetic(Path(args.out), **options)
    print(f"wrote a synthetic MarqoGS-10M-shaped dataset to {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from reference_trainer.train import train

    config = build_config(
        args.config, args.overrides, data=args.data, out=args.out, resume=args.resume
    )
    train(config)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from reference_trainer.evaluate import evaluate_model, format_table, save_results
    from reference_trainer.marqo import SPLITS, open_dataset
    from reference_trainer.model import load_trained

    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():  # a run directory: its newest checkpoint
        found = sorted((checkpoint / "checkpoints").glob("step_*"))
        if not found:
            raise ValueError(f"{checkpoint} holds no checkpoint yet")
        checkpoint = found[-1]
    bundle = load_trained(checkpoint, device=device, model_name=args.model)
    dataset = open_dataset(args.data)
    print(f"data: {dataset.describe()}")
    results = evaluate_model(
        bundle, dataset, splits=tuple(args.splits or SPLITS), max_queries=args.max_queries,
        official_rescale=not args.raw_grades, top_k=args.top_k, doc_gamma=tuple(args.doc_gamma), batch_size=args.batch_size,
        num_workers=args.num_workers, device=device,
    )  # fmt: skip
    print(format_table(results))
    stem = (
        Path(args.out)
        if args.out
        else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval"
    )
    json_path, csv_path = save_results(results, stem)
    print(f"saved {json_path} and {csv_path}")
    return 0
