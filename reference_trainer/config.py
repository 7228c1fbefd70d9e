"""Training configuration: one dataclass, readable files (YAML or JSON), ``key=value`` overrides.

Precedence: the defaults below, then the ``--config FILE`` values, then ``key=value`` pairs on the
command line. Every field's help text is its documentation (``python -m reference_trainer train
--help`` prints them with their defaults).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import gcl_ops


def _field(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str = _field(
        "", "dataset directory: Hugging Face layout (data/<split>-N.parquet) or CSV/JSON"
    )
    out: str = _field("", "run directory: log.csv, curves.png, checkpoints/step_NNNNNN/")
    split: str = _field("in_domain", "training split")
    num_workers: int = _field(
        0, "DataLoader worker processes decoding images (0: in the main process)"
    )
    window_batches: int = _field(16, "batches per shuffle window (rows mixed together in memory)")
    max_docs_per_query: int | None = _field(
        None, "cap on one query's documents in a batch (None: no cap)"
    )
    # model
    model: str = _field(
        "gcl-tiny", "open_clip model name (gcl-tiny: the small CPU config; ViT-B-32, ...)"
    )
    pretrained: str | None = _field(
        None, "local file with pretrained weights (nothing is downloaded)"
    )
    freeze: str | None = _field(None, "freeze a tower: 'text', 'image' or None")
    # loss
    weight_kind: str = _field(
        "inverse",
        f"score-to-weight function: {', '.join(gcl_ops.WEIGHT_KINDS)} (constant = CLIP loss)",
    )
    s_max: float = _field(100.0, "largest possible score (100 for MarqoGS-10M)")
    doc_gamma: list[float] = _field(
        [0.5, 0.5], "document field weights (title, image), summing to 1"
    )
    renormalize: bool = _field(
        True, "re-normalise the field averages (the official code) or not (paper Eq. 5)"
    )
    mask_duplicates: bool = _field(
        True, "pairs sharing a query id or product id are not each other's negatives"
    )
    max_logit_scale: float = _field(
        100.0, "the learnable logit scale is clamped to at most this (open_clip)"
    )
    init_logit_scale: float | None = _field(
        None, "the logit scale's starting value (None: open_clip's 1 / 0.07 = 14.3)"
    )
    loss_normalization: str = _field(
        "pairs",
        "pairs: the weighted losses averaged over the pairs (the paper's 1 / 2N); weights: "
        "divided by the batch's sum of weights instead (a weighted mean: each batch weighs the same)",
    )
    impl: str = _field("auto", "loss backend: auto (Triton on CUDA), triton, torch")
    # optimisation
    steps: int = _field(200, "optimizer steps (epochs roll over as needed)")
    batch_size: int = _field(
        64, "pairs per rank per step (the global batch is this times the world size)"
    )
    chunk_size: int | None = _field(
        None, "gradient caching: rows per encoder call when below batch_size"
    )
    lr: float = _field(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _field(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _field(20, "linear warmup steps")
    weight_decay: float = _field(
        0.1, "AdamW weight decay (not on gains, biases and the logit scale)"
    )
    betas: list[float] = _field([0.9, 0.98], "AdamW betas")
    eps: float = _field(1e-6, "AdamW epsilon")
    grad_clip: float | None = _field(None, "clip the gradient norm to this (None: no clipping)")
    precision: str = _field("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32")
    # bookkeeping
    seed: int = _field(0, "seed for the model, the data order and augmentations")
    device: str = _field("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    log_every: int = _field(1, "write a log row every this many steps")
    checkpoint_every: int = _field(0, "checkpoint every this many steps (0: only at the end)")
    resume: str | None = _field(None, "checkpoint directory to continue from, or 'latest' in out")
    progress: bool = _field(True, "show a progress bar")

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad value; return self."""
        if not self.data:
            raise ValueError("data is required: the dataset directory (--data DIR)")
        if not self.out:
            raise ValueError("out is required: the run directory (--out RUN)")
        if self.weight_kind not in gcl_ops.WEIGHT_KINDS:
            raise ValueError(
                f"weight_kind must be one of {gcl_ops.WEIGHT_KINDS}, got {self.weight_kind!r}"
            )
        for name in ("steps", "batch_size", "log_every", "window_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if (
            len(self.doc_gamma) != 2
            or min(self.doc_gamma) < 0
            or abs(sum(self.doc_gamma) - 1) > 1e-6
        ):
            raise ValueError(
                f"doc_gamma must be two non-negative weights summing to 1, got {self.doc_gamma}"
            )
        if self.freeze not in (None, "text", "image"):
            raise ValueError(f"freeze must be 'text', 'image' or None, got {self.freeze!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be auto, triton or torch, got {self.impl!r}")
        if not self.max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be positive, got {self.max_logit_scale}")
        if self.init_logit_scale is not None and not (
            0 < self.init_logit_scale <= self.max_logit_scale
        ):
            raise ValueError(
                f"init_logit_scale must lie in (0, max_logit_scale={self.max_logit_scale}], "
                f"got {self.init_logit_scale}"
            )
        if self.loss_normalization not in ("pairs", "weights"):
            raise ValueError(
                f"loss_normalization must be pairs or weights, got {self.loss_normalization!r}"
            )
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_docs_per_query is not None and self.max_docs_per_query < 1:
            raise ValueError(
                f"max_docs_per_query must be >= 1 or None, got {self.max_docs_per_query}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(
                f"device must be auto, cpu or cuda (torchrun picks the GPU), got {self.device!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse a command-line value for a field annotated ``annotation`` (str, int, float, bool,
    ``list[float]``, optionally ``| None``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} takes true or false, got {text!r}")
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        parts = text.strip("[]").replace(",", " ").split()
        return [_convert(part, item, key) for part in parts]
    try:
        return annotation(text)
    except ValueError:
        raise ValueError(f"{key} takes a {annotation.__name__}, got {text!r}") from None


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Values from a YAML (``.yaml``/``.yml``) or JSON file; unknown keys raise ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    hints = _hints()
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}")
    return {key: _coerce(value, hints[key], f"{path}: {key}") for key, value in values.items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """A value read from a file, checked against the field's type; strings are parsed as on
    the command line (YAML reads ``1e-3`` as a string)."""
    if isinstance(value, str) and annotation is not str:
        return _convert(value, annotation, key)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ValueError(f"{key} takes a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[annotation]
    if not ok:
        raise ValueError(f"{key} takes a {annotation.__name__}, got {value!r}")
    return float(value) if annotation is float else value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "doc_gamma=0.3,0.7"]`` -> typed values; unknown keys raise ``ValueError``."""
    hints, values = _hints(), {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"expected key=value, got {pair!r}")
        if key not in hints:
            raise ValueError(f"unknown config key {key!r}; known: {', '.join(sorted(hints))}")
        values[key] = _convert(text.strip(), hints[key], key)
    return values


def build_config(
    file: str | Path | None = None, overrides: list[str] = (), **values: Any
) -> TrainConfig:
    """Defaults, then ``file``, then ``values`` (e.g. ``data=``), then ``overrides``."""
    merged: dict[str, Any] = read_config_file(file) if file else {}
    merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(parse_overrides(list(overrides)))
    return TrainConfig(**merged).validate()


def describe_fields() -> str:
    """One line per key: name, default and help (for ``--help``)."""
    lines = []
    for field in dataclasses.fields(TrainConfig):
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        lines.append(f"  {field.name:<20} {field.metadata['help']} (default: {default!r})")
    return "\n".join(lines)
