"""Export to open_clip's local-dir layout, and loading open_clip weights as a starting point."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import NANO, TINY, run_cli
from dreamlip.checkpoint import save_checkpoint
from dreamlip.cli import main
from dreamlip.export import export_open_clip
from dreamlip.loading import NotPlainWeights, PretrainedMismatch, load_model
from dreamlip.model import create_model, get_tokenizer, load_open_clip

open_clip = load_open_clip()


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    return model.eval(), transform


def _cli(*argv):
    return run_cli("export", *argv)


def test_export_loads_in_plain_open_clip_with_equal_embeddings(nano, tmp_path, monkeypatch):
    model, transform = nano
    out = export_open_clip(model, NANO, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config(NANO)
    # A plain open_clip does not know our architectures: the embedded config must be enough.
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, NANO)
    clip, _, oc_transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    clip.eval()

    image = Image.effect_noise((45, 40), 60).convert("RGB")
    pixels = transform(image)[None]
    torch.testing.assert_close(oc_transform(image)[None], pixels)
    texts = ["a red circle", "a small blue striped square at the top left"]
    torch.testing.assert_close(oc_tokenizer(texts), get_tokenizer(NANO)(texts))
    with torch.no_grad():
        ours_image, _ = model.encode_image(pixels)
        ours_text = model.encode_text(get_tokenizer(NANO)(texts))
        torch.testing.assert_close(F.normalize(clip.encode_image(pixels), dim=-1), ours_image)
        torch.testing.assert_close(
            F.normalize(clip.encode_text(oc_tokenizer(texts)), dim=-1), ours_text, atol=1e-6, rtol=1e-5
        )
    torch.testing.assert_close(clip.logit_scale, model.clip.logit_scale)


def test_export_cli_from_a_checkpoint(nano, tmp_path, capsys):
    model, _ = nano
    checkpoint = tmp_path / "nano.pt"
    save_checkpoint(checkpoint, {"model_name": NANO, "model": model.state_dict(), "config": {}, "step": 7})
    assert _cli("--checkpoint", checkpoint, "--out", tmp_path / "out") == 0
    assert json.loads(capsys.readouterr().out)["step"] == 7
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    for key, value in model.clip.state_dict().items():
        torch.testing.assert_close(clip.state_dict()[key], value, msg=key)


def test_export_cli_refuses_a_checkpoint_that_is_not_ours(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert _cli("--checkpoint", tmp_path / "other.pt", "--out", tmp_path / "out") == 2
    assert "not a dreamlip checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_loader_reads_open_clip_weights_our_checkpoints_and_exports(nano, tmp_path):
    model, _ = nano
    export = export_open_clip(model, NANO, tmp_path / "export")
    checkpoint = tmp_path / "nano.pt"
    save_checkpoint(checkpoint, {"model_name": NANO, "model": model.state_dict(), "config": {}, "step": 4})
    sources = {"open_clip": (export / "open_clip_model.safetensors", NANO), "checkpoint": (checkpoint, None), "export": (export, None)}
    for kind, (path, name) in sources.items():
        loaded = load_model(path, model_name=name)
        assert loaded.info["kind"] == kind and loaded.info["model_name"] == NANO and not loaded.model.training
        assert loaded.tokenizer(["a red star"]).shape == (1, 77)
        for key, value in model.clip.state_dict().items():
            torch.testing.assert_close(loaded.model.clip.state_dict()[key], value, msg=f"{kind}: {key}")
    assert load_model(checkpoint).info["step"] == 4
    fresh = load_model(model_name=NANO)
    assert fresh.info == {"kind": "architecture", "path": None, "model_name": NANO}
    assert not torch.equal(fresh.model.clip.visual.proj, model.clip.visual.proj)


def test_load_pretrained_names_the_mismatch(nano, tmp_path):
    model, _ = nano
    weights = export_open_clip(model, NANO, tmp_path / "export") / "open_clip_model.safetensors"
    with pytest.raises(
        PretrainedMismatch,
        match=r"does not fit architecture 'DreamLIP-ViT-Tiny-64'.*of another shape \(e\.g\.",
    ):
        load_model(weights, model_name=TINY)
    checkpoint = tmp_path / "nano.pt"
    save_checkpoint(checkpoint, {"model_name": NANO, "model": model.state_dict(), "config": {}})
    with pytest.raises(
        PretrainedMismatch, match="dreamlip checkpoint of 'DreamLIP-ViT-Nano-32', not 'DreamLIP-ViT-Tiny-64'"
    ):
        load_model(checkpoint, model_name=TINY)
    with pytest.raises(PretrainedMismatch, match="an export of 'DreamLIP-ViT-Nano-32', not 'DreamLIP-ViT-Tiny-64'"):
        load_model(tmp_path / "export", model_name=TINY)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt", model_name=NANO)
    with pytest.raises(ValueError, match="not an open_clip export"):
        load_model(tmp_path)


def test_a_pickled_pretrained_file_is_refused_naming_it(nano, tmp_path, capsys):
    model, _ = nano
    path = tmp_path / "with_args.pt"  # what many training scripts save: weights plus their args
    torch.save({"state_dict": model.clip.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    message = rf"^{path}: not a plain weights file \(it pickles argparse.Namespace\)"
    with pytest.raises(NotPlainWeights, match=message):
        load_model(path, model_name=NANO)
    data = tmp_path / "data.jsonl"  # well-formed: only the weights file can be refused
    data.write_text('{"image": "a.png", "raw_caption": "a photo"}\n')
    train = ["train", "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*train, "--set", f"model.name={NANO}", "--set", f"model.pretrained={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dreamlip train: error: {path}: not a plain weights file") and "Traceback" not in err
