"""Dense read-outs and PAMR against slow references written from the papers' equations (explicit
loops over heads, tokens and pixels) on a tiny open_clip ViT; ``raw`` is today's read-out; the
global embedding is untouched; several read-outs from one encode."""

import copy
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NANO, run_cli
from dreamlip._compat import ensure_torchvision
from dreamlip.eval import SegmentationTask, Segmenter, build_tasks, evaluate
from dreamlip.eval.dense import DENSE_READOUTS, dense_patch_embeddings, parse_readouts
from dreamlip.eval.pamr import pamr
from dreamlip.model import create_model, get_tokenizer

ensure_torchvision()
from torchvision.transforms import functional as TF  # noqa: E402  isort: skip  (after the CPU-torch shim)

# NANO: 2 blocks, width 64, 2 heads, 4x4 patches + class token
STD = 1.5  # a Gaussian narrower than NACLIP's 5 patches, so the prior matters on a 4x4 grid


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    return model.eval(), transform


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _last_block_input(visual, images):
    """The last block's input, captured from open_clip's own forward."""
    seen = []
    handle = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        visual(images)
    finally:
        handle.remove()
    return seen[0]


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


@torch.no_grad()
def _reference(visual, images, readout, std):
    """Patch embeddings of one read-out, the last block written out token by token and head by head."""
    h = _last_block_input(visual, images).double()
    visual = copy.deepcopy(visual).double()
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    width, heads = h.shape[-1], attn.num_heads
    d = width // heads
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    w_out, b_out = attn.out_proj.weight, attn.out_proj.bias
    grid_w = images.shape[-1] // visual.patch_size[1]
    outputs = []
    for n in range(h.shape[0]):
        y = block.ln_1(h[n])
        length = y.shape[0]
        def project(part, a, i):  # part 0, 1, 2: head a's query, key, value of token i
            rows = slice(part * width + a * d, part * width + (a + 1) * d)
            return w_in[rows] @ y[i] + b_in[rows]

        q, k, v = ([[project(part, a, i) for i in range(length)] for a in range(heads)] for part in range(3))

        def prior(i, j):
            if i == 0 or j == 0:  # the class token gets no neighbourhood term
                return 0.0
            (ri, ci), (rj, cj) = divmod(i - 1, grid_w), divmod(j - 1, grid_w)
            return math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std**2))

        def attend(a, i, first, second, extra=lambda i, j: 0.0):
            logits = [float(first[a][i] @ second[a][j]) / math.sqrt(d) + extra(i, j) for j in range(length)]
            weights = _softmax(logits)
            return sum(weights[j] * v[a][j] for j in range(length))

        tokens = []
        for i in range(length):
            per_head = []
            for a in range(heads):
                if readout == "maskclip":
                    per_head.append(v[a][i])
                elif readout == "sclip":
                    per_head.append(attend(a, i, q, q) + attend(a, i, k, k))
                elif readout == "clearclip":
                    per_head.append(attend(a, i, q, q))
                elif readout == "naclip":
                    per_head.append(attend(a, i, k, k, prior))
            tokens.append(w_out @ torch.cat(per_head) + b_out)
        z = torch.stack(tokens)
        if readout == "sclip":  # residuals and feed-forward as trained
            z = h[n] + z
            z = z + block.mlp(block.ln_2(z))
        patches = visual.ln_post(z)[1:] @ visual.proj
        outputs.append(patches / patches.norm(dim=-1, keepdim=True))
    return torch.stack(outputs).float()


@pytest.mark.parametrize("readout", ["maskclip", "sclip", "clearclip", "naclip"])
def test_each_readout_matches_the_slow_reference(nano, images, readout):
    model, _ = nano
    fast = dense_patch_embeddings(model, images, [readout], naclip_std=STD)[readout]
    slow = _reference(model.clip.visual, images, readout, STD)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)


def test_readouts_differ_from_each_other_and_from_raw(nano, images):
    out = dense_patch_embeddings(model := nano[0], images, DENSE_READOUTS, naclip_std=STD)
    for i, a in enumerate(DENSE_READOUTS):
        for b in DENSE_READOUTS[i + 1 :]:
            assert not torch.allclose(out[a], out[b], atol=1e-3), (a, b)
    assert model.training is False


def test_raw_is_todays_patch_tokens_and_the_global_embedding_is_untouched(nano, images):
    model, _ = nano
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # as the segmenter runs it
        global_before, patches_today = model.encode_image(images, with_patches=True)
        out = dense_patch_embeddings(model, images, DENSE_READOUTS)
        global_after, _ = model.encode_image(images, with_patches=True)
    assert torch.equal(out["raw"], patches_today)
    assert torch.equal(global_after, global_before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parse_readouts():
    assert parse_readouts("raw, naclip,raw") == ["raw", "naclip"]
    assert parse_readouts(["sclip"]) == ["sclip"]
    with pytest.raises(ValueError, match="gem"):
        parse_readouts("raw,gem")
    with pytest.raises(ValueError, match="gem"):
        SegmentationTask("anywhere", dense="gem")


def test_a_tower_without_patch_tokens_is_refused_before_any_image():
    class NoViT(torch.nn.Module):
        logit_scale = torch.nn.Parameter(torch.tensor(1.0))

        def encode_text(self, tokens):
            return torch.nn.functional.normalize(torch.ones(*tokens.shape[:-1], 4), dim=-1)

    with pytest.raises(ValueError, match="VisionTransformer"):
        Segmenter(NoViT(), get_tokenizer(NANO), create_model(NANO)[2], ["a", "b"], ["{}"], dense="naclip")


# --- PAMR ----------------------------------------------------------------------------------------


def _pamr_reference(image, scores, iterations, dilations):
    """Araslanov & Roth's refinement pixel by pixel, borders replicated (coordinates clamped)."""
    channels, height, width = image.shape
    img = image.double().tolist()
    def at(grid, c, r, col):
        return grid[c][min(max(r, 0), height - 1)][min(max(col, 0), width - 1)]

    offsets = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d)]
    neighbours = [o for o in offsets if o != (0, 0)]
    alpha = {}
    for r in range(height):
        for col in range(width):
            sigma = [statistics.stdev(at(img, c, r + dy, col + dx) for dy, dx in offsets) for c in range(channels)]
            kappa = []
            for dy, dx in neighbours:
                terms = [-abs(img[c][r][col] - at(img, c, r + dy, col + dx)) / (1e-8 + 0.1 * sigma[c]) for c in range(channels)]
                kappa.append(sum(terms) / channels)
            alpha[r, col] = _softmax(kappa)
    m = scores.double().tolist()
    for _ in range(iterations):
        def refined(k, r, col, m=m):
            return sum(a * at(m, k, r + dy, col + dx) for a, (dy, dx) in zip(alpha[r, col], neighbours))

        m = [[[refined(k, r, col) for col in range(width)] for r in range(height)] for k in range(len(m))]
    return torch.tensor(m, dtype=torch.float32)


@pytest.mark.parametrize("dilations", [(1, 2), (8,)])  # (8,) reaches past a 6x7 image's borders
def test_pamr_matches_the_slow_reference(dilations):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(3, 6, 7, generator=g)
    image[:, :3, :4] += 2.0  # an edge the refinement must respect
    scores = torch.randn(3, 6, 7, generator=g)
    refined = pamr(image, scores, iterations=3, dilations=dilations)
    torch.testing.assert_close(refined, _pamr_reference(image, scores, 3, dilations), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(refined, scores, atol=1e-3)


def test_pamr_of_a_constant_map_is_the_map():
    image = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(3))
    scores = torch.full((2, 9, 9), 0.25)
    torch.testing.assert_close(pamr(image, scores), scores)


# --- the task: several read-outs from one encode ---------------------------------------------


@pytest.fixture
def voc(tmp_path):
    g = np.random.default_rng(4)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    for i, size in enumerate([(40, 36), (32, 50)]):
        pixels = g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "JPEGImages" / f"{i}.png")
        mask = g.integers(0, 3, (size[1], size[0]), dtype=np.uint8)
        Image.fromarray(mask, mode="L").save(tmp_path / "SegmentationClass" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    return tmp_path


def test_several_readouts_give_per_readout_metrics_and_raw_keeps_its_numbers(nano, voc):
    model, transform = nano
    tokenizer = get_tokenizer(NANO)
    common = dict(templates=["a photo of a {}."], threshold=0.5, stride=16)
    alone = evaluate(model, tokenizer, transform, SegmentationTask(voc, **common), progress=False)
    naclip = evaluate(model, tokenizer, transform, SegmentationTask(voc, dense="naclip", **common), progress=False)
    both = SegmentationTask(voc, dense="raw,naclip", **common)
    both = evaluate(model, tokenizer, transform, both, progress=False)
    # the first read-out keeps the plain keys, each further one is prefixed
    assert {k: v for k, v in both.items() if "/naclip/" not in k} == alone
    assert {k.replace("/naclip/", "/"): v for k, v in both.items() if "/naclip/" in k} == {
        k: v for k, v in naclip.items() if k != "segmentation/n_images"
    }
    assert both["segmentation/n_images"] == 2.0 and naclip != alone
    described = SegmentationTask(voc, dense=["raw", "naclip"], pamr=True).describe()
    assert described["dense"] == ["raw", "naclip"] and described["pamr"]["iterations"] == 10
    assert SegmentationTask(voc).describe()["dense"] == "raw"


def test_segmenter_raw_scores_equal_with_and_without_other_readouts(nano):
    model, transform = nano
    tokenizer = get_tokenizer(NANO)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    names = ["cat", "dog", "tree"]
    alone = Segmenter(model, tokenizer, transform, names, ["a {}."])
    both = Segmenter(model, tokenizer, transform, names, ["a {}."], dense=["sclip", "raw"], pamr=True)
    maps = both.score_maps(image)
    pixels = transform.transforms[-1](TF.to_tensor(image))  # normalised as the model's transform does
    refined = pamr(pixels, alone.scores(image))
    torch.testing.assert_close(maps["raw"], refined)
    assert both.scores(image).shape == (3, 45, 61) and both(image).shape == (45, 61)


def test_build_tasks_passes_dense_to_segmentation(voc):
    (task,) = build_tasks(voc, ["segmentation"], dense="raw,clearclip", pamr=True)
    assert task.dense == "raw,clearclip" and task.pamr


def test_train_time_evaluation_scores_the_configured_readouts(tmp_path):
    import json

    from dreamlip.config import TrainConfig, apply_overrides
    from dreamlip.synthetic import generate
    from dreamlip.train import train

    data = tmp_path / "data"
    generate(data, n_train=16, n_test=4, image_size=32, seed=0)
    settings = {
        "model.name": NANO, "data.train": str(data / "train.jsonl"), "data.workers": 0, "captions.k": 2,
        "optim.batch_size": 8, "optim.max_steps": 1, "run.progress": False, "run.eval_every": 1,
        "run.eval_data": str(data), "run.eval_tasks": '["segmentation"]', "run.eval_seg_dense": "raw,naclip",
    }  # fmt: skip
    train(apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in settings.items()]), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = next(m for m in lines if "eval/segmentation/n_images" in m)
    assert {"eval/segmentation/mIoU", "eval/segmentation/naclip/mIoU"} <= set(evaluated)


def test_cli_names_the_readouts_in_the_settings_and_refuses_an_unknown_one(voc, tmp_path, capsys):
    import json

    from dreamlip.checkpoint import save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "nano.pt"
    save_checkpoint(checkpoint, {"model_name": NANO, "model": create_model(NANO)[0].state_dict(), "config": {}})

    def run(*argv):
        common = ["--checkpoint", checkpoint, "--data", voc, "--tasks", "segmentation", "--workers", "0", "--quiet"]
        return run_cli("eval", *common, *argv)

    out = tmp_path / "results.json"
    assert run("--seg-dense", "raw,sclip", "--seg-pamr", "--out", out) == 0
    results = json.loads(out.read_text())
    assert results["tasks"][0]["dense"] == ["raw", "sclip"] and results["tasks"][0]["pamr"]["dilations"] == [8, 16]
    assert {"segmentation/mIoU", "segmentation/sclip/mIoU"} <= set(results["metrics"])
    assert run("--seg-dense", "gem") == 2
    assert "gem" in capsys.readouterr().err
