"""reference_trainer.model: the tiny config, local-only weights, saving for open_clip, freezing,
loading trained checkpoints."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from reference_trainer.model import (
    TINY_MODEL,
    create_model,
    load_trained,
    register_model_configs,
    save_model,
    unwrap,
)


def _inputs(bundle, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    tokens = bundle.tokenizer([f"red cotton shirt {i}" for i in range(batch)])
    return images, tokens


def _outputs(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_shape_and_size():
    register_model_configs()
    register_model_configs()  # idempotent
    assert open_clip.list_models().count(TINY_MODEL) == 1
    bundle = create_model(TINY_MODEL)
    assert sum(p.numel() for p in bundle.model.parameters()) < 10_000_000
    tokens = bundle.tokenizer(["a red round shirt", "blue"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.int64
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    for transform in (bundle.preprocess_train, bundle.preprocess_val):
        assert transform(image).shape == (3, 32, 32)
    images, tokens = _inputs(bundle)
    image_features, text_features = _outputs(bundle.model, images, tokens)
    assert image_features.shape == text_features.shape == (4, 64)


def test_unknown_name_lists_known_models():
    with pytest.raises(
        ValueError, match="unknown model 'gcl-tinny'.*gcl-tiny.*Known models:.*ViT-B-32"
    ):
        create_model("gcl-tinny")


@pytest.mark.parametrize(
    ("name", "pretrained"),
    [("ViT-B-32", "openai"), (TINY_MODEL, "laion2b_s34b_b79k"), (TINY_MODEL, "hf-hub:org/repo")],
)
def test_pretrained_tag_is_refused_without_download(monkeypatch, name, pretrained):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_download)
    with pytest.raises(ValueError, match="would need a download.*local file"):
        create_model(name, pretrained=pretrained)


def test_hub_model_name_is_refused():
    with pytest.raises(ValueError, match="would need a download"):
        create_model("hf-hub:timm/ViT-B-16-SigLIP")


def test_missing_or_unloadable_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model(TINY_MODEL, pretrained=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="directory"):
        create_model(TINY_MODEL, pretrained=tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not load"):
        create_model(TINY_MODEL, pretrained=tmp_path / "garbage.pt")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="(?s)could not load.*Missing key"):
        create_model(TINY_MODEL, pretrained=tmp_path / "partial.pt")


def test_saved_model_loads_in_open_clip_identically(tmp_path):
    torch.manual_seed(1)
    bundle = create_model(TINY_MODEL)
    path = tmp_path / "run" / "model.pt"
    save_model(path, torch.nn.DataParallel(bundle.model))  # the wrapper is stripped
    assert not any(key.startswith("module.") for key in torch.load(path, weights_only=True))
    # What the official GCL evaluation code does to load a model.
    loaded, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(path))
    assert _same_weights(bundle.model, loaded)
    images, tokens = _inputs(bundle)
    for ours, theirs in zip(
        _outputs(bundle.model, images, tokens), _outputs(loaded, images, tokens)
    ):
        assert torch.equal(ours, theirs)
    ours = create_model(TINY_MODEL, pretrained=path)
    assert _same_weights(bundle.model, ours.model)
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    assert torch.equal(preprocess(image), ours.preprocess_val(image))


def test_loads_wrapped_state_dict_formats(tmp_path):
    torch.manual_seed(2)
    source = create_model(TINY_MODEL).model
    prefixed = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": prefixed, "epoch": 3}, tmp_path / "ddp.pt")
    assert _same_weights(source, create_model(TINY_MODEL, pretrained=tmp_path / "ddp.pt").model)


def test_unwrap_strips_wrappers():
    model = create_model(TINY_MODEL).model
    assert unwrap(model) is model
    assert unwrap(torch.nn.DataParallel(model)) is model
    assert unwrap(torch.compile(torch.nn.DataParallel(model))) is model


@pytest.mark.parametrize("tower", ["text", "image"])
def test_frozen_tower_gets_no_grad_and_stays_unchanged(tower):
    torch.manual_seed(3)
    bundle = create_model(TINY_MODEL, freeze=tower)
    model = bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    in_image = {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    all_names = {n for n, _ in model.named_parameters()}
    expected = in_image if tower == "image" else all_names - in_image - {"logit_scale"}
    assert frozen == expected
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    images, tokens = _inputs(bundle, batch=8)
    for _ in range(2):
        image_features, text_features, scale = model(images, tokens)
        logits = scale * image_features @ text_features.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in model.named_parameters():
            assert (parameter.grad is None) == (name in frozen), name
        optimizer.step()
    after = model.state_dict()
    for name, _ in model.named_parameters():
        assert torch.equal(before[name], after[name]) == (name in frozen), name


def test_freeze_choice_is_checked():
    with pytest.raises(ValueError, match="freeze"):
        create_model(TINY_MODEL, freeze="vision")


def test_load_trained(tmp_path):
    torch.manual_seed(4)
    trained = create_model(TINY_MODEL).model
    checkpoint = tmp_path / "checkpoints" / "step_000100"
    save_model(checkpoint / "model.pt", trained)
    (checkpoint / "meta.json").write_text(json.dumps({"model": TINY_MODEL, "step": 100}))
    for source in (checkpoint, checkpoint / "model.pt", str(checkpoint)):
        bundle = load_trained(source)
        assert bundle.name == TINY_MODEL and _same_weights(trained, bundle.model)
    assert _same_weights(trained, load_trained(checkpoint, model_name=TINY_MODEL).model)
    with pytest.raises(ValueError, match="says the checkpoint is 'gcl-tiny'"):
        load_trained(checkpoint, model_name="ViT-B-32")

    bare = tmp_path / "bare.pt"
    save_model(bare, trained)
    with pytest.raises(ValueError, match="pass model_name"):
        load_trained(bare)
    assert _same_weights(trained, load_trained(bare, model_name=TINY_MODEL).model)
    with pytest.raises(FileNotFoundError, match="holds no model.pt"):
        load_trained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trained(tmp_path / "missing")
