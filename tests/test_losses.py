"""The DreamLIP objective against independent computations: open_clip's ClipLoss and slow loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamlip._compat import ensure_torchvision
from dreamlip.config import load_config
from dreamlip.losses import (
    cross_image_grouping_loss,
    group_patches,
    grouping_loss,
    multi_positive_contrastive_loss,
    multi_positive_sigmoid_loss,
    one_text_of_every_other_image,
    text_conditioned_sigmoid_loss,
    token_grouping_loss,
)
from dreamlip.objectives import DreamLIPObjective, FLAIRObjective, LossConfig, SigLIPObjective, TextConditionedPooler, build_objective
from dreamlip.train import parameter_groups

ensure_torchvision()
from open_clip.loss import ClipLoss, SigLipLoss  # noqa: E402


def _dreamlip(local=None, **settings) -> DreamLIPObjective:
    """The DreamLIP objective in float64, its own grouping temperature (log) at ``local``; the
    grouping weight constant and its text gradient on from the start (the paper's) unless ``settings`` say otherwise."""
    objective = DreamLIPObjective(**{"group_warmup_fraction": 0.0, "group_text_grad_start": 0.0} | settings).double()
    if local is not None:
        with torch.no_grad():
            objective.local_logit_scale.fill_(float(local))
    return objective


def _terms(objective, image, text, scale, patches=None, step=0, token_emb=None, token_mask=None):
    outputs = {"image_emb": image, "text_emb": text, "logit_scale": scale, "patch_emb": patches,
               "token_emb": token_emb, "token_mask": token_mask}
    return objective(outputs, step)


def _unit(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _ce(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in logits)))


def _dot(a, b) -> float:
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist())))


def reference_mpcl(image, text, logit_scale) -> float:
    """METHOD.md's l_j averaged over slots, with explicit loops over images and slots."""
    s = min(math.exp(float(logit_scale)), 100.0)
    batch, slots, _ = text.shape
    total = 0.0
    for j in range(slots):
        image_to_text = sum(_ce([s * _dot(image[i], text[n, j]) for n in range(batch)], i) for i in range(batch))
        text_to_image = sum(_ce([s * _dot(text[i, j], image[n]) for n in range(batch)], i) for i in range(batch))
        total += 0.5 * (image_to_text + text_to_image) / batch
    return total / slots


def reference_grouped(text, patches, threshold=None):
    """g_ij from METHOD.md with loops: min-max, threshold (default 1/N), renormalise, pool, normalise."""
    batch, slots, dim = text.shape
    num_patches = patches.shape[1]
    threshold = 1.0 / num_patches if threshold is None else threshold
    grouped = torch.zeros(batch, slots, dim, dtype=text.dtype)
    for i in range(batch):
        for j in range(slots):
            sims = [_dot(text[i, j], patches[i, n]) for n in range(num_patches)]
            low, high = min(sims), max(sims)
            normed = [(a - low) / (high - low) for a in sims]
            kept = [w if w >= threshold else 0.0 for w in normed]
            weights = [w / sum(kept) for w in kept]
            vector = sum(weights[n] * patches[i, n] for n in range(num_patches))
            grouped[i, j] = vector / vector.norm()
    return grouped


def reference_grouping(text, patches, logit_scale, negatives, threshold=None) -> float:
    s = min(math.exp(float(logit_scale)), 100.0)
    grouped = reference_grouped(text, patches, threshold)
    batch, slots, _ = text.shape
    if negatives == "image":
        pairs = [[(text[i, j], grouped[i, j]) for j in range(slots)] for i in range(batch)]
    else:
        pairs = [[(text[i, j], grouped[i, j]) for i in range(batch) for j in range(slots)]]
    total, count = 0.0, 0
    for group in pairs:
        for a, (t_a, _) in enumerate(group):
            text_to_group = _ce([s * _dot(t_a, g_b) for _, g_b in group], a)
            group_to_text = _ce([s * _dot(group[a][1], t_b) for t_b, _ in group], a)
            total += 0.5 * (text_to_group + group_to_text)
            count += 1
    return total / count


def test_single_slot_equals_open_clip_clip_loss():
    image, text = _unit(16, 32, seed=1), _unit(16, 32, seed=2)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    ours = multi_positive_contrastive_loss(image, text[:, None], logit_scale)
    theirs = ClipLoss()(image, text, logit_scale.exp())
    torch.testing.assert_close(ours, theirs)


def test_temperature_is_clamped_at_100():
    image, text = _unit(8, 16, seed=3), _unit(8, 1, 16, seed=4)
    at_cap = multi_positive_contrastive_loss(image, text, torch.tensor(math.log(100.0), dtype=torch.float64))
    beyond = multi_positive_contrastive_loss(image, text, torch.tensor(math.log(1000.0), dtype=torch.float64))
    torch.testing.assert_close(at_cap, beyond)


@pytest.mark.parametrize("slots", [1, 3, 7])
def test_mpcl_matches_loop_reference(slots):
    image, text = _unit(6, 16, seed=5), _unit(6, slots, 16, seed=6)
    logit_scale = torch.tensor(2.3, dtype=torch.float64)
    ours = multi_positive_contrastive_loss(image, text, logit_scale)
    assert float(ours) == pytest.approx(reference_mpcl(image, text, logit_scale), rel=1e-9)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_group_patches_matches_loop_reference(threshold):
    text, patches = _unit(3, 4, 16, seed=7), _unit(3, 9, 16, seed=8)
    grouped, weights = group_patches(text, patches, threshold)
    torch.testing.assert_close(grouped, reference_grouped(text, patches, threshold))
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    assert (weights == 0).any(), "the threshold should zero some patch weights"


def test_group_patches_with_identical_patches_weighs_uniformly():
    text = _unit(2, 3, 8, seed=9)
    patches = _unit(2, 1, 8, seed=10).expand(2, 5, 8)
    grouped, weights = group_patches(text, patches)
    torch.testing.assert_close(weights, torch.full((2, 3, 5), 0.2, dtype=torch.float64))
    torch.testing.assert_close(grouped, patches[:, :3])


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_grouping_loss_matches_loop_reference(negatives):
    text, patches = _unit(4, 3, 16, seed=11), _unit(4, 9, 16, seed=12)
    logit_scale = torch.tensor(1.7, dtype=torch.float64)
    ours = grouping_loss(text, patches, logit_scale, negatives=negatives)
    assert float(ours) == pytest.approx(reference_grouping(text, patches, logit_scale, negatives), rel=1e-9)


def reference_cross_image_grouping(text, patches, logit_scale) -> float:
    """Every text grouped over every image's patches; per slot, InfoNCE over images and over texts."""
    s = min(math.exp(float(logit_scale)), 100.0)
    batch, slots, _ = text.shape
    score = [[[0.0] * batch for _ in range(batch)] for _ in range(slots)]  # [slot][text][image]
    for j in range(slots):
        for i in range(batch):
            for c in range(batch):
                g = reference_grouped(text[i, j][None, None], patches[c][None])[0, 0]
                score[j][i][c] = s * _dot(text[i, j], g)
    total = 0.0
    for j in range(slots):
        for i in range(batch):
            text_to_image = _ce(score[j][i], i)
            image_to_text = _ce([score[j][n][i] for n in range(batch)], i)
            total += 0.5 * (text_to_image + image_to_text)
    return total / (slots * batch)


def test_cross_image_grouping_matches_loop_reference():
    text, patches = _unit(4, 3, 16, seed=30), _unit(4, 9, 16, seed=31)
    logit_scale = torch.tensor(1.7, dtype=torch.float64)
    ours = cross_image_grouping_loss(text, patches, logit_scale)
    assert float(ours) == pytest.approx(reference_cross_image_grouping(text, patches, logit_scale), rel=1e-9)


@pytest.mark.parametrize("weights_grad", [True, False])
def test_cross_image_grouping_gradient_equals_the_pooled_form(weights_grad):
    """The loss never forms the pooled embeddings (it scores through the patches' Gram matrix);
    its gradients must equal those of the form that pools every text over every image."""
    text, patches = _unit(4, 3, 16, seed=37).requires_grad_(True), _unit(4, 9, 16, seed=38).requires_grad_(True)
    logit_scale = torch.tensor(1.2, dtype=torch.float64)
    cross_image_grouping_loss(text, patches, logit_scale, weights_grad=weights_grad).backward()
    t, p = text.detach().clone().requires_grad_(True), patches.detach().clone().requires_grad_(True)
    every_text = t.reshape(1, 12, 16).expand(4, -1, -1)
    grouped, _ = group_patches(every_text, p, weights_grad=weights_grad)  # [image, text, D]
    score = (grouped * every_text).sum(-1).reshape(4, 4, 3)  # [image, text, slot]
    target, total = torch.arange(4), 0.0
    for k in range(3):
        logits = math.exp(1.2) * score[:, :, k].T  # [text, image]
        total = total + 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    (total / 3).backward()
    torch.testing.assert_close(text.grad, t.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(patches.grad, p.grad, rtol=1e-9, atol=1e-12)


def composed_pooling_weights(similarity, threshold):
    """The pooling weights as composed autograd ops: what dreamlip.losses' autograd functions compute."""
    num_patches = similarity.shape[-1]
    threshold = 1.0 / num_patches if threshold is None else threshold
    low, high = similarity.amin(dim=-1, keepdim=True), similarity.amax(dim=-1, keepdim=True)
    normalised = (similarity - low) / (high - low).clamp_min(torch.finfo(similarity.dtype).eps)
    weights = normalised * (normalised >= threshold)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 1.0 / num_patches)


def composed_cross_scores(text_emb, patch_emb, threshold, weights_grad):
    batch, slots, dim = text_emb.shape
    similarity = text_emb.reshape(1, batch * slots, dim) @ patch_emb.transpose(1, 2)
    weights = composed_pooling_weights(similarity if weights_grad else similarity.detach(), threshold)
    pooled_dot_text = (weights * similarity).sum(dim=-1)
    gram = patch_emb @ patch_emb.transpose(1, 2)
    pooled_norm = ((weights @ gram) * weights).sum(dim=-1).clamp_min(1e-24).sqrt()
    return (pooled_dot_text / pooled_norm).reshape(patch_emb.shape[0], batch, slots)


@pytest.mark.parametrize("case", ["cross", "cross, pooling weights constant", "cross, rows", "cross, threshold 0.5",
                                  "image negatives", "tokens"])
def test_grouping_terms_equal_their_composed_form_to_the_bit(case, monkeypatch):
    """The grouping terms' autograd functions (block-wise, in place) against the same loss written as
    composed ops, in float32 as training runs: the loss and every gradient equal bit for bit (the
    objective must train exactly as it did), with tied patches (flat backgrounds), an image whose
    patches are all equal and a batch that ends in a partial block."""
    import dreamlip.losses as losses

    generator = torch.Generator().manual_seed(50)
    patches = torch.randn(24, 64, 32, generator=generator)
    patches[:, 32:] = patches[:, :1]
    patches[3] = patches[3, :1]
    patches = F.normalize(patches, dim=-1)
    text = F.normalize(torch.randn(24, 3, 32, generator=generator), dim=-1)
    tokens = F.normalize(torch.randn(24, 2, 6, 32, generator=generator), dim=-1)
    mask = torch.rand(24, 2, 6, generator=generator) > 0.3
    scale = torch.tensor(2.7)
    loss = {
        "cross": lambda t, p, k: losses.cross_image_grouping_loss(t, p, scale),
        "cross, pooling weights constant": lambda t, p, k: losses.cross_image_grouping_loss(t, p, scale, weights_grad=False),
        "cross, rows": lambda t, p, k: losses.cross_image_grouping_loss(t, p, scale, rows=slice(8, 16)),
        "cross, threshold 0.5": lambda t, p, k: losses.cross_image_grouping_loss(t, p, scale, threshold=0.5),
        "image negatives": lambda t, p, k: losses.grouping_loss(t, p, scale),
        "tokens": lambda t, p, k: losses.token_grouping_loss(k, mask, p, scale),
    }[case]

    def loss_and_gradients():
        inputs = [x.clone().requires_grad_(True) for x in (text, patches, tokens)]
        value = loss(*inputs)
        return [value, *torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)]

    ours = loss_and_gradients()
    monkeypatch.setattr(losses, "_pooling_weights", composed_pooling_weights)
    monkeypatch.setattr(losses, "_cross_scores", composed_cross_scores)
    composed = loss_and_gradients()
    assert ours[0].dtype == torch.float32 and ours[2].abs().sum() > 0  # every case trains the patches
    for name, a, b in zip(("loss", "text gradient", "patch gradient", "token gradient"), ours, composed):
        assert torch.equal(a, b), f"{name}: differs by up to {(a - b).abs().max().item():.3g}"


def test_cross_image_grouping_rows_are_shares_of_the_loss_and_its_gradients():
    """A gathered batch split in two: each half's rows (its texts against every image, every text
    against its images) is a share whose mean over the halves is the loop reference, and whose
    summed gradients are the full loss's times two (what DDP's averaging then halves)."""
    text, patches = _unit(6, 3, 16, seed=39).requires_grad_(True), _unit(6, 9, 16, seed=40).requires_grad_(True)
    logit_scale = torch.tensor(1.4, dtype=torch.float64)
    shares = [cross_image_grouping_loss(text, patches, logit_scale, rows=rows) for rows in (slice(0, 3), slice(3, 6))]
    reference = reference_cross_image_grouping(text.detach(), patches.detach(), logit_scale)
    assert (sum(shares) / 2).item() == pytest.approx(reference, rel=1e-9)
    assert shares[0].item() != pytest.approx(shares[1].item(), rel=1e-3)  # the shares are not the whole loss each
    sum(shares).backward()
    t, p = text.detach().clone().requires_grad_(True), patches.detach().clone().requires_grad_(True)
    (2 * cross_image_grouping_loss(t, p, logit_scale)).backward()
    torch.testing.assert_close(text.grad, t.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(patches.grad, p.grad, rtol=1e-9, atol=1e-12)


def test_group_gather_is_for_cross_image_subcaption_grouping_only():
    for negatives in ("image", "batch"):
        with pytest.raises(ValueError, match="group_gather gathers the cross-image negatives"):
            DreamLIPObjective(group_negatives=negatives, group_gather=True)
    with pytest.raises(ValueError, match="group_gather gathers the cross-image negatives"):
        DreamLIPObjective(group_negatives="image", group_granularity="token", group_gather=True)
    # one process: the gathered batch is the batch, so the loss is the rank-local one
    image, text, patches = _unit(4, 16, seed=41), _unit(4, 4, 16, seed=42), _unit(4, 9, 16, seed=43)
    scale, local = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for local_loss in (False, True):
        gathered = _terms(_dreamlip(local, group_gather=True, local_loss=local_loss), image, text, scale, patches)
        assert gathered["group"].item() == pytest.approx(reference_cross_image_grouping(text[:, 1:], patches, local), rel=1e-9)


def test_cross_negatives_in_the_combined_loss_group_the_subcaptions_over_every_image():
    image, text, patches = _unit(4, 16, seed=32), _unit(4, 4, 16, seed=33), _unit(4, 9, 16, seed=34)
    scale, local = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    terms = _terms(_dreamlip(local, group_negatives="cross", group_weight=0.5), image, text, scale, patches)
    assert terms["group"].item() == pytest.approx(0.5 * reference_cross_image_grouping(text[:, 1:], patches, local), rel=1e-9)
    assert terms["mpcl"].item() == pytest.approx(reference_mpcl(image, text, scale), rel=1e-9)


def test_cross_image_grouping_needs_the_right_image_to_hold_the_text():
    """Texts drawn from their own image's patches: the right pairing scores far lower than a shuffled one."""
    patches = _unit(6, 9, 16, seed=35)
    text = F.normalize(patches[:, :3] + 0.1 * _unit(6, 3, 16, seed=36), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    right = cross_image_grouping_loss(text, patches, logit_scale)
    wrong = cross_image_grouping_loss(text, patches[torch.tensor([1, 2, 3, 4, 5, 0])], logit_scale)
    assert wrong > right + 1.0


def test_negatives_choice_changes_the_loss():
    text, patches = _unit(4, 3, 16, seed=13), _unit(4, 9, 16, seed=14)
    logit_scale = torch.tensor(2.0, dtype=torch.float64)
    by_image = grouping_loss(text, patches, logit_scale, negatives="image")
    by_batch = grouping_loss(text, patches, logit_scale, negatives="batch")
    assert not torch.isclose(by_image, by_batch)


def test_shuffling_subcaptions_across_images_changes_the_loss():
    """Pairing sub-captions with the wrong images (the authors' regrouping bug) must show up."""
    image = _unit(8, 16, seed=15)
    # Each image's texts lie near the image, so the right pairing has a clearly lower loss.
    text = F.normalize(image[:, None] + 0.3 * _unit(8, 4, 16, seed=16), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    right = multi_positive_contrastive_loss(image, text, logit_scale)
    # Image-major text laid out slot-major and reshaped without a permute, as in the released code.
    wrong = text.transpose(0, 1).reshape(8, 4, 16)
    assert multi_positive_contrastive_loss(image, wrong, logit_scale) > right + 0.5


def test_permuting_slots_within_an_image_keeps_mpcl():
    image, text = _unit(8, 16, seed=17), _unit(8, 5, 16, seed=18)
    logit_scale = torch.tensor(2.0, dtype=torch.float64)
    permuted = text[:, torch.tensor([3, 0, 4, 1, 2])]
    torch.testing.assert_close(
        multi_positive_contrastive_loss(image, text, logit_scale),
        multi_positive_contrastive_loss(image, permuted, logit_scale),
    )


def test_combined_loss_weights_and_slots():
    image, text, patches = _unit(4, 16, seed=19), _unit(4, 4, 16, seed=20), _unit(4, 9, 16, seed=21)
    scale, local = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    terms = _terms(_dreamlip(local, global_weight=0.5, group_weight=2.0, group_negatives="image"), image, text, scale, patches)
    expected_group = grouping_loss(text[:, 1:], patches, local)  # slot 0 (raw caption) is not grouped
    assert list(terms) == ["mpcl", "group"]
    torch.testing.assert_close(terms["group"], 2.0 * expected_group)
    torch.testing.assert_close(terms["mpcl"], 0.5 * multi_positive_contrastive_loss(image, text, scale))


@pytest.mark.parametrize("temperature", ["local", "global"])
@pytest.mark.parametrize("slots", ["subcaptions", "all"])
def test_grouping_options_match_the_loop_reference(temperature, slots):
    """Which temperature and which slots the grouping term uses, against METHOD.md's loops."""
    image, text, patches = _unit(3, 16, seed=40), _unit(3, 4, 16, seed=41), _unit(3, 9, 16, seed=42)
    scale, local = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    objective = _dreamlip(local, group_temperature=temperature, group_slots=slots, group_weight=0.5,
                          group_negatives="image", group_warmup_steps=5)
    terms = _terms(objective, image, text, scale, patches, step=1)  # the second step of 5 warming up: 2/5 of the weight
    grouped_text = text if slots == "all" else text[:, 1:]
    expected = reference_grouping(grouped_text, patches, scale if temperature == "global" else local, "image")
    assert terms["group"].item() == pytest.approx(0.4 * 0.5 * expected, rel=1e-9)
    assert terms["mpcl"].item() == pytest.approx(reference_mpcl(image, text, scale), rel=1e-9)
    assert _terms(objective, image, text, scale, patches, step=4)["group"].item() == pytest.approx(0.5 * expected, rel=1e-9)


def test_a_warm_up_as_a_share_of_the_run_is_the_same_ramp_in_steps():
    """``group_warmup_fraction`` of a run of N steps ramps as ``group_warmup_steps`` = fraction x N;
    explicit steps win; without the run's length it says so instead of guessing."""
    image, text, patches = _unit(3, 16, seed=44), _unit(3, 4, 16, seed=45), _unit(3, 9, 16, seed=46)
    scale = torch.tensor(2.0, dtype=torch.float64)
    by_share = _dreamlip(1.0, group_warmup_fraction=0.25)
    by_share.set_run_length(40)
    by_steps, constant = _dreamlip(1.0, group_warmup_steps=10), _dreamlip(1.0)
    full = _terms(constant, image, text, scale, patches)["group"].item()
    for step in (0, 4, 9, 10, 39):
        ramped = _terms(by_share, image, text, scale, patches, step=step)["group"].item()
        assert ramped == _terms(by_steps, image, text, scale, patches, step=step)["group"].item()
        assert ramped == pytest.approx(min(1.0, (step + 1) / 10) * full, rel=1e-12)
    both = _dreamlip(1.0, group_warmup_steps=2, group_warmup_fraction=1.0)
    both.set_run_length(40)
    assert _terms(both, image, text, scale, patches, step=1)["group"].item() == pytest.approx(full, rel=1e-12)
    with pytest.raises(ValueError, match="is a share of the run, whose length this objective was not told"):
        _terms(_dreamlip(1.0, group_warmup_fraction=1.0), image, text, scale, patches)
    with pytest.raises(ValueError, match="group_warmup_fraction is a share of the run, 0 to 1"):
        DreamLIPObjective(group_warmup_fraction=4.0)


def test_a_cool_down_brings_the_grouping_weight_back_to_zero_by_the_runs_last_step():
    """``group_cooldown_fraction`` of a run of N steps: full weight until its last fraction x N
    steps, then falling linearly to 0 at step N - 1, on top of the warm-up's ramp."""
    image, text, patches = _unit(3, 16, seed=47), _unit(3, 4, 16, seed=48), _unit(3, 9, 16, seed=49)
    scale = torch.tensor(2.0, dtype=torch.float64)
    full = _terms(_dreamlip(1.0), image, text, scale, patches)["group"].item()
    both = _dreamlip(1.0, group_warmup_fraction=0.25, group_cooldown_fraction=0.25)
    both.set_run_length(40)
    expected = {0: 0.1, 9: 1.0, 29: 1.0, 30: 0.9, 35: 0.4, 39: 0.0}  # ramp over 10 steps in, 10 out
    for step, factor in expected.items():
        assert _terms(both, image, text, scale, patches, step=step)["group"].item() == pytest.approx(factor * full, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="group_cooldown_fraction=0.5 is a share of the run, whose length"):
        _terms(_dreamlip(1.0, group_cooldown_fraction=0.5), image, text, scale, patches)
    with pytest.raises(ValueError, match="group_cooldown_fraction is a share of the run, 0 to 1"):
        DreamLIPObjective(group_cooldown_fraction=-0.1)


def _grouping_grads(option: str, text, patches):
    """The grouping term alone (weight 1) with ``option`` true and false: its value checked against
    the loop reference both times, and the gradients it leaves on the texts and the patches."""
    image = _unit(3, 16, seed=43)
    scale, local = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    grads = {}
    for value in (True, False):
        t, p = text.clone().requires_grad_(True), patches.clone().requires_grad_(True)
        settings = {"group_text_grad": True} | {option: value}  # both towers' gradients, but for the option's
        terms = _terms(_dreamlip(local, global_weight=0.0, group_negatives="image", **settings), image, t, scale, p)
        sum(terms.values()).backward()
        assert terms["group"].item() == pytest.approx(reference_grouping(text[:, 1:], patches, local, "image"), rel=1e-9)
        grads[value] = (t.grad, p.grad)
    return grads


def test_grouping_stop_gradient_keeps_the_value_and_spares_the_texts():
    grads = _grouping_grads("group_text_grad", _unit(3, 4, 16, seed=45), _unit(3, 9, 16, seed=44))
    assert grads[True][0].abs().sum() > 0
    assert torch.count_nonzero(grads[False][0]) == 0


def test_grouping_text_gradient_share_scales_only_the_texts_gradient():
    text, patches = _unit(3, 4, 16, seed=45), _unit(3, 9, 16, seed=44)
    full, share = _grouping_grads("group_text_grad", text, patches), {}
    for value in (0.25, 0.0):
        t, p = text.clone().requires_grad_(True), patches.clone().requires_grad_(True)
        terms = _terms(_dreamlip(1.5, global_weight=0.0, group_negatives="image", group_text_grad=value), _unit(3, 16, seed=43), t,
                       torch.tensor(2.0, dtype=torch.float64), p)
        assert terms["group"].item() == pytest.approx(reference_grouping(text[:, 1:], patches, 1.5, "image"), rel=1e-9)
        terms["group"].backward()
        share[value] = (t.grad, p.grad)
    torch.testing.assert_close(share[0.25][0], 0.25 * full[True][0])
    torch.testing.assert_close(share[0.25][1], full[True][1])
    assert share[0.0][0] is None and torch.count_nonzero(full[False][0]) == 0  # 0 is the stop-gradient: no path back
    with pytest.raises(ValueError, match="share of the gradient, 0 to 1"):
        DreamLIPObjective(group_text_grad=1.5)
    config = load_config(overrides=["loss.group_text_grad=0.25"])
    assert config.loss.group_text_grad == 0.25 and load_config(overrides=["loss.group_text_grad=false"]).loss.group_text_grad is False


def test_grouping_text_gradient_reaches_the_texts_from_its_start_on():
    """``group_text_grad_start``: before that share of the run the term trains the patches only,
    from it on the texts get ``group_text_grad``'s share; the value is the same at every step."""
    text, patches = _unit(3, 4, 16, seed=45), _unit(3, 9, 16, seed=44)
    full = _grouping_grads("group_text_grad", text, patches)
    objective = _dreamlip(1.5, global_weight=0.0, group_negatives="image", group_text_grad=True, group_text_grad_start=0.5)
    objective.set_run_length(10)
    grads = {}
    for step in (4, 5):  # the last step before the run's half, and the first of the second half
        t, p = text.clone().requires_grad_(True), patches.clone().requires_grad_(True)
        terms = _terms(objective, _unit(3, 16, seed=43), t, torch.tensor(2.0, dtype=torch.float64), p, step=step)
        assert terms["group"].item() == pytest.approx(reference_grouping(text[:, 1:], patches, 1.5, "image"), rel=1e-9)
        terms["group"].backward()
        grads[step] = (t.grad, p.grad)
    assert grads[4][0] is None  # the stop: no path back to the texts
    torch.testing.assert_close(grads[4][1], full[False][1])
    torch.testing.assert_close(grads[5][0], full[True][0])
    torch.testing.assert_close(grads[5][1], full[True][1])
    with pytest.raises(ValueError, match="group_text_grad_start=0.5 is a share of the run, whose length"):
        _terms(_dreamlip(1.5, group_text_grad=True, group_text_grad_start=0.5), _unit(3, 16, seed=43), text,
               torch.tensor(2.0, dtype=torch.float64), patches)
    with pytest.raises(ValueError, match="group_text_grad_start is a share of the run, 0 to 1"):
        DreamLIPObjective(group_text_grad_start=1.5)


def test_grouping_image_stop_gradient_keeps_the_value_and_spares_the_patches():
    grads = _grouping_grads("group_image_grad", _unit(3, 4, 16, seed=45), _unit(3, 9, 16, seed=44))
    assert grads[True][1].abs().sum() > 0 and grads[False][1] is None  # no path back to the patches
    torch.testing.assert_close(grads[False][0], grads[True][0])  # the texts' gradient is the same either way
    with pytest.raises(ValueError, match="group_text_grad and loss.group_image_grad are both false"):
        DreamLIPObjective(group_text_grad=False, group_image_grad=False)


def test_grouping_text_adapter_starts_as_the_identity_then_maps_the_grouped_texts():
    image, text, patches = _unit(3, 16, seed=60), _unit(3, 4, 16, seed=61), _unit(3, 9, 16, seed=62)
    scale, local = torch.tensor(2.0, dtype=torch.float64), 1.5
    plain = _terms(_dreamlip(local), image, text, scale, patches)
    adapted = _dreamlip(local, group_text_adapter=True, embed_dim=16)
    at_start = _terms(adapted, image, text, scale, patches)
    assert at_start["mpcl"].item() == plain["mpcl"].item()
    assert at_start["group"].item() == pytest.approx(plain["group"].item(), rel=1e-12)
    delta = 0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(63), dtype=torch.float64)
    with torch.no_grad():
        adapted.group_text_delta.copy_(delta)
    terms = _terms(adapted, image, text, scale, patches)
    # Independent form: each sub-caption mapped by (I + delta) and renormalised, one vector at a time.
    mapped = torch.stack([
        torch.stack([F.normalize((torch.eye(16, dtype=torch.float64) + delta) @ text[i, j], dim=0) for j in range(1, 4)])
        for i in range(3)
    ])
    assert terms["mpcl"].item() == plain["mpcl"].item()  # the global term reads the texts unmapped
    assert terms["group"].item() == pytest.approx(reference_cross_image_grouping(mapped, patches, torch.tensor(local)), rel=1e-9)
    terms["group"].backward()
    assert adapted.group_text_delta.grad.abs().sum() > 0  # it learns with the texts' gradient stopped (the default)
    torch.testing.assert_close(adapted.local_text(text[:, 1:]), mapped)


def test_grouping_text_adapter_decays_toward_the_identity_and_needs_sub_caption_granularity():
    objective = DreamLIPObjective(group_text_adapter=True, embed_dim=8)
    groups = parameter_groups(objective, weight_decay=0.1, lr=1.0)
    decayed = [param for group in groups if group["weight_decay"] for param in group["params"]]
    assert len(decayed) == 1 and decayed[0] is objective.group_text_delta  # W = I + delta: decay pulls W to I
    assert DreamLIPObjective().group_text_delta is None and "group_text_delta" not in DreamLIPObjective().state_dict()
    with pytest.raises(ValueError, match="group_text_adapter .* group_granularity=subcaption"):
        DreamLIPObjective(group_text_adapter=True, embed_dim=8, group_granularity="token", group_negatives="image")


def test_grouping_with_constant_weights_keeps_the_value_and_only_the_pooling_gradient():
    text = _unit(3, 4, 16, seed=47)
    grads = _grouping_grads("group_weights_grad", text, _unit(3, 9, 16, seed=48))
    # Independent form: the loop reference's weights as constants, pooling and InfoNCE written out here.
    sub = text[:, 1:]
    patches = _unit(3, 9, 16, seed=48).requires_grad_(True)
    sims = sub @ patches.detach().transpose(1, 2)
    normed = (sims - sims.amin(-1, keepdim=True)) / (sims.amax(-1, keepdim=True) - sims.amin(-1, keepdim=True))
    kept = normed * (normed >= 1 / 9)
    grouped = F.normalize((kept / kept.sum(-1, keepdim=True)) @ patches, dim=-1)
    s = math.exp(1.5)
    total = 0.0
    for i in range(3):
        logits = s * sub[i] @ grouped[i].T  # [text, grouped]
        target = torch.arange(3)
        total = total + 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    (total / 3).backward()
    torch.testing.assert_close(grads[False][1], patches.grad, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grads[True][1], grads[False][1])


def test_grouping_option_typos_are_clear_errors():
    with pytest.raises(ValueError, match="group_temperature"):
        DreamLIPObjective(group_temperature="shared")
    with pytest.raises(ValueError, match="group_slots"):
        DreamLIPObjective(group_slots="raw")
    with pytest.raises(ValueError, match="group_granularity"):
        DreamLIPObjective(group_granularity="word", group_negatives="image")


def _token_inputs(seed=50):
    """Token embeddings [B=3, T=3, L=6, D=16] whose masks hold padding and start/end positions of
    every kind: text (0, 1) has one valid token, text (2, 2) none; invalid positions hold unit
    vectors (start and end tokens) or zeros (padding), which the loss must both ignore."""
    tokens = _unit(3, 3, 6, 16, seed=seed)
    lengths = torch.tensor([[4, 1, 3], [4, 2, 4], [3, 4, 0]])  # valid tokens of each text, from position 1
    position = torch.arange(6)
    mask = (position >= 1) & (position <= lengths.unsqueeze(-1))
    tokens = tokens.masked_fill((position > lengths.unsqueeze(-1) + 1).unsqueeze(-1), 0.0)  # past the end token
    return tokens, mask, _unit(3, 9, 16, seed=seed + 1)


def _ce_of(logits: list[torch.Tensor], target: int) -> torch.Tensor:
    return torch.logsumexp(torch.stack(logits), 0) - logits[target]


def reference_token_grouping(tokens, mask, patches, logit_scale, threshold=None, weights_grad=True):
    """SPARC's fine-grained loss with loops over texts, tokens and patches, on torch scalars so that
    autograd runs through it: each valid token's min-max, thresholded, renormalised patch weights
    (constants with ``weights_grad=False``), its grouped embedding, then per text the symmetric
    InfoNCE among its valid tokens; the mean over tokens, then over texts with two or more."""
    s = min(math.exp(float(logit_scale)), 100.0)
    batch, slots, length, _ = tokens.shape
    num_patches = patches.shape[1]
    threshold = 1.0 / num_patches if threshold is None else threshold
    per_text = []
    for b in range(batch):
        for t in range(slots):
            valid = [position for position in range(length) if mask[b, t, position]]
            if len(valid) < 2:
                continue
            grouped = []
            for position in valid:
                sims = [(tokens[b, t, position] * patches[b, n]).sum() for n in range(num_patches)]
                if not weights_grad:
                    sims = [a.detach() for a in sims]
                low, high = min(sims), max(sims)
                normed = [(a - low) / (high - low) for a in sims]
                kept = [w if w >= threshold else 0.0 * w for w in normed]
                vector = sum(kept[n] / sum(kept) * patches[b, n] for n in range(num_patches))
                grouped.append(vector / vector.norm())
            terms = []
            for i, position in enumerate(valid):
                token_to_grouped = [s * (tokens[b, t, position] * g).sum() for g in grouped]
                grouped_to_token = [s * (grouped[i] * tokens[b, t, other]).sum() for other in valid]
                terms.append(0.5 * (_ce_of(token_to_grouped, i) + _ce_of(grouped_to_token, i)))
            per_text.append(sum(terms) / len(terms))
    return sum(per_text) / len(per_text)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_token_grouping_matches_loop_reference(threshold):
    tokens, mask, patches = _token_inputs()
    logit_scale = torch.tensor(1.7, dtype=torch.float64)
    ours = token_grouping_loss(tokens, mask, patches, logit_scale, threshold)
    assert float(ours) == pytest.approx(float(reference_token_grouping(tokens, mask, patches, logit_scale, threshold)), rel=1e-9)


@pytest.mark.parametrize("weights_grad", [True, False])
def test_token_grouping_gradient_equals_the_loop_references(weights_grad):
    tokens, mask, patches = _token_inputs(seed=52)
    logit_scale = torch.tensor(1.2, dtype=torch.float64)
    grads = []
    for loss in (token_grouping_loss, reference_token_grouping):
        t, p = tokens.clone().requires_grad_(True), patches.clone().requires_grad_(True)
        loss(t, mask, p, logit_scale, weights_grad=weights_grad).backward()
        grads.append((t.grad, p.grad))
    (ours_tokens, ours_patches), (loop_tokens, loop_patches) = grads
    torch.testing.assert_close(ours_tokens, loop_tokens, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_patches, loop_patches, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(ours_tokens[~mask]) == 0, "start, end and padding positions got a gradient"


def test_token_grouping_without_two_valid_tokens_anywhere_is_zero():
    tokens, mask, patches = _token_inputs()
    mask = mask & (torch.arange(6) <= 1)  # one valid token per text at most
    tokens.requires_grad_(True)
    loss = token_grouping_loss(tokens, mask, patches, torch.tensor(1.0, dtype=torch.float64))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(tokens.grad) == 0


@pytest.mark.parametrize("temperature", ["local", "global"])
@pytest.mark.parametrize("slots", ["subcaptions", "all"])
def test_token_granularity_in_the_combined_loss(temperature, slots):
    image, text = _unit(3, 16, seed=53), _unit(3, 3, 16, seed=54)
    tokens, mask, patches = _token_inputs(seed=55)
    scale, local = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    objective = _dreamlip(local, group_granularity="token", group_negatives="image", group_temperature=temperature,
                          group_slots=slots, group_weight=0.5, group_warmup_steps=5)
    terms = _terms(objective, image, text, scale, patches, step=1, token_emb=tokens, token_mask=mask)
    grouped = slice(None) if slots == "all" else slice(1, None)
    expected = reference_token_grouping(tokens[:, grouped], mask[:, grouped], patches, scale if temperature == "global" else local)
    assert terms["group"].item() == pytest.approx(0.4 * 0.5 * float(expected), rel=1e-9)
    assert terms["mpcl"].item() == pytest.approx(reference_mpcl(image, text, scale), rel=1e-9)


def test_token_granularity_groups_a_single_caption_with_all_slots():
    """A text's tokens are their own negatives: the raw caption alone (K = 0) is grouped too."""
    tokens, mask, patches = _token_inputs(seed=56)
    image, text, scale = _unit(3, 16, seed=57), _unit(3, 1, 16, seed=58), torch.tensor(1.0, dtype=torch.float64)
    objective = _dreamlip(scale, group_granularity="token", group_negatives="image", group_slots="all", text_slots=1)
    assert objective.needs.tokens and objective.local_logit_scale.requires_grad
    terms = _terms(objective, image, text, scale, patches, token_emb=tokens[:, :1], token_mask=mask[:, :1])
    assert terms["group"].item() == pytest.approx(float(reference_token_grouping(tokens[:, :1], mask[:, :1], patches, scale)), rel=1e-9)


def test_token_granularity_stop_gradient_spares_the_tokens():
    image, text = _unit(3, 16, seed=59), _unit(3, 3, 16, seed=60)
    tokens, mask, patches = _token_inputs(seed=61)
    scale = torch.tensor(1.0, dtype=torch.float64)
    grads = {}
    for text_grad in (True, False):
        t, p = tokens.clone().requires_grad_(True), patches.clone().requires_grad_(True)
        objective = _dreamlip(scale, global_weight=0.0, group_granularity="token", group_negatives="image", group_text_grad=text_grad)
        sum(_terms(objective, image, text, scale, p, token_emb=t, token_mask=mask).values()).backward()
        grads[text_grad] = (t.grad, p.grad)
    assert grads[True][0].abs().sum() > 0 and grads[False][0] is None
    torch.testing.assert_close(grads[True][1], grads[False][1])  # the patches' gradient is the same either way


def test_token_granularity_invalid_combinations_are_clear_errors():
    for negatives in ("cross", "batch"):
        with pytest.raises(ValueError, match="token-level grouping supports group_negatives=image"):
            DreamLIPObjective(group_granularity="token", group_negatives=negatives)
    image, text, patches = _unit(2, 8, seed=62), _unit(2, 3, 8, seed=63), _unit(2, 4, 8, seed=64)
    scale = torch.tensor(1.0, dtype=torch.float64)
    objective = _dreamlip(scale, group_granularity="token", group_negatives="image")
    assert objective.needs.tokens and not DreamLIPObjective().needs.tokens
    with pytest.raises(ValueError, match="token_emb and token_mask"):
        _terms(objective, image, text, scale, patches)
    with pytest.raises(ValueError, match="does not match token_emb"):
        token_grouping_loss(_unit(2, 3, 5, 8), torch.ones(2, 3, 4, dtype=torch.bool), patches, scale)


def test_plain_clip_needs_no_patches_and_freezes_the_grouping_temperature():
    """The ``clip`` variant: K = 0 leaves no two sub-captions to group, so the objective asks for no
    patch tokens, trains no grouping temperature and returns the CLIP loss alone."""
    image, text = _unit(4, 16, seed=22), _unit(4, 1, 16, seed=23)
    objective = DreamLIPObjective(text_slots=1)
    assert not objective.needs.patches and not objective.local_logit_scale.requires_grad
    scale = torch.tensor(2.0, dtype=torch.float64)
    terms = _terms(objective, image, text, scale)
    assert list(terms) == ["mpcl"]
    torch.testing.assert_close(terms["mpcl"], ClipLoss()(image, text[:, 0], scale.exp()))
    assert not DreamLIPObjective(group_weight=0.0, text_slots=7).needs.patches
    assert DreamLIPObjective(text_slots=7).needs.patches and DreamLIPObjective(text_slots=7).local_logit_scale.requires_grad
    assert not DreamLIPObjective(group_temperature="global", text_slots=7).local_logit_scale.requires_grad


def test_grouping_without_patches_is_a_clear_error():
    image, text = _unit(4, 16, seed=24), _unit(4, 3, 16, seed=25)
    with pytest.raises(ValueError, match="patch_emb"):
        _terms(_dreamlip(), image, text, torch.tensor(2.0, dtype=torch.float64))


def test_mismatched_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="do not pair up"):
        multi_positive_contrastive_loss(_unit(4, 16), _unit(5, 2, 16), torch.tensor(1.0))
    with pytest.raises(ValueError, match="3 dimensions"):
        multi_positive_contrastive_loss(_unit(4, 16), _unit(4, 16), torch.tensor(1.0))
    with pytest.raises(ValueError, match="negatives"):
        grouping_loss(_unit(2, 2, 8), _unit(2, 4, 8), torch.tensor(1.0), negatives="rank")


def reference_sigmoid(image, text, logit_scale, logit_bias):
    """SigLIP's loss (paper Eq. 1) with loops over images and texts, on torch scalars so autograd
    runs through it: -log sigmoid(z x) = log(1 + exp(-z x)) for every image i and text (n, j), z = 1
    when n == i; summed, over B images times T texts."""
    scale = logit_scale.exp()
    batch, slots, _ = text.shape
    total = 0.0
    for i in range(batch):
        for n in range(batch):
            for j in range(slots):
                z = 1.0 if n == i else -1.0
                logit = scale * (image[i] * text[n, j]).sum() + logit_bias
                total = total + torch.log(1 + torch.exp(-z * logit))
    return total / (batch * slots)


def test_sigmoid_loss_with_one_text_equals_open_clip_siglip_loss():
    image, text = _unit(8, 16, seed=70), _unit(8, 16, seed=71)
    logit_scale, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = multi_positive_sigmoid_loss(image, text[:, None], logit_scale, bias)
    torch.testing.assert_close(ours, SigLipLoss()(image, text, logit_scale.exp(), bias))


@pytest.mark.parametrize("slots", [1, 3])
def test_multi_positive_sigmoid_loss_and_gradients_match_the_loop_reference(slots):
    leaves = [_unit(5, 16, seed=72), _unit(5, slots, 16, seed=73), torch.tensor(2.1, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)]
    grads = []
    for loss in (multi_positive_sigmoid_loss, reference_sigmoid):
        inputs = [leaf.clone().requires_grad_(True) for leaf in leaves]
        value = loss(*inputs)
        value.backward()
        grads.append((value.detach(), [x.grad for x in inputs]))
    (ours, our_grads), (loops, loop_grads) = grads
    torch.testing.assert_close(ours, loops, rtol=1e-9, atol=0)
    for name, mine, theirs in zip(("image", "text", "logit_scale", "bias"), our_grads, loop_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_sigmoid_rows_are_shares_of_the_loss_and_its_gradients():
    """Each rank's images against every rank's texts: the mean of the two halves' terms is the whole
    batch's loss, and their summed gradients are twice its gradients (what DDP's mean halves)."""
    image, text = _unit(6, 16, seed=74).requires_grad_(True), _unit(6, 3, 16, seed=75).requires_grad_(True)
    logit_scale, bias = torch.tensor(1.9, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    shares = [multi_positive_sigmoid_loss(image[rows], text, logit_scale, bias, rows) for rows in (slice(0, 3), slice(3, 6))]
    assert (sum(shares) / 2).item() == pytest.approx(reference_sigmoid(image.detach(), text.detach(), logit_scale, bias).item(), rel=1e-9)
    sum(shares).backward()
    i, t = image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True)
    (2 * multi_positive_sigmoid_loss(i, t, logit_scale, bias)).backward()
    torch.testing.assert_close(image.grad, i.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(text.grad, t.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="is not rows 0:2"):
        multi_positive_sigmoid_loss(image[:3], text, logit_scale, bias, slice(0, 2))


def test_siglip_objective_starts_at_siglips_scale_and_bias_and_owns_the_bias():
    objective = SigLIPObjective().double()
    assert objective.model_logit_scale_init == pytest.approx(math.log(10.0))
    assert objective.logit_bias.item() == -10.0 and objective.logit_bias.requires_grad
    assert not objective.needs.patches and not objective.needs.tokens and objective.needs.logit_scale
    image, text = _unit(4, 16, seed=76), _unit(4, 3, 16, seed=77)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    terms = objective({"image_emb": image, "text_emb": text, "logit_scale": scale})
    assert list(terms) == ["sigmoid"]
    assert terms["sigmoid"].item() == pytest.approx(reference_sigmoid(image, text, scale, torch.tensor(-10.0)).item(), rel=1e-9)
    assert objective.scalars() == {"logit_bias": -10.0} and objective.open_clip_state()["logit_bias"].item() == -10.0


@pytest.mark.parametrize("objective", ["siglip", "flair"])
def test_the_sigmoid_bias_starts_at_the_batchs_prior_or_where_set(objective):
    """auto: the log-odds of a match when each of B images meets every image's texts, log(1 / (B - 1));
    a number as given; with no batch (a checkpoint's objective, whose bias it loads) the papers' -10."""
    field = {"siglip": "sigmoid_bias_init", "flair": "flair_bias_init"}[objective]

    def start(global_batch, **setting):
        return build_objective(LossConfig(objective=objective, **setting), text_slots=4, embed_dim=16, global_batch=global_batch).logit_bias.item()

    for batch in (2, 64, 32768):
        odds = 4 / (batch * 4 - 4)  # an image's 4 texts match, the other images' 4 (B - 1) do not
        assert start(batch) == pytest.approx(math.log(odds), rel=1e-6)
    assert start(32768) == pytest.approx(-10.4, abs=0.01)  # near the papers' -10 at SigLIP's batch
    assert start(64, **{field: -7.5}) == -7.5 and start(None) == -10.0


def reference_pool(pooler, query, patches):
    """FLAIR's text-conditioned pooling written out for one text and one image: layer norms, each
    head's softmax over the patches' keys plus one zero key (whose value is zero), the heads'
    weighted values concatenated, the output projection."""
    attn = pooler.attn
    dim, heads = query.shape[-1], attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.split(dim)
    b_q, b_k, b_v = attn.in_proj_bias.split(dim)
    q = pooler.ln_q(query) @ w_q.T + b_q
    keys = [pooler.ln_k(p) @ w_k.T + b_k for p in patches]
    values = [pooler.ln_v(p) @ w_v.T + b_v for p in patches]
    width = dim // heads
    out = []
    for h in range(heads):
        part = slice(h * width, (h + 1) * width)
        scores = [(q[part] * k[part]).sum() / math.sqrt(width) for k in keys] + [q.new_zeros(())]  # the zero key
        weights = torch.softmax(torch.stack(scores), 0)
        out.append(sum(weights[n] * values[n][part] for n in range(len(values))))  # the zero value adds nothing
    return attn.out_proj(torch.cat(out))


def test_text_conditioned_pooler_matches_the_attention_written_out():
    torch.manual_seed(0)
    pooler = TextConditionedPooler(16, heads=4).double()
    queries, patches = _unit(2, 3, 16, seed=80), _unit(2, 5, 16, seed=81)
    ours = pooler(queries, patches)
    for b in range(2):
        for q in range(3):
            torch.testing.assert_close(ours[b, q], reference_pool(pooler, queries[b, q], patches[b]), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide the embedding width 16"):
        TextConditionedPooler(16, heads=3)


def reference_tcs(pooler, patches, text, logit_scale, bias, negative_slots):
    """FLAIR's L_tcs with loops: image i against its own texts (z = 1) and text negative_slots[i, j]
    of every other image j (z = -1), each pooled from image i's patches by that text alone;
    log(1 + exp(-z x)) summed over the row, over the row's count of texts, summed over images."""
    scale = logit_scale.exp()
    batch, slots, _ = text.shape
    total = 0.0
    for i in range(batch):
        row = [(text[i, j], 1.0) for j in range(slots)] + [(text[n, negative_slots[i, n]], -1.0) for n in range(batch) if n != i]
        terms = 0.0
        for t, z in row:
            pooled = reference_pool(pooler, t, patches[i])
            logit = scale * (F.normalize(pooled, dim=-1) * t).sum() + bias
            terms = terms + torch.log(1 + torch.exp(-z * logit))
        total = total + terms / len(row)
    return total


def test_text_conditioned_sigmoid_loss_and_gradients_match_the_loop_reference():
    torch.manual_seed(1)
    pooler = TextConditionedPooler(16, heads=2).double()
    negatives = one_text_of_every_other_image(4, 3, seed=5)
    leaves = [_unit(4, 6, 16, seed=82), _unit(4, 3, 16, seed=83), torch.tensor(2.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)]
    results = []
    for loss in (text_conditioned_sigmoid_loss, None):
        pooler.zero_grad()
        patches, text, scale, bias = [leaf.clone().requires_grad_(True) for leaf in leaves]
        if loss is None:
            value = reference_tcs(pooler, patches, text, scale, bias, negatives)
        else:
            value = loss(patches, text, pooler, scale, bias, negatives)
        value.backward()
        results.append((value.detach(), [x.grad for x in (patches, text, scale, bias)], [p.grad.clone() for p in pooler.parameters()]))
    (ours, our_grads, our_pooler), (loops, loop_grads, loop_pooler) = results
    torch.testing.assert_close(ours, loops, rtol=1e-9, atol=0)
    for mine, theirs in zip(our_grads + our_pooler, loop_grads + loop_pooler):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-12)


def test_text_conditioned_sigmoid_rows_are_shares_and_negatives_are_one_text_per_other_image():
    torch.manual_seed(2)
    pooler = TextConditionedPooler(16, heads=2).double()
    patches, text = _unit(6, 4, 16, seed=84), _unit(6, 3, 16, seed=85)
    scale, bias = torch.tensor(1.5, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    negatives = one_text_of_every_other_image(6, 3, seed=7)
    assert torch.equal(negatives, one_text_of_every_other_image(6, 3, seed=7)) and set(negatives.unique().tolist()) == {0, 1, 2}
    whole = text_conditioned_sigmoid_loss(patches, text, pooler, scale, bias, negatives)
    shares = [text_conditioned_sigmoid_loss(patches[rows], text, pooler, scale, bias, negatives, rows) for rows in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(sum(shares) / 2, whole)
    assert not torch.isclose(shares[0], shares[1])
    # another draw of the negatives is another loss: the draw is used, not only the own texts
    assert not torch.isclose(text_conditioned_sigmoid_loss(patches, text, pooler, scale, bias, one_text_of_every_other_image(6, 3, seed=8)), whole)


def test_flair_objective_is_half_each_term_at_flairs_start():
    objective = FLAIRObjective(16, flair_pool_heads=2).double()
    assert objective.logit_bias.item() == -10.0 and objective.model_logit_scale_init is None and objective.needs.patches
    image, text, patches = _unit(4, 16, seed=86), _unit(4, 3, 16, seed=87), _unit(4, 5, 16, seed=88)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    terms = objective({"image_emb": image, "text_emb": text, "patch_emb": patches, "logit_scale": scale}, step=3)
    assert list(terms) == ["tcs", "mps"]
    negatives = one_text_of_every_other_image(4, 3, seed=3)
    tcs = reference_tcs(objective.pooler, patches, text, scale, objective.logit_bias, negatives)
    assert terms["tcs"].item() == pytest.approx(0.5 * tcs.item(), rel=1e-9)
    assert terms["mps"].item() == pytest.approx(0.5 * reference_sigmoid(image, text, scale, objective.logit_bias).item(), rel=1e-9)
