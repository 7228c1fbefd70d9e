"""The README's usage snippets run, in order, as written."""

from __future__ import annotations

import pathlib
import re

import torch
import torch.nn.functional as F

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path, monkeypatch) -> None:
    from test_sentence_transformers import build_model_dir, load_model

    monkeypatch.chdir(tmp_path)  # the sentence-transformers example writes runs/st-gcl
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 6
    generator = torch.Generator().manual_seed(0)
    namespace = {
        # Names the snippets take from the reader's own code.
        "image_features": F.normalize(torch.randn(256, 512, generator=generator), dim=-1),
        "text_features": F.normalize(torch.randn(256, 512, generator=generator), dim=-1),
        "my_loss": lambda q, d, w, t, **ids: __import__("gcl_ops").gcl_loss(q, d, w, t, **ids),
        # a tiny BERT built offline, for the sentence-transformers example
        "model": load_model(build_model_dir(tmp_path / "bert"), torch.float32),
    }
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    # The README's hypothesis test, on one batch (a @given test cannot run inside this one).
    from gcl_ops.testing import GCLBatch

    batch = GCLBatch(torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64),
                     torch.rand(7, dtype=torch.float64), 12.0, torch.tensor([0, 0, 1, 2, 3, 4, 5]))  # fmt: skip
    namespace["test_my_loss"].hypothesis.inner_test(batch)
