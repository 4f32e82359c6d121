"""Training and checkpoints under injected faults: a diverging run (a huge learning rate, a
forced non-finite loss term or gradient), a full disk during a save (a patched writer, and a real
tmpfs), and checkpoints that are wrong in ways a user meets: NaN weights, a wrong model name."""

from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import NANO, TINY, cli_command, free_port
from dreamlip.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from dreamlip.cli import main
from dreamlip.io import DiskFull, atomic_write
from dreamlip.objectives.dreamlip import DreamLIPObjective

SETTINGS = {
    "model.name": NANO,
    "data.workers": 0,
    "captions.k": 3,
    "optim.batch_size": 16,
    "optim.lr": 2e-3,
    "optim.warmup_steps": 2,
    "run.log_every": 1,
    "run.save_every": 1,
    "run.keep_checkpoints": 10,
    "run.progress": False,
}


def train_args(data_dir: Path, out: Path, **extra) -> list[str]:
    settings = {**SETTINGS, "data.train": str(data_dir / "train.jsonl"), **extra}
    return ["train", "--out", str(out), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(p.stem.split("_")[1]): load_checkpoint(p)["model"] for p in sorted((out / "checkpoints").glob("step_*.pt"))}


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(term, steps)``: the loss's ``term`` ("mpcl" or "group") is NaN at those optimizer steps."""

    def inject(term: str, steps: set[int]) -> None:
        real, calls = DreamLIPObjective.forward, [0]

        def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
            calls[0] += 1
            terms = real(self, *args, **kwargs)
            if calls[0] in steps:
                terms[term] = terms[term] * float("nan")
            return terms

        monkeypatch.setattr(DreamLIPObjective, "forward", forward)

    return inject


@pytest.mark.fault("train: divergence (optim.lr=1e6)")
def test_divergence_stops_at_the_first_non_finite_step_and_keeps_the_good_checkpoints(data_dir, tmp_path, capsys, observe):
    out = tmp_path / "run"
    # the grouping term at full weight from step 1, so a loss term is the first thing to blow up
    assert main(train_args(data_dir, out, **{"optim.lr": 1e6, "optim.max_steps": 20, "loss.group_warmup_fraction": 0.0})) == 2
    err = capsys.readouterr().err.strip()
    observe(f"rc 2: {err}")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    saved = checkpoints(out)
    last = max(saved)
    assert err.startswith(f"dreamlip train: error: step {last + 1}: the loss term ")
    assert f"training diverged; this step's update was not applied and the last good checkpoint is {out}/checkpoints/step_{last:08d}.pt" in err
    assert all(torch.isfinite(t).all() for weights in saved.values() for t in weights.values())
    assert not (out / "model.pt").exists()


@pytest.mark.fault("train: a loss term NaN once, optim.on_nonfinite=skip")
def test_skip_mode_drops_that_update_only_and_counts_it(data_dir, tmp_path, nan_at, capsys, observe):
    nan_at("group", {3})
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, **{"optim.on_nonfinite": "skip", "optim.max_steps": 5})) == 0
    printed = capsys.readouterr()
    observe(printed.out.strip().splitlines()[0] + "; then the run finished")
    assert "step 3: the loss term group is nan (mpcl " in printed.out and "update skipped (1 in a row, at most 10" in printed.out
    assert "skipped steps (non-finite loss or gradient, optim.on_nonfinite=skip): 1" in printed.out
    records = metrics(out)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert math.isnan(records[2]["loss/group"]) and math.isfinite(records[3]["loss"])
    saved = checkpoints(out)
    for name, tensor in saved[2].items():  # step 3 left every weight as step 2 had it
        assert torch.equal(saved[3][name], tensor), name
    assert any(not torch.equal(saved[4][n], t) for n, t in saved[3].items())  # step 4 learnt again
    assert load_checkpoint(out / "checkpoints" / "step_00000005.pt")["train_state"]["skipped_steps"] == 1


def test_skip_mode_still_stops_a_run_that_keeps_diverging(data_dir, tmp_path, nan_at, capsys):
    nan_at("mpcl", {2, 3, 4})
    settings = {"optim.on_nonfinite": "skip", "optim.max_consecutive_skips": 2, "optim.max_steps": 6}
    assert main(train_args(data_dir, tmp_path / "run", **settings)) == 2
    err = capsys.readouterr().err
    assert "dreamlip train: error: step 4: the loss term mpcl is nan (group " in err
    assert "in 3 steps in a row: training diverged" in err and f"step_00000003.pt" in err


@pytest.mark.fault("train: an infinite gradient")
def test_a_non_finite_gradient_is_named_by_its_parameter(data_dir, tmp_path, monkeypatch, capsys, observe):
    from dreamlip.train import TrainStep

    real, calls = TrainStep.__call__, [0]

    def poisoned(self, micro_batches, step=0):
        result = real(self, micro_batches, step)
        calls[0] += 1
        if calls[0] == 2:
            self.strategy.model.model.clip.visual.proj.grad[0, 0] = float("inf")
        return result

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    assert main(train_args(data_dir, tmp_path / "run", **{"optim.max_steps": 4})) == 2
    err = capsys.readouterr().err.strip()
    observe(f"rc 2: {err[:120]}...")
    assert err.startswith("dreamlip train: error: step 2: the gradient of model.clip.visual.proj is not finite (loss ")
    assert "the last good checkpoint is" in err and "step_00000001.pt" in err


def test_the_guard_tells_huge_finite_gradients_from_non_finite_ones():
    """The fast check is the gradients' 2-norm, which overflows at 1e30; every entry decides then."""
    from dreamlip.distributed import DistEnv, Strategy
    from dreamlip.divergence import DivergenceGuard, TrainingDiverged

    strategy = Strategy(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    strategy.wrap(torch.nn.Linear(3, 2))
    guard = DivergenceGuard(strategy, on_nonfinite="stop", max_consecutive_skips=1, check_grads=True,
                            last_checkpoint=lambda: None, log=print)
    loss = {"mpcl": torch.tensor(1.0), "group": None, "loss": torch.tensor(1.0)}
    weight, bias = strategy.model.weight, strategy.model.bias
    weight.grad, bias.grad = torch.full((2, 3), 1e30), torch.zeros(2)
    assert not torch.isfinite(torch.nn.utils.get_total_norm([weight.grad, bias.grad]))
    assert guard.allows_update(1, loss)
    bias.grad[1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"^step 2: the gradient of bias is not finite \(loss 1\): .* no checkpoint was written yet"):
        guard.allows_update(2, loss)


@pytest.mark.fault("eval: a checkpoint with infinite weights")
def test_nan_weights_are_refused_on_save_and_on_load(data_dir, tmp_path, capsys, observe):
    good = {"model_name": NANO, "model": {"w": torch.ones(3)}, "config": {}, "step": 1}
    path = save_checkpoint(tmp_path / "model.pt", good)
    with pytest.raises(ValueError, match=r"refusing to write .*model.pt: weight w is not finite"):
        save_checkpoint(path, {**good, "model": {"w": torch.tensor([1.0, float("nan"), 2.0])}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # untouched
    nan = {"format": "dreamlip-checkpoint", "version": 2, **good, "model": {"w": torch.tensor([float("inf")])}}
    torch.save(nan, tmp_path / "diverged.pt")  # as an older version, without the guard, wrote them
    args = ["eval", "--checkpoint", str(tmp_path / "diverged.pt"), "--data", str(data_dir), "--tasks", "zeroshot"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    observe(f"rc 2: {err}")
    assert err == (f"dreamlip eval: error: {tmp_path}/diverged.pt: weight w holds NaN or infinity: the run that "
                   "wrote it diverged; use an earlier checkpoint")


@pytest.mark.fault("eval: a checkpoint whose stored model name is wrong")
def test_a_wrong_model_name_in_a_checkpoint_is_one_line(data_dir, tmp_path, capsys, observe):
    from dreamlip.model import create_model

    weights = create_model(NANO)[0].state_dict()
    for name, expected in [
        ("ViT-Nope-99", "its model name 'ViT-Nope-99' is no architecture open_clip or dreamlip knows"),
        (TINY, f"its weights do not fit its model name '{TINY}': "),
    ]:
        save_checkpoint(tmp_path / "model.pt", {"model_name": name, "model": weights, "config": {}, "step": 1})
        assert main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(data_dir), "--tasks", "zeroshot"]) == 2
        err = capsys.readouterr().err.strip()
        observe(f"rc 2: {err}")
        assert len(err.splitlines()) == 1 and expected in err, err
    assert "missing (e.g. clip.visual.transformer.resblocks.2." in err and "of another shape (e.g. " in err


def test_atomic_write_reports_a_full_disk_hidden_by_torch_save(tmp_path):
    """torch.save reports a failed write as a RuntimeError about stream positions: the ENOSPC
    underneath is what the user is told, naming the file; the old file stays, no temp file."""
    target = save_checkpoint(tmp_path / "model.pt", {"model_name": NANO, "model": {"w": torch.ones(2)}, "config": {}, "step": 1})

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

    with pytest.raises(DiskFull) as info:
        atomic_write(target, lambda handle: torch.save({"w": torch.zeros(1000)}, FullDisk(handle)), binary=True)
    assert str(info.value) == f"no space left on device writing {target}"
    assert isinstance(info.value.__context__, RuntimeError)  # what torch raised
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(2))


@pytest.mark.fault("train: disk full during a save (patched writer)")
def test_a_full_disk_during_a_save_names_the_file_and_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys, observe):
    import dreamlip.checkpoint

    real_save, saves = torch.save, [0]

    def fills_the_disk_at_the_third(obj, handle, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 3:
            handle.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(dreamlip.checkpoint.torch, "save", fills_the_disk_at_the_third)
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, **{"optim.max_steps": 5})) == 2
    err = capsys.readouterr().err.strip()
    observe(f"rc 2: {err}")
    assert err == (f"dreamlip train: error: no space left on device writing {out}/checkpoints/step_00000003.pt; the last "
                   f"good checkpoint is {out}/checkpoints/step_00000002.pt (--resume latest once there is space)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]


_TMPFS_RUN = """
mount -t tmpfs -o size={size} tmpfs "$1" || exit 90
"$2" -m dreamlip.cli "${{@:4}}" 2>"$1/../stderr"; echo "rc=$?"
ls "$1/run/checkpoints"
"$2" -c "import sys; from dreamlip.checkpoint import load_checkpoint; print('loads', load_checkpoint(sys.argv[1])['step'])" "$1/run/checkpoints/step_00000002.pt"
"""


@pytest.mark.slow
@pytest.mark.fault("train: disk full during a save (100 MB tmpfs)")
def test_a_real_full_disk_stops_the_run_with_rc_2_and_the_last_checkpoint_loads(data_dir, tmp_path, observe):
    """A 100 MB tmpfs in a private mount namespace holds two 40 MB checkpoints, not three."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a private tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    args = train_args(data_dir, mount / "run", **{"optim.max_steps": 5})
    script = _TMPFS_RUN.format(size="100m")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "tmpfs",
                           str(mount), sys.executable, "-", *args], capture_output=True, text=True, timeout=300)
    if done.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    err = (tmp_path / "stderr").read_text().strip()
    observe(f"{done.stdout.splitlines()[0]}: {err}")
    assert done.stdout.splitlines() == ["rc=2", "step_00000001.pt", "step_00000002.pt", "loads 2"], done.stdout + done.stderr
    assert err == (f"dreamlip train: error: no space left on device writing {mount}/run/checkpoints/step_00000003.pt; the "
                   f"last good checkpoint is {mount}/run/checkpoints/step_00000002.pt (--resume latest once there is space)")


@pytest.mark.distributed
@pytest.mark.fault("train: a DDP rank frozen (SIGSTOP), dist_timeout 4 s")
def test_a_frozen_rank_is_named_after_run_dist_timeout(data_dir, tmp_path, observe):
    """Two gloo ranks started as torchrun would; once the heartbeat shows steps, rank 1 is stopped
    with SIGSTOP. Rank 0 warns that rank 1 is silent, then its collective times out after
    run.dist_timeout=4 s and it stops with one line naming rank 1, instead of waiting 30 minutes."""
    import os
    import signal
    import time

    settings = {"optim.max_steps": 100_000, "optim.batch_size": 8, "run.save_every": 100_000, "run.log_every": 1000,
                "run.dist_timeout": 4, "run.heartbeat_every": 1}
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        subprocess.Popen(cli_command(*train_args(data_dir, tmp_path / "run", **settings)), env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL, text=True)
        for r in range(2)
    ]
    try:
        seen = []
        for line in ranks[0].stdout:  # heartbeat lines: the run is under way
            seen.append(line.strip())
            if line.startswith("heartbeat: step ") and int(line.split()[2].rstrip(",")) >= 1:
                break
        assert seen[-1].endswith("2 ranks, every rank beating"), seen
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        rest = ranks[0].stdout.read()
        assert ranks[0].wait(timeout=60) == 2
        waited = time.monotonic() - stopped
        err = ranks[0].stderr.read().strip()
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    observe(f"rc 2 after {waited:.0f} s: {err[:160]}...")
    assert 4 <= waited < 20
    assert "rank 1 has been silent for " in rest and "collectives fail after run.dist_timeout=4 s" in rest
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("dreamlip train: error: rank 0 stopped at step ")
    assert "a collective failed while other ranks were not answering (rank 1 silent for " in err
    assert "raise run.dist_timeout (now 4 s)" in err
