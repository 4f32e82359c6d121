"""A 2-process gloo run must give the single-process loss and gradients on the same global batch,
for every objective: each rank's towers, the model's temperature and the objective's own parameters."""

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dreamlip.distributed import exit_spawned_rank
from dreamlip.losses import cross_image_grouping_loss, multi_positive_contrastive_loss
from dreamlip.objectives import Combination, DreamLIPObjective, FLAIRObjective, SigLIPObjective

GLOBAL_BATCH, SLOTS, PATCHES, WORLD = 8, 4, 6, 2


class TwoTowers(nn.Module):
    """Stand-in towers (linear maps into the joint space) with the model's temperature, and the
    objective beside them, as the trainer's module holds the two."""

    def __init__(self, make_objective):
        super().__init__()
        torch.manual_seed(0)  # the same towers and objective parameters (a pooler's) in every process
        self.image = nn.Linear(12, 16, dtype=torch.float64)
        self.text = nn.Linear(10, 16, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.objective = make_objective().double()
        self.objective.set_run_length(1)  # the one step these tests take, as the trainer tells it: full weight
        with torch.no_grad():
            for param in self.objective.parameters():  # temperatures and biases away from their defaults
                param.add_(-0.3)

    def forward(self, pixels, patches, words):
        return {
            "image_emb": F.normalize(self.image(pixels), dim=-1),
            "text_emb": F.normalize(self.text(words), dim=-1),
            "patch_emb": F.normalize(self.image(patches), dim=-1),
            "logit_scale": self.logit_scale,
        }


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(GLOBAL_BATCH, 12, generator=generator, dtype=torch.float64),
        torch.randn(GLOBAL_BATCH, PATCHES, 12, generator=generator, dtype=torch.float64),
        torch.randn(GLOBAL_BATCH, SLOTS, 10, generator=generator, dtype=torch.float64),
    )


def _step(model, net, batch):
    """The objective's loss (the sum of its terms) and every parameter's gradient, its own included."""
    loss = sum(model.objective(net(*batch)).values())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, rendezvous, out_dir, make_objective, loss_kwargs):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = TwoTowers(functools.partial(make_objective, **loss_kwargs))
        ddp = DistributedDataParallel(model)
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        batch = [tensor[local] for tensor in _global_batch()]
        loss, grads = _step(model, ddp, batch)
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp
        dist.barrier()  # no rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()  # its result is saved


@pytest.mark.distributed
@pytest.mark.parametrize(
    "loss_kwargs",
    [
        {"group_negatives": "image"},
        {"group_negatives": "batch"},
        {"group_negatives": "image", "local_loss": True},
        {"group_negatives": "batch", "local_loss": True},
        {"group_negatives": "cross", "group_gather": True},
        {"group_negatives": "cross", "group_gather": True, "local_loss": True},
    ],
    ids=["image-neg", "batch-neg", "image-neg-local", "batch-neg-local", "cross-gathered", "cross-gathered-local"],
)
def test_two_gloo_processes_match_one(tmp_path, loss_kwargs):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), DreamLIPObjective, loss_kwargs), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = TwoTowers(functools.partial(DreamLIPObjective, **loss_kwargs))
    expected_loss, expected_grads = _step(model, model, _global_batch())
    assert "objective.local_logit_scale" in expected_grads

    if loss_kwargs.get("local_loss"):
        # Each rank holds its share of the global loss; their mean is the global loss.
        torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, expected_loss)
    else:
        for r in ranks:
            torch.testing.assert_close(r["loss"], expected_loss)
    for r in ranks:  # DDP averaged the gradients: every rank holds the global batch's gradient
        for name, grad in expected_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, msg=lambda m, name=name: f"{name}: {m}")


class _RankLocalCrossReference(DreamLIPObjective):
    """One process, the global batch: the global contrastive loss plus the mean over ranks of each
    rank's cross-image grouping term over its own images (cross negatives never leave a rank)."""

    def forward(self, outputs, step=0):
        image_emb, text_emb, patch_emb = outputs["image_emb"], outputs["text_emb"], outputs["patch_emb"]
        share = GLOBAL_BATCH // WORLD
        halves = [slice(r * share, (r + 1) * share) for r in range(WORLD)]
        grouped = text_emb[:, 1:] if self.text_grad_share_at(step) else text_emb[:, 1:].detach()  # the patches only
        group = sum(cross_image_grouping_loss(grouped[h], patch_emb[h], self.local_logit_scale) for h in halves) / WORLD
        return {"mpcl": multi_positive_contrastive_loss(image_emb, text_emb, outputs["logit_scale"]), "group": group}


@pytest.mark.distributed
def test_cross_negatives_are_each_ranks_own_images(tmp_path):
    loss_kwargs = {"group_negatives": "cross"}
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), DreamLIPObjective, loss_kwargs), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = TwoTowers(functools.partial(_RankLocalCrossReference, **loss_kwargs))
    expected_loss, expected_grads = _step(model, model, _global_batch())

    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, expected_loss)
    for r in ranks:
        for name, grad in expected_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.distributed
def test_siglip_negatives_come_from_every_rank(tmp_path):
    """Each rank scores its images against both ranks' texts: its term is its share of the global
    loss (their mean is the one-process loss) and DDP's averaged gradients are one process's."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), SigLIPObjective, {}), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = TwoTowers(SigLIPObjective)
    expected_loss, expected_grads = _step(model, model, _global_batch())
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"].item(), rel=1e-3)  # shares, not the whole loss each
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, expected_loss)
    assert {"objective.logit_bias", "logit_scale"} <= expected_grads.keys()
    for r in ranks:
        for name, grad in expected_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, msg=lambda m, name=name: f"{name}: {m}")


def _flair_and_dreamlip() -> Combination:
    """FLAIR's terms beside DreamLIP's at half weight (its cross grouping gathered: one process's)."""
    return Combination([FLAIRObjective(16, flair_pool_heads=2), DreamLIPObjective(group_gather=True)], [1.0, 0.5])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "make, prefix",
    [
        (functools.partial(FLAIRObjective, 16, flair_pool_heads=2), "objective."),
        (_flair_and_dreamlip, "objective.parts.flair."),
    ],
    ids=["flair", "flair+dreamlip"],
)
def test_flair_negatives_come_from_every_rank_and_the_pooler_trains_alike(tmp_path, make, prefix):
    """Each rank pools its own images by its texts and by one text of every other image of both
    ranks (the same draw everywhere): the ranks' shares average to the one-process loss, and every
    gradient (towers, temperature, bias, the pooler's weights) is one process's; so too combined
    with DreamLIP's terms."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), make, {}), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    model = TwoTowers(make)
    expected_loss, expected_grads = _step(model, model, _global_batch())
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, expected_loss)
    assert {f"{prefix}logit_bias", f"{prefix}pooler.attn.in_proj_weight", "logit_scale"} <= expected_grads.keys()
    for r in ranks:
        for name, grad in expected_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_a_spawned_rank_leaves_with_its_output_written_and_without_finalizing(tmp_path):
    """What the gloo workers above and the demo's ranks end with: exit status 0, what the rank
    printed reaches its parent, and no interpreter finalization (an atexit handler never runs)."""
    script = (
        "import atexit, pathlib, sys\n"
        "from dreamlip.distributed import exit_spawned_rank\n"
        f"atexit.register(pathlib.Path({str(tmp_path / 'finalized')!r}).touch)\n"
        "print('rank done', end='')\n"
        "sys.stderr.write('and said so')\n"
        "exit_spawned_rank()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "rank done", "and said so")
    assert not (tmp_path / "finalized").exists()
