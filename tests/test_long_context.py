"""Text beyond 77 tokens: longer contexts from scratch, Long-CLIP's stretch, training at 248 tokens."""

import subprocess

import pytest
import torch
import torch.nn.functional as F

from dreamlip.captions import SubcaptionSampler
from dreamlip.data.loader import build_train_loader
from dreamlip.distributed import init_distributed, make_strategy
from dreamlip.loading import PretrainedMismatch, load_model
from dreamlip.model import create_model, get_tokenizer, stretch_positional_embedding
from dreamlip.objectives import DreamLIPObjective
from dreamlip.train import TrainModule, TrainStep, train
from conftest import NANO as MODEL
from conftest import cli_command as _cli
from conftest import torchrun_command
from test_train import _config, _metrics, _overrides, _weights

LONG = 248
# about 200 BPE tokens: every word is one token
LONG_TEXT = " ".join(["a red circle above a small blue striped square"] * 22)


def _long_clip_stretch(old: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's 77 -> 248 stretch written out row by row (arXiv 2403.15378; its loader): rows
    0..19 kept; each later gap (i, i+1) gets rows at i, i + 1/4, i + 2/4, i + 3/4; the last row
    is continued by the last difference for the final 4 rows."""
    keep, length = 20, old.shape[0]
    rows = [old[i] for i in range(keep)]
    for i in range(keep, length - 1):
        for r in range(4):
            rows.append((4 - r) / 4 * old[i] + r / 4 * old[i + 1])
    for j in range(4):
        rows.append(old[length - 1] + j / 4 * (old[length - 1] - old[length - 2]))
    return torch.stack(rows)


def test_stretch_is_long_clips_formula():
    old = torch.randn(77, 16, dtype=torch.float64)
    stretched = stretch_positional_embedding(old, LONG)
    assert stretched.shape == (LONG, 16)
    torch.testing.assert_close(stretched, _long_clip_stretch(old), rtol=0, atol=1e-12)
    torch.testing.assert_close(stretched[:20], old[:20], rtol=0, atol=0)
    assert torch.equal(stretch_positional_embedding(old, 77), old)
    with pytest.raises(ValueError, match="lengthens"):
        stretch_positional_embedding(old, 60)


def test_a_longer_context_from_scratch_sizes_positions_mask_and_tokenizer():
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL, context_length=LONG)
    clip = model.clip.eval()
    assert model.context_length == LONG and clip.positional_embedding.shape[0] == LONG
    expected_mask = torch.full((LONG, LONG), float("-inf")).triu(1)
    assert torch.equal(clip.attn_mask, expected_mask)
    tokenizer = get_tokenizer(MODEL, LONG)
    tokens = tokenizer([LONG_TEXT, "a cat"])
    assert tokens.shape == (2, LONG) and 190 < int(tokens[0].argmax()) < LONG - 1  # whole, not cut
    with torch.no_grad():
        full = F.normalize(clip.encode_text(tokens), dim=-1)  # open_clip's own, over all 248 positions
        torch.testing.assert_close(model.encode_text(tokens), full, atol=1e-6, rtol=1e-5)
        cut = model.encode_text(get_tokenizer(MODEL)([LONG_TEXT]))
    assert not torch.allclose(cut[0], full[0], atol=1e-3), "the tokens past 77 must count"


def test_fine_tuning_from_77_positions_stretches_them(tmp_path):
    torch.manual_seed(123)
    pretrained = create_model(MODEL)[0].clip.state_dict()
    torch.save(pretrained, tmp_path / "open_clip.pt")
    model = load_model(tmp_path / "open_clip.pt", model_name=MODEL, context_length=LONG, stretch_positions=True).model
    weights = model.clip.state_dict()
    assert weights.keys() == pretrained.keys()
    for name, tensor in pretrained.items():
        if name == "positional_embedding":
            torch.testing.assert_close(weights[name], _long_clip_stretch(tensor.double()).float())
        else:
            assert torch.equal(weights[name], tensor), name
    assert model.clip.attn_mask.shape == (LONG, LONG)
    with pytest.raises(ValueError, match="stretch_positions"):
        load_model(tmp_path / "open_clip.pt", model_name=MODEL, context_length=LONG)
    with pytest.raises(ValueError, match="pretrained weights"):
        create_model(MODEL, context_length=LONG, stretch_positions=True)


def test_fine_tuning_from_our_77_token_checkpoint_stretches_it(data_dir, tmp_path):
    train(_config(data_dir, **{"optim.max_steps": 1}), tmp_path / "short")
    short = {k[len("clip.") :]: v for k, v in _weights(tmp_path / "short" / "model.pt").items() if k.startswith("clip.")}
    model = load_model(tmp_path / "short" / "model.pt", model_name=MODEL, context_length=LONG, stretch_positions=True).model
    torch.testing.assert_close(
        model.clip.positional_embedding.detach(), _long_clip_stretch(short["positional_embedding"].double()).float()
    )
    assert torch.equal(model.clip.token_embedding.weight, short["token_embedding.weight"])
    with pytest.raises(PretrainedMismatch, match="stretch_positions"):
        load_model(tmp_path / "short" / "model.pt", model_name=MODEL, context_length=LONG)


def test_context_length_77_is_bit_identical_to_the_default(data_dir, tmp_path):
    default = train(_config(data_dir, **{"optim.max_steps": 3}), tmp_path / "default")
    explicit = train(_config(data_dir, **{"optim.max_steps": 3, "model.context_length": 77}), tmp_path / "explicit")
    assert explicit["final"]["loss"] == default["final"]["loss"]
    reference = _weights(tmp_path / "default" / "model.pt")
    for name, tensor in _weights(tmp_path / "explicit" / "model.pt").items():
        assert torch.equal(tensor, reference[name]), name


def _long_whole_batch(data_dir, batch_size=16):
    """A batch of whole long captions (one per image) tokenized at 248; some pass 77 tokens."""
    loader = build_train_loader(
        str(data_dir / "train.jsonl"),
        sampler=SubcaptionSampler(k=1, long_mode="whole", use_short=False),
        tokenizer=get_tokenizer(MODEL, LONG),
        batch_size=batch_size,
        image_size=32,
    )
    batch = next(iter(loader))
    ends = batch["texts"].argmax(dim=-1)
    assert batch["texts"].shape[-1] == LONG and int(ends[:, 1].max()) >= 77
    assert (ends < LONG - 1).all(), "no caption reaches the context: none was cut"
    return {k: batch[k] for k in ("images", "texts")}


def test_long_context_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path):
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL, context_length=LONG)
    batch = _long_whole_batch(data_dir)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 8), slice(8, 16))]
    strategy = make_strategy("ddp", init_distributed("cpu"))  # one process: the model as it is
    strategy.wrap(TrainModule(model, DreamLIPObjective(group_weight=0.0)))
    train_step = TrainStep(strategy)

    def gradients(micro_batches):
        model.zero_grad(set_to_none=True)
        result = train_step(micro_batches)
        return float(result.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big_loss, big = gradients([batch])
    accumulated_loss, accumulated = gradients(halves)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-6)
    assert big["clip.positional_embedding"][77:].abs().sum() > 0, "positions past 77 must learn"
    for name, grad in big.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.distributed
def test_whole_long_captions_at_248_two_process_ddp_matches_one_process(data_dir, tmp_path):
    """Whole long captions (past 77 tokens) among the sub-captions, with the grouping loss."""
    single, double = tmp_path / "single", tmp_path / "double"
    # Global-batch grouping: the default cross-image negatives are each rank's own images by design
    # (tests/test_distributed_loss.py checks that form), so they cannot equal one process.
    common = {"optim.max_steps": 2, "model.context_length": LONG, "captions.long_mode": "whole", "loss.group_negatives": "image"}

    def args(batch_size):
        return [i for o in _overrides(data_dir, **common, **{"optim.batch_size": batch_size}) for i in ("--set", o)]

    subprocess.run(_cli("train", "--out", str(single), *args(16)), check=True, capture_output=True)
    done = subprocess.run(
        torchrun_command("train", "--out", str(double), *args(8)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference, distributed = _metrics(single), _metrics(double)
    assert [m["step"] for m in distributed] == [1, 2]
    for ours, theirs in zip(distributed, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    final = _weights(double / "model.pt")
    assert final["clip.positional_embedding"].shape[0] == LONG
    width = final["clip.positional_embedding"].shape[1]
    for name, tensor in _weights(single / "model.pt").items():
        if name.endswith("attn.in_proj_bias"):
            # The key bias shifts all of a query's logits alike: its exact gradient is 0, and
            # Adam turns the rounding noise left in its place into updates of ~lr * noise / eps.
            final[name][width : 2 * width] = tensor[width : 2 * width]
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)



def test_export_at_248_loads_in_plain_open_clip_and_encodes_whole_long_texts(tmp_path, monkeypatch):
    from dreamlip.export import export_open_clip
    from dreamlip.model import load_open_clip

    open_clip = load_open_clip()

    torch.manual_seed(0)
    model = create_model(MODEL, context_length=LONG)[0].eval()
    out = export_open_clip(model, MODEL, tmp_path / "export")
    texts = [LONG_TEXT, "a cat"]
    our_tokens = get_tokenizer(MODEL, LONG)(texts)
    with torch.no_grad():
        ours = model.encode_text(our_tokens)
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, MODEL)  # a plain open_clip: the file must say 248
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert clip.context_length == LONG and tokenizer.context_length == LONG
    tokens = tokenizer(texts)
    assert torch.equal(tokens, our_tokens)
    # open_clip runs all 248 positions; a 77-token cut, padded, ends at its end token at 76
    cut = F.pad(tokenizer(texts, context_length=77), (0, LONG - 77))
    with torch.no_grad():
        theirs = F.normalize(clip.eval().encode_text(tokens), dim=-1)
        truncated = F.normalize(clip.encode_text(cut), dim=-1)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(theirs[0], truncated[0], atol=1e-3), "the 200-token text was cut at 77"
    torch.testing.assert_close(theirs[1], truncated[1], atol=1e-6, rtol=1e-5)  # a short text is the same either way


def test_a_248_token_checkpoint_reloads_and_exports_at_248(data_dir, tmp_path):
    import json

    train(_config(data_dir, **{"optim.max_steps": 1, "model.context_length": LONG}), tmp_path / "run")
    loaded = load_model(tmp_path / "run" / "model.pt")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert model.context_length == LONG and tokenizer.context_length == LONG
    done = subprocess.run(
        _cli("export", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--out", str(tmp_path / "export")),
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == LONG


def test_long_text_full_encodes_up_to_the_models_context_and_truncate_at_77():
    from dreamlip.eval.encode import EvalContext, encode_texts

    torch.manual_seed(0)
    model = create_model(MODEL, context_length=LONG)[0].eval()
    tokenizer = get_tokenizer(MODEL, LONG)
    ctx = EvalContext(model, tokenizer, None, torch.device("cpu"), batch_size=4, progress=False)
    over_248 = " ".join([LONG_TEXT] * 2)
    texts = ["a short caption", LONG_TEXT, over_248]
    with torch.no_grad():
        full, n_full = encode_texts(ctx, texts, "full")
        truncated, n_truncated = encode_texts(ctx, texts, "truncate")
        split, n_split = encode_texts(ctx, texts, "sentences")
        at_248 = model.encode_text(tokenizer(texts))
        at_77 = model.encode_text(get_tokenizer(MODEL)(texts))
    assert (n_full, n_truncated, n_split) == (1, 2, 1)  # texts past the context each policy encodes at
    torch.testing.assert_close(full, at_248, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(truncated, at_77, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split[:2], at_248[:2], atol=1e-6, rtol=1e-5)  # 200 tokens fit 248: whole
    assert not torch.allclose(full[1], truncated[1], atol=1e-3)


@pytest.mark.slow
def test_eval_cli_names_the_policy_and_the_context(data_dir, tmp_path):
    import json

    train(_config(data_dir, **{"optim.max_steps": 1, "model.context_length": LONG}), tmp_path / "run")
    results = {}
    for policy in ("truncate", "full"):
        out = tmp_path / f"{policy}.json"
        done = subprocess.run(
            _cli("eval", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--data", str(data_dir),
                 "--tasks", "long_retrieval", "--long-text", policy, "--workers", "0", "--quiet", "--out", str(out)),
            capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr
        results[policy] = json.loads(out.read_text())
    settings = {policy: r["tasks"][0] for policy, r in results.items()}
    assert (settings["truncate"]["long_text"], settings["truncate"]["context_length"]) == ("truncate", 77)
    assert (settings["full"]["long_text"], settings["full"]["context_length"]) == ("full", LONG)
    n_long = {policy: r["metrics"]["long_retrieval/n_long_texts"] for policy, r in results.items()}
    assert n_long["truncate"] > 0 and n_long["full"] == 0
