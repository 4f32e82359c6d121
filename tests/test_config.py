"""Config layering (preset -> file -> variant -> --set) and validation against the declared types."""

import argparse

import pytest

from dreamlip import cli
from dreamlip.cli import train
from dreamlip.config import TrainConfig, coerce_dataclass, load_config, resume_changes
from dreamlip.demo import DemoSettings


def _train_config(monkeypatch, tmp_path, *argv: str) -> TrainConfig:
    """The config `dreamlip train ARGV` would train with."""
    seen = []
    monkeypatch.setattr(train, "train", lambda config, out, resume=None: seen.append(config) or {"final": {}})
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.run(parser.parse_args(["--out", str(tmp_path), *argv])) == 0
    return seen[0]


def test_set_wins_over_variant_in_dreamlip_train(monkeypatch, tmp_path):
    config = _train_config(monkeypatch, tmp_path, "--variant", "dreamlip", "--set", "loss.group_weight=0.25")
    assert config.loss.group_weight == 0.25
    config = _train_config(monkeypatch, tmp_path, "--set", "captions.k=4", "--variant", "clip")
    assert config.captions.k == 4  # --set is the last layer whatever the order on the command line


def test_layers_apply_in_order_preset_file_variant_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("captions:\n  k: 5\nloss:\n  group_weight: 0.5\noptim:\n  lr: 1e-3\n")
    config = load_config("demo", path)
    assert (config.model.name, config.captions.k, config.loss.group_weight) == ("DreamLIP-ViT-Tiny-64", 5, 0.5)
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)  # YAML 1.1 read "1e-3" as text
    config = load_config("demo", path, variant="clip")
    assert (config.captions.k, config.loss.group_weight) == (0, 0.0)  # the variant is over the file
    config = load_config("demo", path, ["loss.group_weight=0.25"], variant="clip")
    assert config.loss.group_weight == 0.25
    # A mapping in the file's place (how the demo and the ablation bench set their runs' fields).
    assert load_config("demo", {"captions.k": 6}, variant="clip").captions.k == 0
    assert load_config("demo", {"captions": {"k": 3}}).captions.k == 3


def test_numbers_are_read_as_their_declared_type():
    config = load_config(overrides=["optim.grad_clip=1e-1", "optim.warmup_steps=1e4", "optim.eps=1", "loss.group_threshold=null"])
    assert config.optim.grad_clip == 0.1 and isinstance(config.optim.grad_clip, float)
    assert config.optim.warmup_steps == 10_000 and isinstance(config.optim.warmup_steps, int)
    assert config.optim.eps == 1.0 and isinstance(config.optim.eps, float)
    assert config.loss.group_threshold is None
    with pytest.raises(ValueError, match=r"--set: optim.grad_clip must be a number or null; got 'fast'"):
        load_config(overrides=["optim.grad_clip=fast"])
    with pytest.raises(ValueError, match=r"optim.batch_size must be an integer; got 2.5"):
        load_config(overrides=["optim.batch_size=2.5"])
    with pytest.raises(ValueError, match=r"run.deterministic must be true or false; got 1"):
        load_config(overrides=["run.deterministic=1"])
    with pytest.raises(ValueError, match=r"run.log_every must be at least 1; got 0"):
        load_config(overrides=["run.log_every=0"])


def test_choices_are_checked_and_listed():
    with pytest.raises(ValueError, match=r"run.precision must be one of auto, fp32, bf16, fp16; got 'bfloat16'"):
        load_config(overrides=["run.precision=bfloat16"])
    with pytest.raises(ValueError, match=r"run.strategy must be one of ddp, fsdp; got 'fdsp'"):
        load_config(overrides=["run.strategy=fdsp"])
    with pytest.raises(ValueError, match=r"captions.long_mode must be one of sentences, whole, sentences\+whole, none; got 'paragraphs'"):
        load_config(overrides=["captions.long_mode=paragraphs"])
    assert load_config(overrides=["run.eval_tasks=zeroshot,long_retrieval"]).run.eval_tasks == ["zeroshot", "long_retrieval"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['zero-shot'\]; choose from zeroshot, retrieval"):
        load_config(overrides=["run.eval_tasks=[zero-shot]"])


def test_text_packing_is_auto_true_or_false(tmp_path):
    assert load_config().model.text_packing == "auto"
    assert load_config(overrides=["model.text_packing=true"]).model.text_packing is True
    assert load_config(overrides=["model.text_packing=false"]).model.text_packing is False
    assert load_config(overrides=["model.text_packing=auto"]).model.text_packing == "auto"
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  text_packing: false\n")
    assert load_config(config_file=path).model.text_packing is False
    with pytest.raises(ValueError, match=r"--set: model.text_packing must be one of auto or true or false; got 'always'"):
        load_config(overrides=["model.text_packing=always"])
    with pytest.raises(ValueError, match=r"model.text_packing must be one of auto or true or false; got 1"):
        load_config(overrides=["model.text_packing=1"])  # not read as true


def test_a_config_file_is_validated_with_its_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  strategy: fdsp\n")
    with pytest.raises(ValueError, match=rf"{path}: run.strategy must be one of ddp, fsdp"):
        load_config(config_file=path)
    path.write_text("run: [1, 2\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML"):
        load_config(config_file=path)


def test_string_fields_keep_the_text_as_written():
    config = load_config(overrides=["model.name=2024", "data.train=wds:/data/{000..009}.tar", "model.pretrained=null"])
    assert config.model.name == "2024" and config.data.train == "wds:/data/{000..009}.tar"
    assert config.model.pretrained is None


def test_the_cli_names_the_bad_value_without_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path), "--set", "run.precision=bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "run.precision must be one of auto, fp32, bf16, fp16" in err and "Traceback" not in err


def test_demo_settings_use_the_same_validation():
    assert coerce_dataclass(DemoSettings, {"steps": "1e2", "k": 3}, "demo") == DemoSettings(steps=100, k=3)
    with pytest.raises(ValueError, match=r"demo: unknown field\(s\) \['step'\]"):
        coerce_dataclass(DemoSettings, {"step": 1}, "demo")
    with pytest.raises(ValueError, match=r"demo: k must be an integer; got 'six'"):
        coerce_dataclass(DemoSettings, {"k": "six"}, "demo")


def test_resume_changes_split_refused_and_allowed():
    saved = load_config("demo").to_dict()
    changed = load_config("demo", overrides=["optim.batch_size=8", "model.name=ViT-B-16", "optim.max_steps=99", "run.log_every=1"])
    refused, allowed = resume_changes(saved, changed)
    assert refused == ["model.name: 'DreamLIP-ViT-Tiny-64' -> 'ViT-B-16'", "optim.batch_size: 64 -> 8"]
    assert allowed == ["optim.max_steps: None -> 99", "run.log_every: 10 -> 1"]
    del saved["loss"]["local_loss"]  # a checkpoint from before the field existed: its default
    assert resume_changes(saved, load_config("demo")) == ([], [])
