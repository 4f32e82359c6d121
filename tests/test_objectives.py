"""The objective boundary: the registry and the loss section it makes, refused settings, the
trainer running any objective (SigLIP end to end: train, evaluate, export, serve, fine-tune), and
checkpoints written before objectives owned their parameters."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import NANO
from conftest import run_cli
from dreamlip.checkpoint import Checkpointer, load_checkpoint
from dreamlip.config import ABLATION_VARIANTS, apply_variant, load_config
from dreamlip.objectives import OBJECTIVES, LossConfig, ModelNeeds, Objective, build_objective, loss_config_class, register
from dreamlip.train import train
from test_train import _config, _metrics, _weights


def test_the_loss_section_is_every_objectives_fields():
    fields = [f.name for f in dataclasses.fields(LossConfig)]
    assert fields[0] == "objective" and LossConfig().objective == "dreamlip"
    for cls in OBJECTIVES.values():
        assert {f.name for f in dataclasses.fields(cls.Config)} <= set(fields)
    assert set(OBJECTIVES) >= {"dreamlip", "flair", "siglip"}
    with pytest.raises(ValueError, match=r"loss.objective must be one of dreamlip, flair, siglip"):
        load_config(overrides=["loss.objective=sigmoid"])
    assert type(build_objective(load_config(variant="siglip").loss, text_slots=7, embed_dim=64)).__name__ == "SigLIPObjective"


def test_a_field_the_chosen_objective_does_not_read_is_refused(data_dir, tmp_path):
    config = load_config(overrides=["loss.objective=siglip", "loss.group_weight=0.5", "loss.local_loss=true"])
    message = (r"loss.group_weight=0.5, loss.local_loss=True: not a field of the siglip objective, "
               r"which reads loss.sigmoid_scale_init, loss.sigmoid_bias_init")
    with pytest.raises(ValueError, match=message):
        build_objective(config.loss, text_slots=7, embed_dim=64)
    with pytest.raises(ValueError, match="not a field of the siglip objective"):
        train(_config(data_dir, **{"loss.objective": "siglip", "loss.group_gather": True}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    # The ladder's variants are DreamLIP's and say so, so a file's objective does not leak into them.
    assert all(fields["loss.objective"] == "dreamlip" for name, fields in ABLATION_VARIANTS.items() if name not in ("siglip", "flair", "cosmos"))
    assert load_config(config_file={"loss.objective": "siglip"}, variant="clip").loss.objective == "dreamlip"


def test_an_objective_field_declared_twice_must_agree():
    @dataclasses.dataclass
    class Clashing:
        group_weight: int = 3  # DreamLIP's is a float, 1.0

    class Clash(Objective):
        name = "clash"
        Config = Clashing

    register(Clash)
    try:
        with pytest.raises(TypeError, match="loss.group_weight"):
            loss_config_class()
        with pytest.raises(ValueError, match="already registered"):
            register(Clash)
    finally:
        del OBJECTIVES["clash"]


# Each sigmoid objective's terms and its start: the scale (the model's temperature) and the bias.
SIGMOID_OBJECTIVES = {"siglip": (["sigmoid"], 10.0), "flair": (["tcs", "mps"], 1 / 0.07)}


@pytest.mark.parametrize("variant", list(SIGMOID_OBJECTIVES))
def test_sigmoid_objectives_train_evaluate_export_and_serve(data_dir, tmp_path, capsys, variant):
    terms, scale = SIGMOID_OBJECTIVES[variant]
    config = apply_variant(_config(data_dir, **{"optim.max_steps": 24, "run.save_every": 24}), variant)
    assert (config.captions.k, config.loss.objective) == (3, variant)
    train(config, tmp_path / "run")
    metrics = _metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    first = metrics[0]
    assert [key for key in first if key.startswith("loss/")] == [f"loss/{term}" for term in terms]
    assert first["loss"] == pytest.approx(sum(first[f"loss/{term}"] for term in terms), rel=1e-6)
    # the objective's start, one optimizer step (lr 1e-3 at warm-up) away: the bias at the prior of a match in the batch
    assert first["logit_scale"] == pytest.approx(scale, rel=2e-3)
    assert first["logit_bias"] == pytest.approx(-math.log(config.optim.batch_size - 1), abs=2e-3)
    checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")
    bias = checkpoint["objective"]["logit_bias"]
    assert float(bias) == pytest.approx(metrics[-1]["logit_bias"])

    assert run_cli("eval", "--checkpoint", tmp_path / "run" / "model.pt", "--data", data_dir, "--tasks", "retrieval",
                   "--out", tmp_path / "eval.json") == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["model"]["objective"] == variant and 0 <= results["metrics"]["retrieval/image_to_text_R@1"] <= 100
    # FLAIR's pooler scores retrieval by text-conditioned image embeddings too (by default, its top 128)
    assert results["conditioned"] == ({"mode": "topk", "k": 128} if variant == "flair" else None)
    assert ("retrieval/conditioned_text_to_image_R@1" in results["metrics"]) == (variant == "flair")

    assert run_cli("export", "--checkpoint", tmp_path / "run" / "model.pt", "--out", tmp_path / "export") == 0
    capsys.readouterr()
    from dreamlip.model import load_open_clip

    # an export is open_clip's model: global embeddings only, no pooler to condition on
    assert run_cli("eval", "--checkpoint", tmp_path / "export", "--data", data_dir, "--tasks", "retrieval", "--conditioned", "all") == 2
    assert "has no text-conditioned pooler" in capsys.readouterr().err
    clip, _, _ = load_open_clip().create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    assert torch.equal(clip.logit_bias.detach().reshape(()), bias)  # an open_clip sigmoid model: scale and bias
    assert torch.equal(clip.logit_scale.detach(), checkpoint["model"]["clip.logit_scale"])

    from dreamlip.loading import load_model
    from dreamlip.serve.readouts import load_served_model

    loaded = load_model(tmp_path / "run" / "model.pt")
    assert loaded.objective.name == variant
    for name, tensor in loaded.objective.state_dict().items():  # a pooler's weights too
        assert torch.equal(tensor, checkpoint["objective"][name]), name
    for served in (load_served_model(tmp_path / "run" / "model.pt", "ckpt"), load_served_model(tmp_path / "export", "export")):
        with torch.no_grad():
            expected = loaded.model.encode_text(loaded.tokenizer(["a red star"])).numpy()
        torch.testing.assert_close(torch.from_numpy(served.encode_text("a red star")), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)


def test_fine_tuning_continues_the_parameters_of_the_same_objective(data_dir, tmp_path):
    train(_config(data_dir, **{"optim.max_steps": 2, "loss.objective": "siglip"}), tmp_path / "siglip")
    trained = _weights(tmp_path / "siglip" / "model.pt")
    frozen = {"optim.max_steps": 1, "optim.lr": 0.0, "model.pretrained": str(tmp_path / "siglip" / "model.pt")}
    train(_config(data_dir, **frozen, **{"loss.objective": "siglip"}), tmp_path / "again")
    again = _weights(tmp_path / "again" / "model.pt")
    start = -math.log(_config(data_dir).optim.batch_size - 1)  # where a fresh SigLIP bias starts
    assert torch.equal(again["objective.logit_bias"], trained["objective.logit_bias"])
    assert float(trained["objective.logit_bias"]) != pytest.approx(start, abs=1e-6)
    assert torch.equal(again["clip.logit_scale"], trained["clip.logit_scale"])  # the model's, not SigLIP's start
    train(_config(data_dir, **frozen), tmp_path / "dreamlip")  # another objective: its own start
    assert float(_weights(tmp_path / "dreamlip" / "model.pt")["objective.local_logit_scale"]) == pytest.approx(math.log(1 / 0.07))


def test_fine_tuning_from_an_open_clip_sigmoid_model_starts_from_its_bias(data_dir, tmp_path):
    """An open_clip SigLIP (here the export of one) holds its trained bias in the model: fine-tuning
    takes it into the objective, whose bias trains in its place."""
    train(_config(data_dir, **{"optim.max_steps": 2, "loss.objective": "siglip"}), tmp_path / "siglip")
    assert run_cli("export", "--checkpoint", tmp_path / "siglip" / "model.pt", "--out", tmp_path / "export") == 0
    trained = float(_weights(tmp_path / "siglip" / "model.pt")["objective.logit_bias"])
    assert trained != pytest.approx(-math.log(_config(data_dir).optim.batch_size - 1), abs=1e-6)  # not a fresh start
    settings = {"loss.objective": "siglip", "model.pretrained": str(tmp_path / "export")}
    train(_config(data_dir, **settings, **{"optim.max_steps": 1, "optim.lr": 0.0}), tmp_path / "frozen")
    assert float(_weights(tmp_path / "frozen" / "model.pt")["objective.logit_bias"]) == trained
    train(_config(data_dir, **settings, **{"optim.max_steps": 2}), tmp_path / "tuned")
    tuned = _weights(tmp_path / "tuned" / "model.pt")
    assert float(tuned["objective.logit_bias"]) != pytest.approx(trained, abs=1e-7)
    assert float(tuned["clip.logit_bias"]) == trained  # the model's own is left as loaded


def _as_version_2(path):
    """A version 3 step checkpoint as version 2 wrote it: the grouping temperature a model
    parameter, the optimizer keyed by the model's parameter names."""
    payload = torch.load(path, weights_only=True)
    model = payload["model"] | {"local_logit_scale": payload.pop("objective")["local_logit_scale"]}
    name = {"objective.local_logit_scale": "local_logit_scale"}
    optimizer = payload["optimizer"]
    optimizer = {
        "state": {name.get(k, k.removeprefix("model.")): v for k, v in optimizer["state"].items()},
        "param_groups": [{**g, "params": [name.get(k, k.removeprefix("model.")) for k in g["params"]]} for g in optimizer["param_groups"]],
    }
    torch.save({**payload, "version": 2, "model": model, "optimizer": optimizer}, path)


def test_a_version_2_checkpoint_resumes_exactly(data_dir, tmp_path):
    settings = {"optim.max_steps": 4, "run.save_every": 2, "run.keep_checkpoints": 5}
    train(_config(data_dir, **settings), tmp_path / "straight")
    train(_config(data_dir, **settings), tmp_path / "old")
    checkpoints = Checkpointer(tmp_path / "old" / "checkpoints")
    checkpoints.path(4).unlink()
    (tmp_path / "old" / "model.pt").unlink()
    _as_version_2(checkpoints.path(2))
    upgraded = load_checkpoint(checkpoints.path(2))
    assert upgraded["version"] == 3 and list(upgraded["objective"]) == ["local_logit_scale"]
    assert "objective.local_logit_scale" in upgraded["optimizer"]["state"]
    train(_config(data_dir, **settings), tmp_path / "old", resume="latest")
    resumed, straight = _weights(tmp_path / "old" / "model.pt"), _weights(tmp_path / "straight" / "model.pt")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_the_trainer_asks_the_model_for_what_the_objective_needs():
    """Patch tokens only for an objective that groups: the clip variant and SigLIP need none."""
    from dreamlip.model import create_model
    from dreamlip.train import TrainModule

    model = create_model(NANO)[0]
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 4, 6))
    dim = model.embed_dim
    assert dim == 64
    for objective, patches in ((build_objective(LossConfig(), 4, dim), True), (build_objective(LossConfig(objective="siglip"), 4, dim), False),
                               (build_objective(LossConfig(), 1, dim), False), (build_objective(LossConfig(objective="flair"), 4, dim), True)):
        assert objective.needs == ModelNeeds(patches=patches)
        outputs = TrainModule(model, objective)(images, texts)
        assert (outputs["patch_emb"] is not None) == patches and outputs["token_emb"] is None


def test_the_grouping_gradient_can_leave_the_shared_projection_alone():
    """group_projection_grad=false: the grouping term moves the trunk and the text tower, never
    visual.proj (the class token's projection); the default moves it too."""
    from dreamlip.model import create_model
    from dreamlip.train import TrainModule

    torch.manual_seed(0)
    model = create_model(NANO)[0]
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 4, 6))
    grads = {}
    for projection_grad in (True, False):
        objective = build_objective(LossConfig(global_weight=0.0, group_projection_grad=projection_grad, group_warmup_fraction=0.0, group_text_grad_start=0.0), 4, model.embed_dim)
        module = TrainModule(model, objective)
        module.zero_grad()
        objective(module(images, texts))["group"].backward()
        visual = model.clip.visual
        grads[projection_grad] = (visual.proj.grad, visual.transformer.resblocks[-1].mlp.c_proj.weight.grad.clone())
    assert grads[True][0].abs().sum() > 0
    assert grads[False][0] is None  # no gradient reached it at all
    assert grads[False][1].abs().sum() > 0


def test_an_objective_that_needs_patch_tokens_is_refused_on_a_tower_without_them(data_dir, tmp_path, monkeypatch):
    from dreamlip.model import DreamLIPModel, PatchTokensUnavailable

    monkeypatch.setattr(DreamLIPModel, "has_patch_tokens", property(lambda self: False))  # as an attention-pooled tower
    with pytest.raises(PatchTokensUnavailable, match="the dreamlip objective needs a ViT .*; set loss.group_weight=0"):
        train(_config(data_dir, **{"optim.max_steps": 1}), tmp_path / "grouped")
    for name, settings in {"clip": {"loss.group_weight": 0.0}, "siglip": {"loss.objective": "siglip"}}.items():
        assert train(_config(data_dir, **{"optim.max_steps": 1, **settings}), tmp_path / name)["steps"] == 1


def _combination_outputs(batch=4, slots=4, patches=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()

    return {"image_emb": unit(batch, dim), "text_emb": unit(batch, slots, dim), "patch_emb": unit(batch, patches, dim),
            "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)}


def test_a_combination_is_its_parts_terms_times_their_weights():
    """flair+dreamlip at weights 1 and 0.5: each term, and each gradient, is the part's own on the
    same outputs times its weight; the parts own their parameters and are logged apart."""
    combined = build_objective(LossConfig(objective="flair+dreamlip", objective_weights=[1.0, 0.5], flair_pool_heads=2, group_warmup_fraction=0.0, group_text_grad_start=0.0),
                               text_slots=4, embed_dim=16).double()
    parts = {"flair": build_objective(LossConfig(objective="flair", flair_pool_heads=2), text_slots=4, embed_dim=16).double(),
             "dreamlip": build_objective(LossConfig(objective="dreamlip", group_warmup_fraction=0.0, group_text_grad_start=0.0), text_slots=4, embed_dim=16).double()}
    for name, part in parts.items():
        part.load_state_dict(combined.parts[name].state_dict())
    assert combined.name == "flair+dreamlip" and combined.needs == ModelNeeds(patches=True, logit_scale=True)
    outputs = _combination_outputs()
    terms = combined(outputs, step=3)
    own = {f"{name}/{term}": value for name, part in parts.items() for term, value in part(outputs, step=3).items()}
    assert list(terms) == ["flair/tcs", "flair/mps", "dreamlip/mpcl", "dreamlip/group"] == list(own)
    weight = {"flair": 1.0, "dreamlip": 0.5}
    for key, value in terms.items():
        assert torch.equal(value, weight[key.split("/")[0]] * own[key]), key
    inputs = [outputs[name] for name in ("image_emb", "text_emb", "patch_emb", "logit_scale")]
    combined_grads = torch.autograd.grad(sum(terms.values()), inputs + list(combined.parameters()))
    part_grads = torch.autograd.grad(
        sum(weight[key.split("/")[0]] * value for key, value in own.items()),
        inputs + [p for name in ("flair", "dreamlip") for p in parts[name].parameters()],
    )
    for ours, theirs in zip(combined_grads, part_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert set(combined.state_dict()) == {f"parts.{n}.{k}" for n, p in parts.items() for k in p.state_dict()}
    assert set(combined.scalars()) == {"flair/logit_bias", "dreamlip/local_logit_scale"}
    assert torch.equal(combined.open_clip_state()["logit_bias"], parts["flair"].logit_bias.detach())
    assert combined.conditioned_pooler is combined.parts["flair"].pooler


def test_combinations_are_chosen_by_name_and_checked():
    config = load_config(overrides=["loss.objective=flair+dreamlip", "loss.objective_weights=1,0.5", "loss.group_weight=0.3"])
    assert (config.loss.objective, config.loss.objective_weights) == ("flair+dreamlip", [1.0, 0.5])
    assert build_objective(config.loss, text_slots=4, embed_dim=64).parts["dreamlip"].group_weight == 0.3
    # SigLIP's scale start wins over FLAIR's (the model's CLIP start) whichever comes first
    assert build_objective(load_config(overrides=["loss.objective=flair+siglip"]).loss, 4, 64).model_logit_scale_init == math.log(10)
    for bad in ("flair+flair", "flair+sigmoid", "flair,dreamlip"):
        with pytest.raises(ValueError, match="or several of them joined by '\\+'"):
            load_config(overrides=[f"loss.objective={bad}"])
    for overrides, message in (
        (["loss.objective=flair", "loss.objective_weights=2"], "not one"),
        (["loss.objective=flair+dreamlip", "loss.objective_weights=1,2,3"], "one weight per objective"),
        (["loss.objective=flair+dreamlip", "loss.sigmoid_bias_init=-5"], "not a field of the flair\\+dreamlip objective"),
        (["loss.objective=flair+dreamlip", "loss.group_projection_grad=false"], "disagree on patch_projection_grad"),
    ):
        with pytest.raises(ValueError, match=message):
            build_objective(load_config(overrides=overrides).loss, text_slots=4, embed_dim=64)


def test_a_combination_trains_from_the_cli_resumes_exactly_and_evaluates_conditioned(data_dir, tmp_path):
    from test_train import _overrides

    # FLAIR's caption sampling too: the resume lands mid-epoch, where the texts must be drawn again alike
    settings = {"optim.max_steps": 4, "run.save_every": 2, "run.keep_checkpoints": 5, "captions.sampling": "flair",
                "loss.objective": "flair+dreamlip", "loss.objective_weights": "1,0.5", "loss.flair_pool_heads": 2,
                # a constant grouping weight and text gradient: the first leg's shorter run would otherwise reach them sooner
                "loss.group_warmup_fraction": 0.0, "loss.group_text_grad_start": 0.0,
                "run.eval_every": 4, "run.eval_data": str(data_dir), "run.eval_tasks": "retrieval"}
    overrides = [item for o in _overrides(data_dir, **settings) for item in ("--set", o)]
    assert run_cli("train", "--out", tmp_path / "straight", *overrides) == 0
    metrics = _metrics(tmp_path / "straight")
    terms = ["loss/flair/tcs", "loss/flair/mps", "loss/dreamlip/mpcl", "loss/dreamlip/group"]
    assert [key for key in metrics[0] if key.startswith("loss/")] == terms
    assert metrics[0]["loss"] == pytest.approx(sum(metrics[0][term] for term in terms), rel=1e-6)
    assert {"flair/logit_bias", "dreamlip/local_logit_scale"} <= set(metrics[0])
    final = _weights(tmp_path / "straight" / "model.pt")
    assert {"objective.parts.flair.logit_bias", "objective.parts.dreamlip.local_logit_scale"} <= set(final)

    assert run_cli("train", "--out", tmp_path / "resumed", *overrides, "--set", "optim.max_steps=2") == 0
    assert run_cli("train", "--out", tmp_path / "resumed", *overrides, "--resume", "latest") == 0
    resumed = _weights(tmp_path / "resumed" / "model.pt")
    for name, tensor in final.items():
        assert torch.equal(resumed[name], tensor), name

    assert run_cli("eval", "--checkpoint", tmp_path / "straight" / "model.pt", "--data", data_dir, "--tasks", "retrieval",
                   "--quiet", "--out", tmp_path / "eval.json") == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["conditioned"] == {"mode": "topk", "k": 128} and "retrieval/conditioned_image_to_text_R@1" in results["metrics"]
    during = {key.removeprefix("eval/"): value for key, value in metrics[-1].items() if key.startswith("eval/retrieval/")}
    assert during == {key: value for key, value in results["metrics"].items() if key in during}  # training's eval scores alike
    assert "retrieval/conditioned_text_to_image_R@1" in during


@pytest.mark.parametrize("chunk", [1, 3])
def test_flairs_pooler_in_chunks_gives_the_same_loss_and_gradients(chunk):
    """loss.flair_pool_chunk: L_tcs pools `chunk` images at a time (recomputed in the backward
    pass) and equals the one-call loss, gradients included; no pooler call sees more rows."""
    from dreamlip.objectives import FLAIRObjective

    whole = FLAIRObjective(16, flair_pool_heads=2).double()
    chunked = FLAIRObjective(16, flair_pool_heads=2, flair_pool_chunk=chunk).double()
    chunked.load_state_dict(whole.state_dict())
    rows = []
    chunked.pooler.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    results = []
    for objective in (whole, chunked):
        outputs = _combination_outputs(batch=5)
        terms = objective(outputs, step=2)
        inputs = [outputs[name] for name in ("image_emb", "text_emb", "patch_emb", "logit_scale")]
        results.append((terms, torch.autograd.grad(sum(terms.values()), inputs + list(objective.parameters()))))
    (terms, grads), (chunked_terms, chunked_grads) = results
    for name, value in terms.items():
        torch.testing.assert_close(chunked_terms[name], value, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert max(rows) == chunk and len(rows) == 2 * math.ceil(5 / chunk)  # forward, and again backward
