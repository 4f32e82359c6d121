"""The model wrapper: patch tokens, dynamic-length text, gradients into every part."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from dreamlip.objectives import DreamLIPObjective
from conftest import NANO as MODEL
from dreamlip.model import DreamLIPModel, PatchTokensUnavailable, create_model, length_buckets


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL)
    return model.eval()


def test_shapes_and_normalisation(model, tokenizer):
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red circle"] * 6).reshape(3, 2, -1)
    out = model(images, tokens)
    grid = model.clip.visual.grid_size
    assert out.image_emb.shape == (3, 64)
    assert out.patch_emb.shape == (3, grid[0] * grid[1], 64)
    assert out.text_emb.shape == (3, 2, 64)
    for tensor in (out.image_emb, out.patch_emb, out.text_emb):
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(tensor.shape[:-1]))


def test_global_embedding_is_open_clips(model):
    images = torch.randn(2, 3, 32, 32)
    image_emb, patch_emb = model.encode_image(images, with_patches=True)
    torch.testing.assert_close(image_emb, F.normalize(model.clip.encode_image(images), dim=-1))


def test_patch_tokens_are_final_norm_then_class_token_projection(model):
    images = torch.randn(2, 3, 32, 32)
    visual = model.clip.visual
    visual.output_tokens = True  # open_clip's own token output: ln_post then the class-token split
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    _, patch_emb = model.encode_image(images, with_patches=True)
    torch.testing.assert_close(patch_emb, F.normalize(tokens @ visual.proj, dim=-1))


def test_dynamic_length_text_equals_full_context_encoding(model, tokenizer):
    texts = ["a cat", "a small blue striped square in the top left corner next to a large green star", ""]
    tokens = tokenizer(texts)
    assert tokens.shape[-1] == 77
    full = F.normalize(model.clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.encode_text(tokens), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.encode_text(tokens.reshape(3, 1, 77))[:, 0], full, atol=1e-6, rtol=1e-5)


def test_dynamic_length_text_runs_shorter_sequences(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "text_packing", False)  # seen at clip.transformer, which the packed path does not call
    seen = []
    handle = model.clip.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        model.encode_text(tokenizer(["a cat on a mat"]))
    finally:
        handle.remove()
    assert seen == [7]  # <start> a cat on a mat <end>


def test_token_embeddings_are_the_text_towers_per_position_outputs(model, tokenizer):
    """Per-token embeddings from the bucketed, deduplicated, cropped path: open_clip's full-context
    per-position outputs (ln_final, text projection), the end token's the pooled embedding, zeros
    past the end, and the mask exactly the tokenizer's content tokens."""
    words = "a small blue striped square in the top left corner next to a large green star".split()
    texts = [" ".join(words[: (i * 5) % len(words)]) for i in range(24)]  # "" and repeats among them
    tokens = tokenizer(texts).reshape(6, 4, -1)
    pooled, token_emb, token_mask = model.encode_text(tokens, with_tokens=True)
    assert torch.equal(pooled, model.encode_text(tokens)), "asking for tokens changed the pooled embeddings"
    content = [len(tokenizer.encode(t)) for t in texts]  # between the start and end tokens
    longest = max(content) + 2
    assert token_emb.shape == (6, 4, longest, 64) and token_mask.shape == (6, 4, longest)
    flat = tokens.reshape(24, -1)
    ids = flat[:, :longest]
    pad = 0  # open_clip pads with zeros
    assert torch.equal(token_mask.reshape(24, longest), (ids != tokenizer.sot_token_id) & (ids != tokenizer.eot_token_id) & (ids != pad))
    end = torch.tensor(content) + 1
    assert torch.equal(flat[torch.arange(24), end], torch.full((24,), tokenizer.eot_token_id))
    clip = model.clip
    x = clip.transformer(clip.token_embedding(flat) + clip.positional_embedding, attn_mask=clip.attn_mask)
    full = F.normalize(clip.ln_final(x) @ clip.text_projection, dim=-1)[:, :longest]
    ran = torch.arange(longest) <= end.unsqueeze(1)
    emb = token_emb.reshape(24, longest, 64)
    torch.testing.assert_close(emb[ran], full[ran], atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(emb[~ran]) == 0
    torch.testing.assert_close(emb[torch.arange(24), end], pooled.reshape(24, 64), atol=1e-6, rtol=1e-5)
    out = model(torch.randn(6, 3, 32, 32), tokens, with_tokens=True)
    assert torch.equal(out.token_mask, token_mask) and model(torch.randn(6, 3, 32, 32), tokens).token_emb is None


def test_token_embeddings_need_the_cropped_causal_path(tokenizer):
    model = create_model(MODEL)[0]
    model.clip.attn_mask = None  # a bidirectional tower: its end token sees the padding after it
    tokens = tokenizer(["a cat"])
    assert model.encode_text(tokens).shape == (1, 64)
    with pytest.raises(ValueError, match="group_granularity=token"):
        model.encode_text(tokens, with_tokens=True)


def _fewest_padded_tokens(lengths: list[int], max_buckets: int) -> int:
    """Brute force over every way to cut the sorted lengths into at most ``max_buckets`` runs."""
    ordered = sorted(lengths)
    best = len(ordered) * ordered[-1]
    for cuts in range(1, max_buckets):
        for points in itertools.combinations(range(1, len(ordered)), cuts):
            bounds = (0, *points, len(ordered))
            best = min(best, sum((b - a) * ordered[b - 1] for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_pad_the_fewest_tokens(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 3 + rng.choice([2, 10, 70])) for _ in range(rng.randint(1, 11))]
    buckets = rng.randint(1, 4)
    sizes, run_lengths = length_buckets(lengths, buckets)
    assert len(sizes) == len(run_lengths) == buckets  # fixed: every rank calls the tower as often
    assert sum(sizes) == len(lengths) and sizes.count(0) == max(0, buckets - len(lengths))
    ordered = sorted(lengths)
    ends = list(itertools.accumulate(sizes))
    assert [n for s, n in zip(sizes, run_lengths) if s] == [ordered[e - 1] for s, e in zip(sizes, ends) if s]
    assert sum(s * n for s, n in zip(sizes, run_lengths)) == _fewest_padded_tokens(lengths, buckets)


def test_length_buckets_give_the_full_context_embeddings_in_order(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "text_packing", False)  # seen at clip.transformer, which the packed path does not call
    words = "a small blue striped square in the top left corner next to a large green star".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(40)]  # lengths shuffled
    tokens = tokenizer(texts).reshape(8, 5, -1)
    seen = []
    handle = model.clip.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        bucketed = model.encode_text(tokens)
    finally:
        handle.remove()
    distinct = set(texts)  # 16 texts, most of them several times: each is encoded once
    lengths = [len(tokenizer.encode(t)) + 2 for t in distinct]  # + start and end tokens
    sizes, run_lengths = length_buckets(lengths, min(model.text_buckets, len(texts) // 8))
    assert len(seen) == len(sizes) > 1
    assert [shape[:2] for shape in seen] == list(zip(sizes, run_lengths))
    full = F.normalize(model.clip.encode_text(tokens.reshape(40, -1)), dim=-1).reshape(8, 5, -1)
    torch.testing.assert_close(bucketed, full, atol=1e-6, rtol=1e-5)


def test_repeated_texts_are_encoded_once_with_the_gradient_of_every_copy(tokenizer):
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL)
    texts = ["a red circle", "a blue square on the left", "a red circle", "a green star", "a red circle"] * 4
    tokens = tokenizer(texts).reshape(4, 5, -1)
    weights = torch.randn(4, 5, 64)  # a different gradient reaches every copy
    model.text_packing = False  # seen at clip.transformer, which the packed path does not call

    def gradients(embed):
        model.zero_grad(set_to_none=True)
        (embed(tokens) * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.clip.named_parameters() if p.grad is not None}

    seen = []
    handle = model.clip.transformer.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        deduplicated = gradients(model.encode_text)
    finally:
        handle.remove()
    assert sum(seen) == 3
    full = gradients(lambda t: F.normalize(model.clip.encode_text(t.reshape(20, -1)), dim=-1).reshape(4, 5, -1))
    assert deduplicated.keys() == full.keys()
    for name, grad in full.items():
        scale = grad.abs().max()  # summed in another order: compare at the gradient's own scale
        torch.testing.assert_close(deduplicated[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("checkpointed", [False, True])
def test_packed_text_tower_gives_the_full_context_embeddings_and_gradients(tokenizer, checkpointed):
    """model.text_packing (auto, the default, packs this plain CLIP tower): per-token layers once over
    every bucket's tokens, attention per bucket. Pooled and per-token embeddings and every text
    parameter's gradient equal open_clip's 77-token computation; the forward equals the bucketed
    path's (model.text_packing=false) to the bit (the same rows through the same products); the
    weight gradients sum the tokens in one product, not per bucket, so only those may differ from
    the bucketed path's, by rounding."""
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL)
    assert model.text_packing is True
    model.clip.set_grad_checkpointing(checkpointed)
    words = "a small blue striped square in the top left corner next to a large green star".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(40)]  # lengths shuffled, repeats
    tokens = tokenizer(texts).reshape(8, 5, -1)
    weights = torch.randn(8, 5, 64)
    distinct = set(texts)
    lengths = [len(tokenizer.encode(t)) + 2 for t in distinct]
    sizes, run_lengths = length_buckets(lengths, min(model.text_buckets, len(texts) // 8))
    longest = max(run_lengths)

    def run(embed):
        model.zero_grad(set_to_none=True)
        pooled, token_emb = embed(tokens)
        ((pooled * weights).sum() + token_emb.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.clip.named_parameters() if p.grad is not None}
        return pooled.detach(), token_emb.detach(), grads

    def full_context(t):
        clip, flat = model.clip, t.reshape(40, -1)
        x = clip.transformer(clip.token_embedding(flat) + clip.positional_embedding, attn_mask=clip.attn_mask)
        per_position = clip.ln_final(x) @ clip.text_projection
        end = flat.argmax(dim=-1)
        pooled = F.normalize(per_position[torch.arange(40), end], dim=-1).reshape(8, 5, -1)
        kept = torch.arange(longest) <= end.unsqueeze(1)  # past the end: zeros, as encode_text gives
        token_emb = F.normalize(per_position[:, :longest], dim=-1) * kept.unsqueeze(-1)
        return pooled, token_emb.reshape(8, 5, longest, -1)

    full = run(full_context)
    calls = []
    handle = model.clip.transformer.resblocks[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        packed = run(lambda t: model.encode_text(t, with_tokens=True)[:2])
        model.text_packing = model.resolve_text_packing(False)
        calls_packed, calls[:] = list(calls), []
        bucketed = run(lambda t: model.encode_text(t, with_tokens=True)[:2])
    finally:
        handle.remove()
    assert len(sizes) > 1
    tokens_run = sum(n * length for n, length in zip(sizes, run_lengths))
    # one MLP call over every bucket's tokens (run again in backward when checkpointed); unpacked, one per bucket
    assert calls_packed == [(tokens_run, model.clip.transformer.width)] * (2 if checkpointed else 1)
    assert sorted(tuple(shape[:2]) for shape in calls) == sorted(list(zip(sizes, run_lengths)) * (2 if checkpointed else 1))
    assert torch.equal(packed[0], bucketed[0]) and torch.equal(packed[1], bucketed[1])
    torch.testing.assert_close(packed[0], full[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(packed[1], full[1], atol=1e-6, rtol=1e-5)
    assert packed[2].keys() == full[2].keys() == bucketed[2].keys()
    for name, grad in full[2].items():
        scale = grad.abs().max()  # summed in another order: compare at the gradient's own scale
        torch.testing.assert_close(packed[2][name] / scale, grad / scale, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _towers_packing_does_not_apply_to():
    """(name, model, the refusal model.text_packing=true gives) for towers the packed path does not reimplement."""
    from open_clip import CustomTextCLIP, get_model_config
    from open_clip.transformer import CustomResidualAttentionBlock

    other_block = create_model(MODEL)[0]
    width, heads = other_block.clip.transformer.width, other_block.clip.transformer.resblocks[0].attn.num_heads
    other_block.clip.transformer.resblocks[0] = CustomResidualAttentionBlock(width, heads)
    other_mask = create_model(MODEL)[0]
    other_mask.clip.attn_mask = other_mask.clip.attn_mask.clone().fill_(float("-inf")).triu_(2)  # sees one token ahead
    return [
        ("another block", DreamLIPModel(other_block.clip), "text_packing needs open_clip's plain ResidualAttentionBlock"),
        ("another mask", DreamLIPModel(other_mask.clip), "text_packing needs open_clip's causal text mask"),
        ("not a CLIP", DreamLIPModel(CustomTextCLIP(**get_model_config(MODEL))), "text_packing needs open_clip's causal CLIP text tower"),
    ]


def test_text_packing_auto_falls_back_where_true_refuses(tokenizer):
    """auto (the default) takes the bucketed path, silently, for a tower or a run (FSDP2) the packed
    path does not apply to; true refuses those, saying why; false never packs."""
    texts = tokenizer([f"a photo of {i} cats" for i in range(16)])
    for name, model, refusal in _towers_packing_does_not_apply_to():
        assert model.text_packing is False, name
        assert model.resolve_text_packing("auto") is False
        with pytest.raises(ValueError, match=refusal):
            model.resolve_text_packing(True)
        seen = []  # the tower itself runs, not the packed path
        tower = getattr(model.clip, "text", model.clip)  # CustomTextCLIP keeps its text transformer in .text
        handle = tower.transformer.register_forward_pre_hook(lambda module, args: seen.append(1))
        try:
            model.encode_text(texts)
        finally:
            handle.remove()
        assert seen, name
    plain = create_model(MODEL)[0]
    assert (plain.resolve_text_packing("auto"), plain.resolve_text_packing(True), plain.resolve_text_packing(False)) == (True, True, False)
    assert plain.resolve_text_packing("auto", sharded=True) is False
    with pytest.raises(ValueError, match="model.text_packing runs the text blocks' layers directly, which FSDP2 does not gather"):
        plain.resolve_text_packing(True, sharded=True)
    with pytest.raises(ValueError, match="model.text_packing must be auto, true or false; got 'yes'"):
        plain.resolve_text_packing("yes")


def test_gradients_reach_both_towers_patches_and_both_temperatures(tokenizer):
    torch.manual_seed(0)
    model, _, _ = create_model(MODEL)
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenizer([f"a photo number {i}" for i in range(12)]).reshape(4, 3, -1)
    out = model(images, tokens)
    out.patch_emb.retain_grad()
    objective = DreamLIPObjective(text_slots=3, group_warmup_fraction=0.0, group_text_grad_start=0.0)
    outputs = {"image_emb": out.image_emb, "text_emb": out.text_emb, "patch_emb": out.patch_emb, "logit_scale": out.logit_scale}
    sum(objective(outputs).values()).backward()
    clip = model.clip
    for name, param in [
        ("vision conv", clip.visual.conv1.weight),
        ("vision projection", clip.visual.proj),
        ("text embedding", clip.token_embedding.weight),
        ("text projection", clip.text_projection),
        ("logit_scale", clip.logit_scale),
        ("local_logit_scale", objective.local_logit_scale),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert out.patch_emb.grad.abs().sum() > 0


def test_clamp_logit_scales():
    model = create_model(MODEL)[0]
    objective = DreamLIPObjective(group_temperature_min=0.05)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
        objective.local_logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    objective.clamp_parameters()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0)
    assert float(objective.local_logit_scale.detach().exp()) == pytest.approx(20.0)
    model.clamp_logit_scale(max_scale=50.0)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(50.0)


def test_tower_without_patch_tokens_is_a_clear_error():
    model, _, _ = create_model("RN50", precision="fp32")  # ModifiedResNet: attention-pooled, no token output
    assert not model.has_patch_tokens
    with pytest.raises(PatchTokensUnavailable, match="grouping loss"):
        model.encode_image(torch.randn(1, 3, 224, 224), with_patches=True)
