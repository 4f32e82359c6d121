"""The training loop: learning, files, exact resume after SIGKILL, torchrun, gradient accumulation."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import NANO as MODEL
from conftest import cli_command as _cli
from conftest import torchrun_command
from conftest import run_cli
from dreamlip.checkpoint import CHECKPOINT_VERSION, Checkpointer, load_checkpoint, save_checkpoint
from dreamlip.config import TrainConfig, apply_overrides, apply_variant, load_config
from dreamlip.data.records import read_jsonl
from dreamlip.data.shards import write_shards
from dreamlip.train import WarmupCosine, parameter_groups, train


def _overrides(data_dir, **extra):
    settings = {
        "model.name": MODEL,
        "data.train": str(data_dir / "train.jsonl"),
        "data.workers": 0,
        "captions.k": 3,
        "optim.batch_size": 16,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 2,
        "optim.weight_decay": 0.1,
        "run.log_every": 1,
        "run.progress": False,
        "run.deterministic": True,
    }
    settings.update(extra)
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in settings.items()]


def _config(data_dir, **extra) -> TrainConfig:
    return apply_overrides(TrainConfig(), _overrides(data_dir, **extra))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights and, prefixed ``objective.``, its objective's."""
    payload = load_checkpoint(path)
    return payload["model"] | {f"objective.{name}": tensor for name, tensor in payload["objective"].items()}


def test_training_lowers_the_loss_and_writes_its_files(data_dir, tmp_path):
    summary = train(_config(data_dir, **{"optim.max_steps": 24, "run.save_every": 10}), tmp_path)
    metrics = _metrics(tmp_path)
    assert len(metrics) == 24 and all(math.isfinite(m["loss"]) for m in metrics)
    # The grouping weight ramps from 0 over the run's first half (step n of 24 weighs it
    # min(1, n / 12)), so the summed loss may rise; each term at its own weight falls.
    contrastive = [m["loss/mpcl"] for m in metrics]
    grouping = [m["loss/group"] / min(1, m["step"] / 12) for m in metrics]
    assert sum(contrastive[-4:]) / 4 < sum(contrastive[:4]) / 4 - 0.1, contrastive
    assert sum(grouping[-4:]) / 4 < sum(grouping[:4]) / 4, grouping
    first = _metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(first["loss/mpcl"] + first["loss/group"], rel=1e-6)
    assert first["lr"] > 0 and first["samples_per_s"] > 0
    assert first["skipped"] == {}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000020.pt", "step_00000024.pt"]
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "config.yaml").is_file() and summary["steps"] == 24
    final = load_checkpoint(tmp_path / "model.pt")
    assert final["model_name"] == MODEL and "clip.logit_scale" in final["model"]
    assert list(final["objective"]) == ["local_logit_scale"] and "local_logit_scale" not in final["model"]
    assert final["version"] == CHECKPOINT_VERSION == 3
    step_checkpoint = load_checkpoint(tmp_path / "checkpoints" / "step_00000020.pt")
    assert step_checkpoint["step"] == step_checkpoint["train_state"]["step"] == 20


def test_export_and_eval_report_the_step_the_weights_had(data_dir, tmp_path, capsys):
    """The checkpoint's documented "step" field is written, so the tools that report it see it."""
    train(_config(data_dir, **{"optim.max_steps": 3}), tmp_path / "run")
    assert run_cli("export", "--checkpoint", tmp_path / "run" / "model.pt", "--out", tmp_path / "export") == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    args = ["--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_00000003.pt"), "--data", str(data_dir),
            "--tasks", "retrieval", "--out", str(tmp_path / "eval.json")]
    assert run_cli("eval", *args) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["step"] == 3


def test_version_1_checkpoints_still_load(tmp_path):
    rng = {"torch": torch.arange(3, dtype=torch.uint8), "python": None, "cuda": None}
    position = {"step": 5, "epoch": 1, "batch_in_epoch": 2, "records_read": None}
    old = {"format": "dreamlip-checkpoint", "version": 1, "model_name": MODEL, "model": {}, "config": {},
           "position": position, "skips": {"decode": 1}, "rng": rng}
    torch.save(old, tmp_path / "step_00000005.pt")
    payload = Checkpointer.load(tmp_path / "step_00000005.pt")
    assert payload["version"] == 3 and payload["step"] == 5 and payload["objective"] == {}
    state = payload["train_state"]
    assert torch.equal(state.pop("rng")["torch"], rng["torch"])
    assert state == {**position, "skips": {"decode": 1}}
    weights_only = {key: old[key] for key in ("format", "version", "model_name", "model", "config")}
    torch.save(weights_only, tmp_path / "model.pt")
    assert load_checkpoint(tmp_path / "model.pt")["step"] is None


# `dreamlip train ARGV` that, once the checkpoint of step argv[1] is on disk, says so and waits
# forever: the test kills it at a known step, whatever the machine's speed.
_HOLD_AFTER_SAVE = """
import sys, threading
from dreamlip.checkpoint import Checkpointer
from dreamlip.cli import main
hold_at, real_save = int(sys.argv[1]), Checkpointer.save
def save_then_hold(self, payload, **state):
    path = real_save(self, payload, **state)
    if payload["step"] == hold_at:
        print("saved", hold_at, flush=True)
        threading.Event().wait()
    return path
Checkpointer.save = save_then_hold
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("reader, objective", [("jsonl", "dreamlip"), ("wds", "dreamlip"), ("jsonl", "siglip"), ("jsonl", "flair")],
                         ids=["jsonl", "wds", "siglip", "flair"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path, reader, objective):
    """4 batches per epoch and a checkpoint every 5 steps: the resume lands mid-epoch. Shards are
    streamed by 2 workers with a shuffle buffer, so the resumed readers must replay their streams.
    SigLIP's bias, an objective parameter, must resume with the weights and its optimizer state."""
    settings = {"optim.max_steps": 40, "run.save_every": 5, "loss.objective": objective}
    if objective == "flair":  # its pooler and bias resume, and its caption sampling replays mid-epoch
        settings["captions.sampling"] = "flair"
    if reader == "wds":
        write_shards(read_jsonl(data_dir / "train.jsonl"), str(tmp_path / "shards" / "%d.tar"), maxcount=16)
        settings |= {"data.train": f"wds:{tmp_path}/shards/{{0..3}}.tar", "data.workers": 2, "data.shuffle_buffer": 8}
    args = ["train", "--out"]
    overrides = [item for o in _overrides(data_dir, **settings) for item in ("--set", o)]
    straight = tmp_path / "straight"
    subprocess.run(_cli(*args, str(straight), *overrides), check=True, capture_output=True)

    killed = tmp_path / "killed"
    command = [sys.executable, "-c", _HOLD_AFTER_SAVE, "10", *args, str(killed), *overrides]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout.readline().strip() == b"saved 10"  # the run now waits, mid-epoch, to be killed
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "model.pt").exists()
    interrupted_at = load_checkpoint(Checkpointer(killed / "checkpoints").latest())["train_state"]
    assert (interrupted_at["step"], interrupted_at["batch_in_epoch"]) == (10, 2)  # 4 batches an epoch
    if reader == "wds":
        assert len(interrupted_at["records_read"][0]) == 2  # one count per reader

    subprocess.run(_cli(*args, str(killed), *overrides, "--resume", "latest"), check=True, capture_output=True)
    resumed, reference = load_checkpoint(killed / "model.pt"), load_checkpoint(straight / "model.pt")
    assert reference["objective"]
    for part in ("model", "objective"):
        for name, tensor in reference[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name}"
    assert [m["step"] for m in _metrics(killed)] == list(range(1, 41))  # re-run steps logged once


_KILLED_SAVE = """
import sys, time, torch
from dreamlip import checkpoint
real_save = torch.save
def slow_save(obj, handle, *args, **kwargs):
    handle.write(b"partial bytes of a checkpoint")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
checkpoint.save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(2)}, "step": 2})
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory / "step_00000001.pt", {"model": {"w": torch.zeros(2)}, "step": 1})
    process = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(directory / "step_00000002.pt")], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (directory / "step_00000002.pt").exists()
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".step_00000002.pt.")]
    assert leftovers, "a partial temp file was left"
    checkpointer = Checkpointer(directory)
    latest = checkpointer.latest()
    assert latest.name == "step_00000001.pt"
    assert torch.equal(load_checkpoint(latest)["model"]["w"], torch.zeros(2))
    (directory / "notes.txt").write_text("not ours to delete")
    assert checkpointer.remove_stale() == leftovers
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt", "step_00000001.pt"]


# The default cross-image negatives are each rank's own images unless gathered
# (tests/test_distributed_loss.py checks that form), so only gathered can equal one process.
@pytest.mark.distributed
@pytest.mark.parametrize("loss_settings", [{"loss.group_gather": True}, {"loss.objective": "siglip"}, {"loss.objective": "flair"}],
                         ids=["dreamlip", "siglip", "flair"])
def test_two_process_torchrun_matches_one_process(data_dir, tmp_path, loss_settings):
    single, double = tmp_path / "single", tmp_path / "double"
    common = {"optim.max_steps": 2, **loss_settings}
    one = [i for o in _overrides(data_dir, **common, **{"optim.batch_size": 16}) for i in ("--set", o)]
    two = [i for o in _overrides(data_dir, **common, **{"optim.batch_size": 8}) for i in ("--set", o)]
    subprocess.run(_cli("train", "--out", str(single), *one), check=True, capture_output=True)
    done = subprocess.run(torchrun_command("train", "--out", str(double), *two), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reference, distributed = _metrics(single), _metrics(double)
    assert [m["step"] for m in distributed] == [1, 2]
    assert distributed[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)
    assert distributed[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-4)


@pytest.mark.distributed
def test_fsdp2_with_accumulation_matches_one_process_and_resumes(data_dir, tmp_path):
    """2 ranks x 2 micro-batches of 4 under FSDP2 = one process with batches of 16: the same
    losses and, with gradient clipping on, the same weights; a resume from its (gathered)
    checkpoint ends where the uninterrupted run did."""
    # local_loss: each rank's temperature gradient is its own rows', so they must be averaged.
    # The image negatives need no gather (the gathered cross ones are the DDP test's).
    common = {"optim.max_steps": 4, "optim.grad_clip": 0.5, "run.save_every": 2, "loss.local_loss": True,
              "loss.group_negatives": "image"}
    # evaluation of a sharded model: the main rank evaluates a gathered copy
    common |= {"run.eval_every": 4, "run.eval_data": str(data_dir), "run.eval_tasks": ["retrieval"]}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one = [i for o in _overrides(data_dir, **common) for i in ("--set", o)]
    subprocess.run(_cli("train", "--out", str(single), *one), check=True, capture_output=True)
    two = [
        i
        for o in _overrides(data_dir, **common, **{"optim.batch_size": 4, "optim.accum_steps": 2, "run.strategy": "fsdp"})
        for i in ("--set", o)
    ]

    def run_sharded(*extra: str) -> None:
        done = subprocess.run(torchrun_command("train", "--out", str(sharded), *two, *extra), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FSDP2 (5 sharded modules" in done.stdout + done.stderr  # 2 + 2 blocks and the root

    run_sharded()
    reference, distributed = _metrics(single), _metrics(sharded)
    assert [m["step"] for m in distributed] == [1, 2, 3, 4, 4]
    for ours, theirs in zip(distributed[:4], reference[:4], strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert distributed[-1]["eval/retrieval/image_to_text_R@5"] == reference[-1]["eval/retrieval/image_to_text_R@5"]
    final = _weights(sharded / "model.pt")
    assert final.keys() == _weights(single / "model.pt").keys()
    for name, tensor in _weights(single / "model.pt").items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    (sharded / "checkpoints" / "step_00000004.pt").unlink()
    (sharded / "model.pt").unlink()
    run_sharded("--resume", "latest")
    for name, tensor in _weights(sharded / "model.pt").items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_fsdp2_keeps_an_objectives_pooler_replicated_and_matches_one_process(data_dir, tmp_path):
    """FLAIR's pooler (matrices the objective owns, run outside the model's forward) stays whole on
    every rank under FSDP2, its gradient averaged like DDP's: 2 sharded ranks of 8 train as one
    process of 16, pooler included."""
    common = {"optim.max_steps": 2, "optim.grad_clip": 0.5, "loss.objective": "flair"}
    one = [i for o in _overrides(data_dir, **common) for i in ("--set", o)]
    subprocess.run(_cli("train", "--out", str(tmp_path / "single"), *one), check=True, capture_output=True)
    two = [i for o in _overrides(data_dir, **common, **{"optim.batch_size": 8, "run.strategy": "fsdp"}) for i in ("--set", o)]
    done = subprocess.run(torchrun_command("train", "--out", str(tmp_path / "sharded"), *two), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for ours, theirs in zip(_metrics(tmp_path / "sharded"), _metrics(tmp_path / "single"), strict=True):
        for key in ("loss", "loss/tcs", "loss/mps"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    sharded, single = _weights(tmp_path / "sharded" / "model.pt"), _weights(tmp_path / "single" / "model.pt")
    assert "objective.pooler.attn.in_proj_weight" in single and sharded.keys() == single.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# SPARC's token-level grouping: its only negatives are a text's own tokens.
_TOKEN_GROUPING = {"group_granularity": "token", "group_negatives": "image"}


@pytest.mark.parametrize("loss_settings", [{}, _TOKEN_GROUPING, {"objective": "siglip"}, {"objective": "flair"}],
                         ids=["subcaption", "token", "siglip", "flair"])
def test_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path, loss_settings):
    """Two micro-batches of 8 must give the gradient of one batch of 16 (negatives span both)."""
    from dreamlip.captions import SubcaptionSampler
    from dreamlip.data.loader import build_train_loader
    from dreamlip.distributed import init_distributed, make_strategy
    from dreamlip.model import create_model, get_tokenizer
    from dreamlip.objectives import LossConfig, build_objective
    from dreamlip.train import TrainModule, TrainStep

    torch.manual_seed(0)
    model, transform, _ = create_model(MODEL)
    loader = build_train_loader(
        str(data_dir / "train.jsonl"), sampler=SubcaptionSampler(k=3), tokenizer=get_tokenizer(MODEL),
        batch_size=16, transform=transform,
    )
    batch = next(iter(loader))
    halves = [{k: batch[k][s] for k in ("images", "texts")} for s in (slice(0, 8), slice(8, 16))]
    longest = [int(half["texts"].argmax(-1).max()) for half in halves]
    assert longest[0] != longest[1], "the halves' token embeddings should differ in length (padded to concatenate)"
    strategy = make_strategy("ddp", init_distributed("cpu"))  # one process: the model as it is
    objective = build_objective(LossConfig(**loss_settings), text_slots=4, embed_dim=model.embed_dim)
    objective.set_run_length(1)  # the one step taken, as the trainer tells it
    unit = TrainModule(model, objective)
    strategy.wrap(unit)
    train_step = TrainStep(strategy)

    def gradients(micro_batches):
        unit.zero_grad(set_to_none=True)
        result = train_step(micro_batches)
        return float(result.loss.detach()), {n: p.grad.clone() for n, p in unit.named_parameters() if p.grad is not None}

    big_loss, big = gradients([{k: batch[k] for k in ("images", "texts")}])
    accumulated_loss, accumulated = gradients(halves)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-6)
    assert accumulated.keys() == big.keys() and any(name.startswith("objective.") for name in big)
    for name, grad in big.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Accumulation through the whole loop: the same first-step loss as one big batch.
    loss_config = {f"loss.{key}": value for key, value in loss_settings.items()}
    one = train(_config(data_dir, **{"optim.max_steps": 1, "optim.batch_size": 16, **loss_config}), tmp_path / "big")
    two = train(_config(data_dir, **{"optim.max_steps": 1, "optim.batch_size": 8, "optim.accum_steps": 2, **loss_config}), tmp_path / "accum")
    terms = [key for key in one["final"] if key.startswith("loss")]
    assert len(terms) > 1 and [key for key in two["final"] if key.startswith("loss")] == terms
    assert two["final"].get("logit_bias", 0.0) == pytest.approx(one["final"].get("logit_bias", 0.0), rel=1e-6)
    for key in terms:
        assert two["final"][key] == pytest.approx(one["final"][key], rel=1e-5), key


def test_token_grouping_trains_with_a_finite_group_term(data_dir, tmp_path):
    loss_config = {f"loss.{key}": value for key, value in _TOKEN_GROUPING.items()}
    train(_config(data_dir, **{"optim.max_steps": 3, **loss_config}), tmp_path / "subcaptions")
    groups = [m["loss/group"] for m in _metrics(tmp_path / "subcaptions")]
    assert len(groups) == 3 and all(g is not None and math.isfinite(g) and g > 0 for g in groups), groups
    # The raw caption's tokens alone (K = 0) are grouped too, SPARC's own setting.
    single = train(_config(data_dir, **{"optim.max_steps": 1, "captions.k": 0, "loss.group_slots": "all", **loss_config}), tmp_path / "raw")
    assert math.isfinite(single["final"]["loss/group"])
    with pytest.raises(ValueError, match="token-level grouping supports group_negatives=image"):
        train(_config(data_dir, **{"loss.group_granularity": "token"}), tmp_path / "bad")


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_loss(data_dir, tmp_path):
    from dreamlip.model import create_model

    model = create_model(MODEL)[0]
    model.clip.set_grad_checkpointing(True)
    calls = []
    model.clip.visual.transformer.resblocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    out = model(torch.randn(2, 3, 32, 32), torch.ones(2, 1, 5, dtype=torch.long))
    out.image_emb.sum().backward()
    assert len(calls) == 2, "a checkpointed block runs its forward again during backward"

    plain = train(_config(data_dir, **{"optim.max_steps": 2}), tmp_path / "plain")
    checkpointed = train(_config(data_dir, **{"optim.max_steps": 2, "model.grad_checkpointing": True}), tmp_path / "ckpt")
    assert checkpointed["final"]["loss"] == pytest.approx(plain["final"]["loss"], rel=1e-5)


def test_text_packing_is_refused_under_fsdp(data_dir, tmp_path):
    """FSDP2 gathers a block's weights when the block is called; the packed path calls its layers."""
    with pytest.raises(ValueError, match="model.text_packing runs the text blocks' layers directly"):
        train(_config(data_dir, **{"run.strategy": "fsdp", "model.text_packing": True}), tmp_path / "run")


def test_text_packing_auto_packs_a_plain_run_and_falls_back_under_fsdp(data_dir, tmp_path, monkeypatch):
    """auto (the default): the packed text tower where it applies; with run.strategy=fsdp, which true
    refuses (above), the bucketed path instead."""
    from dreamlip.model import DreamLIPModel

    packed_calls = []
    packed = DreamLIPModel._packed_text_transformer

    def counted(self, parts):
        packed_calls.append(len(parts))
        return packed(self, parts)

    monkeypatch.setattr(DreamLIPModel, "_packed_text_transformer", counted)
    train(_config(data_dir, **{"optim.max_steps": 1}), tmp_path / "plain")
    assert packed_calls
    packed_calls.clear()
    train(_config(data_dir, **{"optim.max_steps": 1, "run.strategy": "fsdp"}), tmp_path / "fsdp")
    assert packed_calls == []


def test_bf16_autocast_trains_with_fp32_weights(data_dir, tmp_path):
    """The GPU default (bf16 autocast, fp32 master weights), exercised on CPU's bf16 autocast."""
    # the grouping weight constant, so the summed loss falls as training goes
    constant = {"optim.max_steps": 12, "loss.group_warmup_fraction": 0.0}
    fp32 = train(_config(data_dir, **constant, **{"run.precision": "fp32"}), tmp_path / "fp32")
    bf16 = train(_config(data_dir, **constant, **{"run.precision": "bf16"}), tmp_path / "bf16")
    first = {name: _metrics(tmp_path / name)[0] for name in ("fp32", "bf16")}
    assert first["bf16"]["loss"] != first["fp32"]["loss"], "autocast did not run in bf16"
    assert first["bf16"]["loss"] == pytest.approx(first["fp32"]["loss"], rel=5e-3)
    assert first["bf16"]["loss/group"] == pytest.approx(first["fp32"]["loss/group"], rel=5e-3)
    assert bf16["final"]["loss"] < first["bf16"]["loss"] - 0.1
    assert bf16["final"]["loss"] == pytest.approx(fp32["final"]["loss"], rel=1e-2)
    assert {t.dtype for t in _weights(tmp_path / "bf16" / "model.pt").values()} == {torch.float32}


def test_fine_tuning_starts_from_open_clip_weights(data_dir, tmp_path):
    from dreamlip.model import create_model

    torch.manual_seed(123)  # not the run's seed: different from the run's own initialisation
    pretrained = create_model(MODEL)[0].clip.state_dict()
    torch.save(pretrained, tmp_path / "open_clip.pt")
    config = _config(data_dir, **{"optim.max_steps": 1, "optim.lr": 0.0, "model.pretrained": str(tmp_path / "open_clip.pt")})
    train(config, tmp_path / "run")
    weights = _weights(tmp_path / "run" / "model.pt")
    for name, tensor in pretrained.items():
        assert torch.equal(weights[f"clip.{name}"], tensor), name
    mismatched = _config(data_dir, **{"model.name": "DreamLIP-ViT-Tiny-64", "model.pretrained": str(tmp_path / "open_clip.pt")})
    with pytest.raises(ValueError, match="does not fit"):
        train(mismatched, tmp_path / "bad")


def test_plain_clip_variant_trains_without_grouping(data_dir, tmp_path):
    config = apply_variant(_config(data_dir, **{"optim.max_steps": 2}), "clip")
    summary = train(config, tmp_path)
    assert "loss/group" not in summary["final"] and summary["final"]["loss"] == summary["final"]["loss/mpcl"]
    assert config.captions.k == 0


def test_grouping_weight_warms_up_linearly(data_dir, tmp_path):
    """With group_warmup_steps=W optimizer step n weighs the grouping term min(1, n / W) * w: the
    first step of W = 4 at w = 0.5 is the step of w = 0.125 without warm-up (the ramp itself is
    tests/test_losses.py's), and the logged terms add up to the loss."""
    train(_config(data_dir, **{"optim.max_steps": 3, "loss.group_warmup_steps": 4, "loss.group_weight": 0.5}), tmp_path / "ramp")
    train(_config(data_dir, **{"optim.max_steps": 1, "loss.group_weight": 0.125}), tmp_path / "fixed")
    ramp, fixed = _metrics(tmp_path / "ramp"), _metrics(tmp_path / "fixed")
    assert ramp[0]["loss/group"] == fixed[0]["loss/group"] and ramp[0]["loss"] == fixed[0]["loss"]
    for m in ramp:
        assert m["loss"] == pytest.approx(m["loss/mpcl"] + m["loss/group"], rel=1e-6), m["step"]


def test_a_warm_up_over_a_share_of_the_run_follows_the_runs_length(data_dir, tmp_path):
    """The trainer tells the objective the run's length: half of a 4-step run ramps as 2 steps do."""
    train(_config(data_dir, **{"optim.max_steps": 4, "loss.group_warmup_fraction": 0.5}), tmp_path / "share")
    train(_config(data_dir, **{"optim.max_steps": 4, "loss.group_warmup_steps": 2}), tmp_path / "steps")
    share, steps = _metrics(tmp_path / "share"), _metrics(tmp_path / "steps")
    assert [m["loss/group"] for m in share] == [m["loss/group"] for m in steps]
    assert [m["loss"] for m in share] == [m["loss"] for m in steps]


def test_global_temperature_grouping_leaves_the_local_one_untrained(data_dir, tmp_path):
    config = _config(data_dir, **{"optim.max_steps": 3, "loss.group_temperature": "global"})
    summary = train(config, tmp_path)
    assert "loss/group" in summary["final"] and "local_logit_scale" in summary["final"]
    assert float(load_checkpoint(tmp_path / "model.pt")["objective"]["local_logit_scale"]) == pytest.approx(math.log(1 / 0.07))


def test_local_temperature_starts_and_is_clamped_where_configured(data_dir, tmp_path):
    config = _config(data_dir, **{"optim.max_steps": 3, "loss.group_temperature_init": 0.0125, "loss.group_temperature_min": 0.0125})
    train(config, tmp_path)
    scales = [m["local_logit_scale"] for m in _metrics(tmp_path) if "loss" in m]
    assert len(scales) == 3 and scales == pytest.approx([80.0] * 3, rel=1e-2)  # starts at 1 / 0.0125
    assert max(scales) <= 80.0 * (1 + 1e-6)  # and is clamped there
    with pytest.raises(ValueError, match="below loss.group_temperature_min"):
        train(_config(data_dir, **{"loss.group_temperature_init": 0.01, "loss.group_temperature_min": 0.02}), tmp_path / "bad")
    with pytest.raises(ValueError, match="must be above 0"):
        _config(data_dir, **{"loss.group_temperature_init": 0})


def test_evaluation_every_n_steps_lands_in_the_metrics(data_dir, tmp_path):
    config = _config(data_dir, **{"optim.max_steps": 4, "run.eval_every": 2, "run.eval_data": str(data_dir)})
    config.run.eval_tasks = ["zeroshot", "retrieval"]
    train(config, tmp_path)
    evaluations = [m for m in _metrics(tmp_path) if "eval/zeroshot/top1" in m]
    assert [m["step"] for m in evaluations] == [2, 4]
    # The last evaluation saw the final weights: evaluating model.pt afterwards gives its numbers.
    from dreamlip.eval import build_tasks, evaluate
    from dreamlip.loading import load_model

    loaded = load_model(tmp_path / "model.pt")
    after = evaluate(loaded.model, loaded.tokenizer, loaded.eval_transform, build_tasks(data_dir, ["zeroshot", "retrieval"]), progress=False)
    for key in ("zeroshot/top1", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@5"):
        assert evaluations[-1][f"eval/{key}"] == pytest.approx(after[key]), key


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5) and schedule(110) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_and_temperatures():
    from dreamlip.model import create_model
    from dreamlip.objectives import DreamLIPObjective
    from dreamlip.train import TrainModule

    unit = TrainModule(create_model(MODEL)[0], DreamLIPObjective())
    decayed, plain = parameter_groups(unit, 0.2, lr=1e-3)
    names = {id(p): n for n, p in unit.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"model.clip.logit_scale", "objective.local_logit_scale", "model.clip.ln_final.weight", "model.clip.ln_final.bias"} <= plain_names
    assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.2
    assert decayed["lr"] == plain["lr"] == 1e-3


def test_the_losss_scales_and_biases_learn_at_their_own_lr(data_dir, tmp_path):
    """``optim.logit_lr_multiplier`` puts the scale and bias in a group of their own at m x lr; Adam's
    first step is lr x sign(gradient), so they move m times as far in it, from the same loss."""
    from dreamlip.model import create_model
    from dreamlip.objectives import SigLIPObjective
    from dreamlip.train import TrainModule

    unit = TrainModule(create_model(MODEL)[0], SigLIPObjective())
    groups = parameter_groups(unit, 0.2, lr=1e-3, logit_lr_multiplier=50)
    names = {id(p): n for n, p in unit.named_parameters()}
    fast = [g for g in groups if g["lr"] == 50e-3]
    assert len(groups) == 3 and len(fast) == 1 and fast[0]["weight_decay"] == 0.0
    assert {names[id(p)] for p in fast[0]["params"]} == {"model.clip.logit_scale", "objective.logit_bias"}

    first = {}
    for multiplier in (1, 50):
        run = tmp_path / f"m{multiplier}"
        train(_config(data_dir, **{"optim.max_steps": 1, "loss.objective": "siglip", "optim.logit_lr_multiplier": multiplier}), run)
        first[multiplier] = _metrics(run)[0]
    assert first[1]["loss"] == first[50]["loss"]
    start = -math.log(_config(data_dir).optim.batch_size - 1)  # the bias's default start, the batch's prior
    bias_moved = {m: first[m]["logit_bias"] - start for m in first}
    scale_moved = {m: math.log(first[m]["logit_scale"] / 10) for m in first}  # logged as exp(t') from t' = log 10
    assert bias_moved[50] == pytest.approx(50 * bias_moved[1], rel=1e-3)
    assert scale_moved[50] == pytest.approx(50 * scale_moved[1], rel=1e-3)


def test_presets_and_bad_overrides():
    assert load_config("vit-b-16").optim.warmup_steps == 10_000
    assert load_config("demo", overrides=["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("vit-z")
    with pytest.raises(ValueError, match="optim has"):
        load_config(overrides=["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(overrides=["optim.lr=fast"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        train(TrainConfig(), tmp_path)
    done = subprocess.run(_cli("train", "--out", str(tmp_path), "--data", str(tmp_path / "nope.jsonl")), capture_output=True, text=True)
    assert done.returncode != 0 and "nope.jsonl" in done.stderr and "Traceback" not in done.stderr


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()  # applies the purge a resumed writer asks for (SummaryWriter's purge_step)
    return [event.step for event in events.Scalars(tag)]


def test_resume_logs_read_as_one_run(data_dir, tmp_path):
    """Steps after the last checkpoint run twice (here: the run "died" after step 6 with its
    checkpoint at 4); metrics.jsonl and tensorboard must still hold each step once."""
    settings = {"optim.max_steps": 6, "run.save_every": 4, "run.keep_checkpoints": 5}
    train(_config(data_dir, **settings), tmp_path)
    (tmp_path / "checkpoints" / "step_00000006.pt").unlink()
    (tmp_path / "model.pt").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 1.')  # torn by the kill
    stale = tmp_path / "checkpoints" / ".step_00000008.pt.k2j4.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(_config(data_dir, **settings), tmp_path, resume="latest")
    assert not stale.exists(), "a save's leftover temp file survived the restart"
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(tmp_path, "train/loss") == [1, 2, 3, 4, 5, 6]


def test_resume_before_the_first_checkpoint_restarts_the_logs(data_dir, tmp_path):
    train(_config(data_dir, **{"optim.max_steps": 3}), tmp_path)
    for path in (*(tmp_path / "checkpoints").iterdir(), tmp_path / "model.pt"):
        path.unlink()  # as if killed before its first save
    train(_config(data_dir, **{"optim.max_steps": 3}), tmp_path, resume="latest")
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]
    assert _tensorboard_steps(tmp_path, "train/loss") == [1, 2, 3]


def test_resume_refuses_changes_that_break_exactness(data_dir, tmp_path):
    train(_config(data_dir, **{"optim.max_steps": 2, "run.save_every": 2}), tmp_path)
    original = (tmp_path / "config.yaml").read_text()
    changed = _config(data_dir, **{"optim.max_steps": 2, "optim.batch_size": 8, "model.name": "DreamLIP-ViT-Tiny-64"})
    with pytest.raises(ValueError) as refused:
        train(changed, tmp_path, resume="latest")
    message = str(refused.value)
    assert "step_00000002.pt" in message
    assert "model.name: 'DreamLIP-ViT-Nano-32' -> 'DreamLIP-ViT-Tiny-64'" in message
    assert "optim.batch_size: 16 -> 8" in message
    assert "state_dict" not in message and "size mismatch" not in message
    assert (tmp_path / "config.yaml").read_text() == original
    assert not (tmp_path / "config-history").exists()
    # Through the CLI: one message, no traceback.
    args = [i for o in _overrides(data_dir, **{"optim.max_steps": 2, "optim.batch_size": 8}) for i in ("--set", o)]
    done = subprocess.run(_cli("train", "--out", str(tmp_path), *args, "--resume", "latest"), capture_output=True, text=True)
    assert done.returncode == 2 and "optim.batch_size: 16 -> 8" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ValueError, match="holds weights only"):
        train(_config(data_dir, **{"optim.max_steps": 2}), tmp_path, resume=str(tmp_path / "model.pt"))


def test_resume_accepts_and_logs_safe_changes(data_dir, tmp_path, capsys):
    train(_config(data_dir, **{"optim.max_steps": 2, "run.save_every": 2}), tmp_path)
    original = (tmp_path / "config.yaml").read_text()
    resumed = _config(data_dir, **{"optim.max_steps": 4, "run.save_every": 2, "run.keep_checkpoints": 3})
    summary = train(resumed, tmp_path, resume="latest")
    assert summary["steps"] == 4
    assert "optim.max_steps: 2 -> 4" in capsys.readouterr().out
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (tmp_path / "config.yaml").read_text() == original  # the run's first config stays
    history = tmp_path / "config-history" / "resume-step_00000002.yaml"
    text = history.read_text()
    assert "# optim.max_steps: 2 -> 4" in text and "# run.keep_checkpoints: 2 -> 3" in text
    assert load_config(config_file=history).optim.max_steps == 4
    # The schedule decays to 0 at the new end (the old one had reached 0 at step 2).
    assert metrics[2]["lr"] == pytest.approx(2e-3 * WarmupCosine(2, 4)(3)) == pytest.approx(1e-3)


@pytest.mark.slow
def test_compiled_training_matches_eager_keeps_plain_names_and_resumes(data_dir, tmp_path, monkeypatch):
    """run.compile goes through torch.compile; here with the aot_eager backend (dynamo's graphs and
    AOTAutograd's joint graph, run by eager kernels), as inductor takes minutes to compile the
    bucketed text tower's shapes on a 2-core CPU. The losses equal eager's to a relative 1e-6;
    checkpoints name the weights as an eager run does, and a compiled run resumes from its own
    checkpoint onto the eager run's second step."""
    compile_calls = []

    def aot_eager(module, **options):
        compile_calls.append(type(module).__name__)
        return torch_compile(module, backend="aot_eager", **options)

    torch_compile = torch.compile
    monkeypatch.setattr(torch, "compile", aot_eager)
    # the grouping weight and text gradient constant: the compiled run's first leg is a shorter run, which would reach them sooner
    settings = {"optim.max_steps": 2, "run.save_every": 1, "loss.group_warmup_fraction": 0.0, "loss.group_text_grad_start": 0.0}
    train(_config(data_dir, **settings), tmp_path / "eager")
    assert compile_calls == []
    compiled = {**settings, "run.compile": True}
    train(_config(data_dir, **{**compiled, "optim.max_steps": 1}), tmp_path / "compiled")
    train(_config(data_dir, **compiled), tmp_path / "compiled", resume="latest")
    assert compile_calls == ["TrainModule", "TrainModule"]
    eager, resumed = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert [m["step"] for m in resumed] == [1, 2]
    for reference, record in zip(eager, resumed, strict=True):
        for term in ("loss", "loss/mpcl", "loss/group"):
            assert record[term] == pytest.approx(reference[term], rel=1e-6), (record["step"], term)
    for name in ("checkpoints/step_00000001.pt", "model.pt"):
        reference, weights = _weights(tmp_path / "eager" / name), _weights(tmp_path / "compiled" / name)
        assert list(weights) == list(reference) and not any("_orig_mod" in key for key in weights)
        for key, tensor in weights.items():
            torch.testing.assert_close(tensor, reference[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
def test_compiled_ddp_step_compiles_ddps_wrapper_and_equals_eager(tmp_path, tokenizer, monkeypatch):
    """Under DDP, run.compile compiles DDP's wrapper (not the module inside it), so dynamo's DDP
    optimizer splits the graph at the gradient buckets; the step's loss and gradients equal an
    eager DDP step's (aot_eager backend, as above; a one-rank gloo group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dreamlip.distributed import DDPStrategy, DistEnv
    from dreamlip.model import create_model
    from dreamlip.objectives import LossConfig, build_objective
    from dreamlip.train import TrainModule, TrainStep

    torch_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **options: torch_compile(module, backend="aot_eager", **options))
    captions = ["a red cube.", "two small blue spheres on grass.", "a cube.", "the green cone left of a yellow ring."]
    batch = {"images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             "texts": tokenizer(captions * 2).view(4, 2, -1)}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        results = {}
        for compile in (False, True):
            torch.manual_seed(0)
            model = create_model(MODEL)[0]
            strategy = DDPStrategy(env)
            strategy.wrap(TrainModule(model, build_objective(LossConfig(), text_slots=2, embed_dim=model.embed_dim)), compile=compile)
            result = TrainStep(strategy)([batch])
            grads = {name: p.grad.clone() for name, p in strategy.model.named_parameters() if p.grad is not None}
            results[compile] = (result.loss.detach().item(), grads, list(strategy.model_state_dict()), strategy.net)
            del strategy  # DDP's reducer holds the process group: released before the group is destroyed
        (eager_loss, eager_grads, eager_names, _), (loss, grads, names, net) = results[False], results[True]
        assert isinstance(net._orig_mod, DistributedDataParallel)
        assert names == eager_names and loss == pytest.approx(eager_loss, rel=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        results.clear()
        dist.destroy_process_group()
