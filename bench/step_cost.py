"""What one training step costs, counted on a small batch on any device and scaled to a GPU's:
FLOPs (torch's FlopCounterMode) and the activation bytes autograd keeps for the backward pass
(each storage a saved-tensors hook sees, once; the weights left out), per sample, through the trainer's own step; plus the weights,
gradients and AdamW state. From these, an estimate of the step time at a peak and an assumed
model FLOP utilisation, and of the memory per GPU. Estimates: measure on the GPU to know.

    python bench/step_cost.py --model ViT-B-16 --k 6 --batch-per-gpu 512 --peak-tflops 989 --mfu 0.4
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamlip.distributed import init_distributed, make_strategy
from dreamlip.model import create_model
from dreamlip.objectives import LossConfig, build_objective
from dreamlip.train import TrainModule, TrainStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--k", type=int, default=6, help="sub-captions per image (0: plain CLIP)")
    parser.add_argument("--text-tokens", type=int, default=32, help="tokens per text (the batch's longest)")
    parser.add_argument("--count-batch", type=int, default=2, help="the small batch counted here")
    parser.add_argument("--batch-per-gpu", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _, _ = create_model(args.model)
    strategy = make_strategy("ddp", init_distributed("cpu"))
    objective = build_objective(LossConfig(group_weight=1.0 if args.k else 0.0), args.k + 1, model.embed_dim)
    objective.set_run_length(1)  # as the trainer does; the ramp scales the term, not what it allocates
    strategy.wrap(TrainModule(model, objective))
    step = TrainStep(strategy)
    size = model.clip.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    texts = torch.randint(1, 49000, (args.count_batch, args.k + 1, 77))
    texts[..., args.text_tokens - 1] = 49407  # the end-of-text token: the text runs this many tokens
    texts[..., args.text_tokens:] = 0
    batch = {"images": torch.randn(args.count_batch, 3, *size), "texts": texts}

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # count each saved storage once, and not the weights (saved by every layer, but resident anyway)
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step([batch])
    saved = sum(storages.values())
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_sample = counter.get_total_flops() / args.count_batch
    # fp32 here; under bf16 autocast most saved activations are half the size
    activations_bf16 = saved / args.count_batch / 2 * args.batch_per_gpu
    state = parameters * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    step_seconds = flops_per_sample * args.batch_per_gpu / (args.peak_tflops * 1e12 * args.mfu)
    results = {
        "parameters_m": parameters / 1e6,
        "gflop_per_sample": flops_per_sample / 1e9,
        "activation_mb_per_sample_fp32": saved / args.count_batch / 2**20,
        "est_step_seconds": step_seconds,
        "est_memory_gib": (state + activations_bf16) / 2**30,
    }
    print(f"{args.model}, K={args.k}, texts of {args.text_tokens} tokens: {results['parameters_m']:.1f} M parameters, "
          f"{results['gflop_per_sample']:.1f} GFLOP and {results['activation_mb_per_sample_fp32']:.1f} MB of saved "
          f"activations (fp32) per sample")
    print(f"estimate at {args.batch_per_gpu} per GPU, {args.peak_tflops:.0f} TFLOP/s peak, {args.mfu:.0%} MFU: "
          f"{step_seconds:.2f} s a step, {results['est_memory_gib']:.1f} GiB (weights, gradients, AdamW, bf16 "
          "activations; without the allocator's slack or gradient checkpointing)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
