"""COSMOS: its loss terms against a loop reference from the paper's equations, the EMA teacher, the
multi-crop views and text crops (deterministic per seed, epoch and key), and training: exact
resume after SIGKILL, 2 processes equal to 1, accumulation equal to the big batch."""

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import NANO as MODEL
from conftest import cli_command as _cli
from conftest import run_cli, torchrun_command
from dreamlip.captions import SubcaptionSampler, split_sentences
from dreamlip.checkpoint import Checkpointer, load_checkpoint
from dreamlip.config import apply_variant
from dreamlip.data.loader import SampleLoader, build_train_loader
from dreamlip.data.records import Record, read_jsonl
from dreamlip.data.shards import write_shards
from dreamlip.model import create_model, get_tokenizer
from dreamlip.objectives import OBJECTIVES, COSMOSObjective, LossConfig, build_objective
from dreamlip.objectives.cosmos import _encode_local_views
from dreamlip.train import train
from dreamlip.views import TextCropSampler, local_crop_size, view_sampler_and_transform
from test_train import _HOLD_AFTER_SAVE, _config, _metrics, _overrides

DIM, HEADS = 8, 2


# ---------------------------------------------------------------- the loss, from the paper's equations


def _layer_norm(x, norm):
    mean = sum(x) / len(x)
    variance = sum((v - mean) ** 2 for v in x) / len(x)
    weights, biases = norm.weight.detach().tolist(), norm.bias.detach().tolist()
    return [(v - mean) / math.sqrt(variance + norm.eps) * w + b for v, w, b in zip(x, weights, biases)]


def _matvec(matrix, bias, x):
    matrix, bias = matrix.detach(), bias.detach()
    return [sum(float(matrix[r, c]) * x[c] for c in range(len(x))) + float(bias[r]) for r in range(matrix.shape[0])]


def _attend(pooler, query, tokens, valid):
    """softmax(q k / sqrt(d)) v per head over the valid tokens, then the output projection."""
    attn = pooler.attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = _matvec(w_q, b_q, _layer_norm(query, pooler.ln_q))
    keys = [_layer_norm(token, pooler.ln_k) for token in tokens]
    k = [_matvec(w_k, b_k, key) for key in keys]
    v = [_matvec(w_v, b_v, key) for key in keys]
    head_dim = DIM // HEADS
    out = []
    for h in range(HEADS):
        dims = range(h * head_dim, (h + 1) * head_dim)
        scores = {j: sum(q[d] * k[j][d] for d in dims) / math.sqrt(head_dim) for j in range(len(tokens)) if valid[j]}
        top = max(scores.values())
        weights = {j: math.exp(s - top) for j, s in scores.items()}
        total = sum(weights.values())
        out += [sum(weights[j] / total * v[j][d] for j in weights) for d in dims]
    return _matvec(attn.out_proj.weight, attn.out_proj.bias, out)


def _unit(x):
    norm = math.sqrt(sum(v * v for v in x))
    return [v / norm for v in x]


def _infonce(a, b, scale):
    """CLIP's loss between paired lists of unit vectors: (CE over b for each a + CE over a for each b) / 2."""
    n = len(a)
    dot = [[scale * sum(x * y for x, y in zip(a[i], b[j])) for j in range(n)] for i in range(n)]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(v) for v in rows[i])) for i in range(n)) / n

    return (ce(dot) + ce([[dot[j][i] for j in range(n)] for i in range(n)])) / 2


def _reference(objective, outputs):
    """L_clip and L_distill from COSMOS's equations, one sample, view and pair at a time."""
    views, texts = outputs["view_features"].tolist(), outputs["text_features"].tolist()
    n = len(views)
    image_cross, text_cross = [], []
    for i in range(n):
        captions = [_matvec(objective.text_token_mapping.weight, objective.text_token_mapping.bias, t)
                    for t in outputs["caption_tokens"][i].tolist()]
        patches = [_matvec(objective.image_token_mapping.weight, objective.image_token_mapping.bias, p)
                   for p in outputs["patch_tokens"][i].tolist()]
        valid = outputs["caption_mask"][i].tolist()
        image_cross.append([_unit([a + b for a, b in zip(view, _attend(objective.caption_pool, view, captions, valid))])
                            for view in views[i]])
        text_cross.append([_unit([a + b for a, b in zip(text, _attend(objective.patch_pool, text, patches, [True] * len(patches)))])
                           for text in texts[i]])
    scale = min(math.exp(float(outputs["logit_scale"])), 100)
    clip_pairs = [_infonce([_unit(views[i][v]) for i in range(n)], [_unit(texts[i][t]) for i in range(n)], scale)
                  for v in range(2) for t in range(len(texts[0]))]
    distill_scale = min(math.exp(float(objective.distill_logit_scale.detach())), 100)
    teachers = [outputs["teacher_image_emb"].tolist(), outputs["teacher_text_emb"].tolist()]
    distill = 0.0
    for student in (image_cross, text_cross):
        for teacher in teachers:
            pairs = [_infonce([student[i][s] for i in range(n)], [teacher[i][r] for i in range(n)], distill_scale)
                     for s in range(len(student[0])) for r in range(2)]
            distill += sum(pairs) / len(pairs)
    return sum(clip_pairs) / len(clip_pairs), distill / 4


def _outputs(batch=4, views=5, texts=4, patches=3, length=6, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    lengths = torch.tensor([6, 2, 4, 3])[:batch]  # keys up to a caption's end token; the rest is padding
    return {
        "view_features": randn(batch, views, DIM),
        "text_features": randn(batch, texts, DIM),
        "patch_tokens": randn(batch, patches, DIM),
        "caption_tokens": randn(batch, length, DIM),
        "caption_mask": torch.arange(length) < lengths.unsqueeze(1),
        "teacher_image_emb": F.normalize(randn(batch, 2, DIM), dim=-1),
        "teacher_text_emb": F.normalize(randn(batch, 2, DIM), dim=-1),
        "logit_scale": torch.tensor(2.3, dtype=torch.float64),
    }


def _objective(**settings):
    torch.manual_seed(0)
    objective = COSMOSObjective(DIM, cosmos_pool_heads=HEADS, **settings).double()
    with torch.no_grad():  # away from the start: layer norms not identities, the temperature not CLIP's
        for param in objective.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return objective


def test_terms_equal_a_loop_reference_from_the_papers_equations():
    objective = _objective(cosmos_clip_weight=0.7, cosmos_distill_weight=1.3)
    outputs = _outputs()
    with torch.no_grad():
        terms = objective(outputs)
    clip, distill = _reference(objective, outputs)
    assert list(terms) == ["clip", "distill"]
    assert float(terms["clip"]) == pytest.approx(0.7 * clip, rel=1e-9)
    assert float(terms["distill"]) == pytest.approx(1.3 * distill, rel=1e-9)


def test_padding_of_the_caption_tokens_is_not_attended():
    objective, outputs = _objective(), _outputs()
    padded = dict(outputs, caption_tokens=outputs["caption_tokens"].masked_fill(~outputs["caption_mask"].unsqueeze(-1), 1e3))
    torch.testing.assert_close(objective.cross_modal(padded), objective.cross_modal(outputs), rtol=0, atol=0)


def test_the_distillation_temperature_is_clamped_at_100_and_trains():
    objective = _objective()
    with torch.no_grad():
        objective.distill_logit_scale.fill_(7.0)
    objective.clamp_parameters()
    assert float(objective.distill_logit_scale.detach()) == pytest.approx(math.log(100))
    sum(objective(_outputs()).values()).backward()
    assert objective.distill_logit_scale.grad is not None and objective.caption_pool.attn.in_proj_weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the EMA teacher


@pytest.mark.parametrize("schedule", ["fixed", "cosine"])
def test_the_teacher_follows_the_student_by_ema(schedule):
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).double()
    objective = COSMOSObjective(DIM, cosmos_momentum=0.9, cosmos_momentum_schedule=schedule, cosmos_pool_heads=HEADS)
    objective.bind(student)
    assert all(not p.requires_grad for p in objective.teacher.parameters())
    expected = [p.detach().clone() for p in student.parameters()]
    total = 4
    for step in range(total):
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn_like(param))
        momentum = 0.9 if schedule == "fixed" else 1 - 0.1 * (1 + math.cos(math.pi * step / total)) / 2
        objective.after_backward(student, step, total)
        expected = [momentum * t + (1 - momentum) * s.detach() for t, s in zip(expected, student.parameters())]
        assert float(objective.momentum) == pytest.approx(momentum, rel=1e-12)
    for ours, theirs in zip(objective.teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # the schedule's ends: COSMOS's cosine_scheduler(m, 1, 0, total)
    assert (objective.momentum_at(0, 10), objective.momentum_at(10, 10)) == ((0.9, 0.9) if schedule == "fixed" else (0.9, 1.0))


def test_a_checkpointed_teacher_is_dropped_when_loaded_without_a_student():
    objective = _objective()
    objective.bind(torch.nn.Linear(2, 2).double())
    fresh = COSMOSObjective(DIM, cosmos_pool_heads=HEADS).double()
    fresh.load_state_dict(objective.state_dict())  # to evaluate: the student's encoders, no teacher
    assert fresh.teacher is None and torch.equal(fresh.distill_logit_scale, objective.distill_logit_scale)
    bound = COSMOSObjective(DIM, cosmos_pool_heads=HEADS).double()
    bound.bind(torch.nn.Linear(2, 2).double())
    bound.load_state_dict(objective.state_dict())  # to resume: the teacher too
    assert torch.equal(bound.teacher.weight, objective.teacher.weight)


def test_fsdp2_is_refused_with_why_and_other_objectives_need_no_views():
    with pytest.raises(ValueError, match="EMA teacher is a whole copy of the model.*run.strategy=ddp"):
        COSMOSObjective(DIM, cosmos_pool_heads=HEADS).check_strategy(sharded=True)
    COSMOSObjective(DIM, cosmos_pool_heads=HEADS).check_strategy(sharded=False)
    with pytest.raises(ValueError, match="captions.k=7"):
        COSMOSObjective(DIM, text_slots=2)
    # Only COSMOS asks the loader for views: every other objective keeps one image and K + 1 texts.
    built = {name: build_objective(LossConfig(objective=name), text_slots=8, embed_dim=64) for name in OBJECTIVES}
    assert [name for name, objective in built.items() if objective.views is not None] == ["cosmos"]


# ---------------------------------------------------------------- the views


def test_local_views_run_the_tower_with_its_positions_resized():
    model = create_model(MODEL)[0].eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        native = _encode_local_views(model, images)
        torch.testing.assert_close(native, model.encode_image(images, normalize=False)[0])
        small = _encode_local_views(model, images[:, :, :16, :16])
    assert small.shape == native.shape and not torch.allclose(small, native)
    assert (local_crop_size(224, 16), local_crop_size(64, 8), local_crop_size(32, 8), local_crop_size(16, 16)) == (96, 24, 16, 16)


def _pool_record(key="0007"):
    captions = {"a": {"short": "A dog on grass.", "long": "The dog is brown. It runs fast. The grass is green."},
                "b": {"short": "A brown dog.", "long": "A dog plays. The sky is blue."}}
    return Record(key=key, image=None, raw_caption="dog photo", captions=captions)


def test_text_crops_are_two_global_joins_then_single_pool_items():
    record = _pool_record()
    pool_sampler = SubcaptionSampler(k=7)
    pool = ["dog photo", *pool_sampler.pool(record.captions)]
    crops = TextCropSampler(pool_sampler, num_texts=8, seed=3)
    seen_lengths = set()
    for index in range(40):
        texts = crops.sample(record.raw_caption, record.captions, index=index, epoch=0)
        assert len(texts) == 8 and all(text in pool for text in texts[2:])
        assert len(set(texts[2:])) == 6  # without repeats while the pool (9 items) lasts
        for text in texts[:2]:
            pieces = split_sentences(text)
            assert 1 <= len(pieces) <= 5 and all(piece in pool or piece[:-1] in pool for piece in pieces), text
            seen_lengths.add(len(pieces))
        assert texts == crops.sample(record.raw_caption, record.captions, index=index, epoch=0)
    assert len(seen_lengths) >= 3
    assert crops.sample(record.raw_caption, record.captions, index=1, epoch=1) != crops.sample(record.raw_caption, record.captions, index=1, epoch=0)
    tiny = TextCropSampler(SubcaptionSampler(k=7), num_texts=8)
    assert sorted(tiny.sample("just this", None, index=0)[2:]) == ["just this"] * 6  # a pool of one repeats


def test_views_are_a_function_of_seed_epoch_and_key(data_dir):
    model = create_model(MODEL)[0]
    sampler, transform = view_sampler_and_transform(COSMOSObjective(64).views, SubcaptionSampler(k=7), model)
    load = SampleLoader(sampler, transform, seed=5)
    table = read_jsonl(data_dir / "train.jsonl")
    records = [table[i] for i in range(3)]
    first = [load(record, epoch=0) for record in records]
    again = [load(record, epoch=0) for record in reversed(records)][::-1]  # another order: the same views
    for a, b in zip(first, again):
        assert torch.equal(a["image"][0], b["image"][0]) and torch.equal(a["image"][1], b["image"][1]) and a["texts"] == b["texts"]
    global_views, local_views = first[0]["image"]
    assert global_views.shape == (2, 3, 32, 32) and local_views.shape == (6, 3, 16, 16)
    assert not torch.equal(global_views[0], global_views[1]) and not torch.equal(local_views[0], local_views[1])
    later = load(records[0], epoch=1)
    assert not torch.equal(later["image"][0], global_views)
    assert not torch.equal(SampleLoader(sampler, transform, seed=6)(records[0], epoch=0)["image"][0], global_views)


def test_the_loader_builds_the_same_view_batches_with_workers(data_dir):
    model = create_model(MODEL)[0]
    sampler, transform = view_sampler_and_transform(COSMOSObjective(64).views, SubcaptionSampler(k=7), model)

    def first_batch(workers):
        loader = build_train_loader(str(data_dir / "train.jsonl"), sampler=sampler, tokenizer=get_tokenizer(MODEL),
                                    batch_size=8, transform=transform, num_workers=workers, seed=1, epoch=2, start_batch=1)
        return next(iter(loader))

    plain, parallel = first_batch(0), first_batch(2)
    assert plain["images"].shape == (8, 2, 3, 32, 32) and plain["local_images"].shape == (8, 6, 3, 16, 16)
    assert plain["texts"].shape[:2] == (8, 8)
    for name in ("images", "local_images", "texts"):
        assert torch.equal(plain[name], parallel[name]), name


def test_a_sample_streamed_from_shards_gets_the_views_it_gets_from_jsonl(data_dir, tmp_path):
    model = create_model(MODEL)[0]
    sampler, transform = view_sampler_and_transform(COSMOSObjective(64).views, SubcaptionSampler(k=7, seed=4), model)
    table = read_jsonl(data_dir / "train.jsonl")
    write_shards(table, str(tmp_path / "%d.tar"), maxcount=16)
    loader = build_train_loader(f"wds:{tmp_path}/{{0..3}}.tar", sampler=sampler, tokenizer=get_tokenizer(MODEL),
                                batch_size=4, transform=transform, seed=2, shuffle_buffer=8)
    batch = next(iter(loader))
    by_key = {table[i].key: table[i] for i in range(len(table))}
    load = SampleLoader(sampler, transform, seed=2)
    for row, key in enumerate(batch["keys"]):
        sample = load(by_key[key], epoch=0)
        assert torch.equal(batch["images"][row], sample["image"][0]) and torch.equal(batch["local_images"][row], sample["image"][1])
        assert batch["raw_texts"][row] == sample["texts"]


# ---------------------------------------------------------------- training


def _cosmos_overrides(data_dir, **extra):
    return _overrides(data_dir, **{"loss.objective": "cosmos", "captions.k": 7, **extra})


@pytest.mark.slow
def test_cosmos_trains_evaluates_exports_and_serves(data_dir, tmp_path, capsys):
    config = apply_variant(_config(data_dir, **{"optim.max_steps": 16, "run.save_every": 16}), "cosmos")
    assert (config.captions.k, config.loss.objective) == (7, "cosmos")
    train(config, tmp_path / "run")
    metrics = _metrics(tmp_path / "run")
    first = metrics[0]
    assert [key for key in first if key.startswith("loss/")] == ["loss/clip", "loss/distill"]
    assert first["loss"] == pytest.approx(first["loss/clip"] + first["loss/distill"], rel=1e-6)
    assert first["momentum"] == 0.999 and first["distill_logit_scale"] == pytest.approx(1 / 0.07, rel=3e-3)
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")
    teacher = {name[len("teacher."):]: t for name, t in checkpoint["objective"].items() if name.startswith("teacher.")}
    assert teacher.keys() == checkpoint["model"].keys()
    moved = [name for name, t in teacher.items() if not torch.equal(t, checkpoint["model"][name])]
    assert moved  # the EMA lags the student

    assert run_cli("eval", "--checkpoint", tmp_path / "run" / "model.pt", "--data", data_dir, "--tasks", "retrieval",
                   "--out", tmp_path / "eval.json") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["objective"] == "cosmos"
    assert run_cli("export", "--checkpoint", tmp_path / "run" / "model.pt", "--out", tmp_path / "export") == 0
    capsys.readouterr()
    from dreamlip.loading import load_model
    from dreamlip.model import load_open_clip
    from dreamlip.serve.readouts import load_served_model

    clip, _, _ = load_open_clip().create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    for name, tensor in clip.state_dict().items():  # the student's plain encoders
        assert torch.equal(tensor, checkpoint["model"][f"clip.{name}"]), name
    loaded = load_model(tmp_path / "run" / "model.pt")
    assert loaded.objective.name == "cosmos" and loaded.objective.teacher is None
    served = load_served_model(tmp_path / "run" / "model.pt", "ckpt")
    with torch.no_grad():
        expected = loaded.model.encode_text(loaded.tokenizer(["a red star"])).numpy()
    np.testing.assert_allclose(served.encode_text("a red star"), expected, atol=1e-5, rtol=1e-5)


def _all_weights(path):
    payload = load_checkpoint(path)
    return payload["model"] | {f"objective.{name}": tensor for name, tensor in payload["objective"].items()}


def _straight_and_killed_then_resumed(data_dir, tmp_path, **settings):
    """The final weights of a straight 8-step run (a checkpoint every 3 steps) and of one SIGKILLed
    after its first checkpoint and resumed; the resume lands mid-epoch (4 batches an epoch)."""
    overrides = [item for o in _cosmos_overrides(data_dir, **{"optim.max_steps": 8, "run.save_every": 3, **settings})
                 for item in ("--set", o)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli("train", "--out", str(straight), *overrides), check=True, capture_output=True)
    process = subprocess.Popen([sys.executable, "-c", _HOLD_AFTER_SAVE, "3", "train", "--out", str(killed), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout.readline().strip() == b"saved 3"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert load_checkpoint(Checkpointer(killed / "checkpoints").latest())["train_state"]["batch_in_epoch"] == 3
    subprocess.run(_cli("train", "--out", str(killed), *overrides, "--resume", "latest"), check=True, capture_output=True)
    assert [m["loss"] for m in _metrics(killed)] == [m["loss"] for m in _metrics(straight)]
    reference, resumed = _all_weights(straight / "model.pt"), _all_weights(killed / "model.pt")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    return reference


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact_with_the_teacher(data_dir, tmp_path):
    """The teacher's weights and the momentum come back with the student's."""
    reference = _straight_and_killed_then_resumed(data_dir, tmp_path, **{"loss.cosmos_momentum_schedule": "cosine"})
    assert any(name.startswith("objective.teacher.") for name in reference) and "objective.momentum" in reference


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact_with_the_grouping_term_beside(data_dir, tmp_path):
    """``cosmos+dreamlip``: the combination's state (the teacher, both parts' temperatures) comes back
    whole, and the grouping term's ramp goes on where it stopped."""
    reference = _straight_and_killed_then_resumed(data_dir, tmp_path, **{"loss.objective": "cosmos+dreamlip"})
    assert "objective.parts.dreamlip.local_logit_scale" in reference
    assert any(name.startswith("objective.parts.cosmos.teacher.") for name in reference)


@pytest.mark.slow
def test_accumulation_equals_the_big_batch(data_dir, tmp_path):
    """2 micro-batches of 8 = one batch of 16: the views' negatives span both, and the teacher
    moves once per optimizer step."""
    common = {"optim.max_steps": 3, "optim.grad_clip": 0.5}
    train(_config(data_dir, **{"loss.objective": "cosmos", "captions.k": 7, **common}), tmp_path / "big")
    train(_config(data_dir, **{"loss.objective": "cosmos", "captions.k": 7, "optim.batch_size": 8, "optim.accum_steps": 2,
                               **common}), tmp_path / "accum")
    for ours, theirs in zip(_metrics(tmp_path / "accum"), _metrics(tmp_path / "big"), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    reference = _all_weights(tmp_path / "big" / "model.pt")
    for name, tensor in _all_weights(tmp_path / "accum" / "model.pt").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.distributed
def test_two_gloo_processes_equal_one_and_fsdp2_is_refused(data_dir, tmp_path):
    """The same losses and the same final student, objective and teacher (rank 0 saves it). Each
    rank's teacher embeds that rank's samples, so the distillation losses of steps 2 and 3 matching
    one process's says rank 1's teacher followed the same all-reduced student too."""
    common = {"optim.max_steps": 3}
    one = [i for o in _cosmos_overrides(data_dir, **common, **{"optim.batch_size": 16}) for i in ("--set", o)]
    two = [i for o in _cosmos_overrides(data_dir, **common, **{"optim.batch_size": 8}) for i in ("--set", o)]
    subprocess.run(_cli("train", "--out", str(tmp_path / "single"), *one), check=True, capture_output=True)
    done = subprocess.run(torchrun_command("train", "--out", str(tmp_path / "double"), *two), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for ours, theirs in zip(_metrics(tmp_path / "double"), _metrics(tmp_path / "single"), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    reference = _all_weights(tmp_path / "single" / "model.pt")
    for name, tensor in _all_weights(tmp_path / "double" / "model.pt").items():
        expected = reference[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias has no gradient (softmax ignores a shift shared by every key): Adam turns
            # the rounding that stands in for it into lr-sized steps, differently in 1 and 2 processes.
            width = len(tensor) // 3
            tensor, expected = torch.cat([tensor[:width], tensor[2 * width:]]), torch.cat([expected[:width], expected[2 * width:]])
        torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-5, msg=name)

    sharded = subprocess.run(torchrun_command("train", "--out", str(tmp_path / "fsdp"), *two, "--set", "run.strategy=fsdp"),
                             capture_output=True, text=True)
    assert sharded.returncode != 0 and "EMA teacher is a whole copy of the model" in sharded.stderr


def test_cosmos_combines_with_dreamlips_grouping_on_its_first_global_view():
    """``cosmos+dreamlip``: COSMOS encodes the views, and its one-view outputs are what the model gives
    its first global view and the text crops alone; the combination's terms are each part's own."""
    model = create_model(MODEL)[0].eval()
    config = LossConfig(objective="cosmos+dreamlip", objective_weights=[1.0, 0.5], global_weight=0.0,
                        group_warmup_fraction=0.0, group_text_grad_start=0.0, cosmos_pool_heads=HEADS)
    combination = build_objective(config, text_slots=8, embed_dim=model.embed_dim)
    assert combination.views is not None and combination.needs.patches
    combination.bind(model)
    generator = torch.Generator().manual_seed(5)
    images, local_images = torch.randn(3, 2, 3, 32, 32, generator=generator), torch.randn(3, 6, 3, 16, 16, generator=generator)
    texts = get_tokenizer(MODEL)([f"text {i} of image {j}" for j in range(3) for i in range(8)]).view(3, 8, -1)
    with torch.no_grad():
        outputs = combination.encode_views(model, images, local_images, texts)
        first_view, patches = model.encode_image(images[:, 0], with_patches=True)
        torch.testing.assert_close(outputs["image_emb"], first_view)
        torch.testing.assert_close(outputs["patch_emb"], patches)
        torch.testing.assert_close(outputs["text_emb"], model.encode_text(texts))
        terms = combination(outputs)
        cosmos, dreamlip = (combination.parts[name](outputs) for name in ("cosmos", "dreamlip"))
    assert list(terms) == ["cosmos/clip", "cosmos/distill", "dreamlip/mpcl", "dreamlip/group"]
    for name, value in cosmos.items():
        torch.testing.assert_close(terms[f"cosmos/{name}"], value)
    for name, value in dreamlip.items():
        torch.testing.assert_close(terms[f"dreamlip/{name}"], 0.5 * value)
    assert float(terms["dreamlip/mpcl"]) == 0.0 and float(terms["dreamlip/group"]) > 0


def test_only_one_part_builds_views_and_none_beside_it_reads_text_tokens():
    """Refused by name at build, never trained half-way."""
    with pytest.raises(ValueError, match="dreamlip reads text tokens, which cosmos's views do not carry"):
        build_objective(LossConfig(objective="cosmos+dreamlip", group_granularity="token", group_negatives="image"), 8, 64)


@pytest.mark.slow
def test_cosmos_with_the_grouping_term_trains_and_evaluates(data_dir, tmp_path):
    """The variant with ``loss.objective=cosmos+dreamlip``: every part's terms logged, the teacher
    following the student through the combination, and a checkpoint that evaluates (its teacher
    dropped by the COSMOS part)."""
    config = apply_variant(_config(data_dir, **{"optim.max_steps": 6, "run.save_every": 6}), "cosmos")
    config.loss.objective, config.loss.global_weight = "cosmos+dreamlip", 0.0
    train(config, tmp_path / "run")
    first = _metrics(tmp_path / "run")[0]
    terms = [key for key in first if key.startswith("loss/")]
    assert terms == ["loss/cosmos/clip", "loss/cosmos/distill", "loss/dreamlip/mpcl", "loss/dreamlip/group"]
    assert first["loss"] == pytest.approx(sum(first[key] for key in terms), rel=1e-6)
    checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")
    teacher = {name[len("parts.cosmos.teacher."):]: t for name, t in checkpoint["objective"].items()
               if name.startswith("parts.cosmos.teacher.")}
    assert teacher.keys() == checkpoint["model"].keys()
    assert any(not torch.equal(t, checkpoint["model"][name]) for name, t in teacher.items())
    assert run_cli("eval", "--checkpoint", tmp_path / "run" / "model.pt", "--data", data_dir, "--tasks", "retrieval",
                   "--out", tmp_path / "eval.json") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["objective"] == "cosmos+dreamlip"
