"""Evaluation by text-conditioned image embeddings (FLAIR's): the pair scores against a per-pair
loop, chunking, all pairs against top-k re-ranking, and the metrics against a brute-force ranking."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreamlip.eval.conditioned import Conditioning, conditioned_classification, conditioned_retrieval, conditioned_scores
from dreamlip.eval.encode import EvalContext
from dreamlip.objectives import TextConditionedPooler

DIM, PATCHES = 16, 5


def _pooler(seed=0):
    torch.manual_seed(seed)
    pooler = TextConditionedPooler(DIM, heads=2).double().eval()
    with torch.no_grad():  # layer norms away from the identity, so they count
        for norm in (pooler.ln_q, pooler.ln_k, pooler.ln_v):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    return pooler


@torch.no_grad()
def _slow_score(pooler, patches, text):
    """One pair at a time: the image's patches pooled with the text as the only query."""
    pooled = pooler(text[None, None], patches[None])[0, 0]
    return float(F.normalize(pooled, dim=-1) @ text)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("chunk", [1, PATCHES + 2, 2 * (PATCHES + 3), 10**6], ids=["one-row", "one-query", "two-rows", "unchunked"])
def test_conditioned_scores_equal_a_per_pair_loop_at_every_chunk(chunk):
    pooler, patches, texts = _pooler(), _unit(4, PATCHES, DIM, seed=1), _unit(9, DIM, seed=2)
    candidates = [torch.arange(9), torch.tensor([3]), torch.tensor([], dtype=torch.long), torch.tensor([8, 0, 5, 5])]
    with torch.no_grad():
        scores = conditioned_scores(pooler, patches, texts, candidates, chunk)
        for image, (wanted, got) in enumerate(zip(candidates, scores, strict=True)):
            expected = torch.tensor([_slow_score(pooler, patches[image], texts[t]) for t in wanted], dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class _IndexedImages:
    """A stand-in model over images that are their index (a grey level): known global embeddings
    and patch tokens per image, so the metrics can be recomputed by hand."""

    def __init__(self, global_emb, patches):
        self.global_emb, self.patches = global_emb, patches

    def encode_image(self, images, with_patches=False):
        return self.global_emb[images], self.patches[images] if with_patches else None


def _index_of(image):
    return torch.tensor(int(np.asarray(image)[0, 0, 0]))


def _context(tmp_path, n_images, seed=3):
    sources = []
    for i in range(n_images):
        sources.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (2, 2), (i, i, i)).save(sources[-1])
    model = _IndexedImages(_unit(n_images, DIM, seed=seed).float(), _unit(n_images, PATCHES, DIM, seed=seed + 1).float())
    return EvalContext(model, tokenizer=None, transform=_index_of, device=torch.device("cpu"), batch_size=3, progress=False), sources


def _first_hit(order, hits):
    return next((rank for rank, item in enumerate(order) if item in hits), len(order))


def _reference_recalls(pair_score, global_score, n_images, text_image, k, ks):
    """R@k by sorting every list in Python: for each image its texts (each text its images), the
    global top k re-ranked by the pair score first, then the rest in global order."""
    n_texts = len(text_image)

    def ranked(candidates, global_of, pair_of):
        by_global = sorted(candidates, key=lambda c: -global_of(c))
        return sorted(by_global[:k], key=lambda c: -pair_of(c)) + by_global[k:]

    i2t = [_first_hit(ranked(range(n_texts), lambda t, i=i: global_score[i, t], lambda t, i=i: pair_score[i, t]),
                      {t for t in range(n_texts) if text_image[t] == i}) for i in range(n_images)]
    t2i = [_first_hit(ranked(range(n_images), lambda i, t=t: global_score[i, t], lambda i, t=t: pair_score[i, t]),
                      {int(text_image[t])}) for t in range(n_texts)]
    return {**{f"image_to_text_R@{r}": 100.0 * np.mean([x < r for x in i2t]) for r in ks},
            **{f"text_to_image_R@{r}": 100.0 * np.mean([x < r for x in t2i]) for r in ks}}


@pytest.mark.parametrize("mode, k", [("all", 128), ("topk", 128), ("topk", 3), ("topk", 1)], ids=["all", "topk-all", "topk-3", "topk-1"])
def test_conditioned_retrieval_equals_a_brute_force_ranking(tmp_path, mode, k):
    """7 images, 2 or 3 texts each: the metrics equal the lists sorted by hand from per-pair scores;
    re-ranking with k at least the set's size is all pairs."""
    n_images = 7
    ctx, sources = _context(tmp_path, n_images)
    text_image = torch.tensor([i for i in range(n_images) for _ in range(2 + i % 2)])
    text_emb = F.normalize(ctx.model.global_emb[text_image] + 0.9 * _unit(len(text_image), DIM, seed=9).float(), dim=-1)
    pooler = _pooler().float()
    pair = torch.tensor([[_slow_score(pooler, ctx.model.patches[i], t) for t in text_emb] for i in range(n_images)])
    global_score = ctx.model.global_emb @ text_emb.T
    ks = (1, 2, 5)
    conditioning = Conditioning(pooler, mode, k, chunk=2 * (PATCHES + 4))
    got = conditioned_retrieval(ctx, conditioning, sources, ctx.model.global_emb, text_emb, text_image, ks)
    expected = _reference_recalls(pair, global_score, n_images, text_image.tolist(), k if mode == "topk" else 10**6, ks)
    assert got == pytest.approx(expected)
    if k == 128:  # the conditioned scores rank differently from the global ones here: the test can tell
        assert expected != _reference_recalls(global_score, global_score, n_images, text_image.tolist(), 10**6, ks)


def test_conditioned_classification_scores_each_image_with_every_class(tmp_path):
    ctx, sources = _context(tmp_path, 5)
    classes = _unit(4, DIM, seed=11).float()
    pooler = _pooler().float()
    logits = conditioned_classification(ctx, Conditioning(pooler, chunk=PATCHES + 1), sources, classes)
    expected = torch.tensor([[_slow_score(pooler, ctx.model.patches[i], c) for c in classes] for i in range(5)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_conditioning_refuses_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        Conditioning(_pooler(), "pairs")
    with pytest.raises(ValueError, match="at least 1"):
        Conditioning(_pooler(), "topk", k=0)
