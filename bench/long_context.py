"""Does a 248-token context slow down short texts? Text-tower step time at 77 vs 248 positions.

DreamLIP's sub-captions are 10-30 tokens. Its text encoding crops each length bucket after its
longest end token and encodes each distinct text once (``DreamLIPModel.encode_text``), so the cost
should follow the texts' true lengths, not the context. This times forward + backward of the text
tower on the same sub-captions (the synthetic set's K + 1 texts per image) with the model and
tokenizer at 77 and at ``--long`` positions, and, for contrast, open_clip's own ``encode_text``,
which runs every text over the whole context. Variants alternate step by step; each ratio is the
median over rounds of that round's time over the 77-token dreamlip time, so drift in machine
load cancels.

    python bench/long_context.py                          # tiny demo model, CPU
    python bench/long_context.py --model ViT-B-16 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dreamlip.captions import SubcaptionSampler
from dreamlip.synthetic import make_record
from dreamlip.model import create_model, get_tokenizer


def _subcaptions(batch: int, k: int) -> list[str]:
    sampler = SubcaptionSampler(k=k)
    texts = []
    for index in range(batch):
        record, _, _ = make_record("train", index, 0, 64)
        texts += sampler.sample(record["raw_caption"], record["captions"], index=index)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64")
    parser.add_argument("--batch", type=int, default=64, help="images; each has K + 1 texts")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--long", type=int, default=248, help="the long context")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    texts = _subcaptions(args.batch, args.k)
    models, tokens = {}, {}
    for context in (77, args.long):
        torch.manual_seed(0)
        models[context] = create_model(args.model, context_length=context, device=device)[0]
        tokens[context] = get_tokenizer(args.model, context)(texts).to(device)
    true_tokens = int((tokens[77].argmax(dim=-1) + 1).sum())

    def ours(context: int):
        return lambda: models[context].encode_text(tokens[context]).sum().backward()

    def open_clips(context: int):
        return lambda: F.normalize(models[context].clip.encode_text(tokens[context]), dim=-1).sum().backward()

    variants = {
        "dreamlip, context 77": ours(77),
        f"dreamlip, context {args.long}": ours(args.long),
        "open_clip encode_text, context 77": open_clips(77),
        f"open_clip encode_text, context {args.long}": open_clips(args.long),
    }

    def run(step) -> float:
        for model in models.values():
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in variants.values():
        for _ in range(args.warmup):
            run(step)
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, step in variants.items():
            times[name].append(run(step))

    baseline = times["dreamlip, context 77"]
    print(
        f"model {args.model}, {len(texts)} texts ({true_tokens / len(texts):.1f} tokens on average), "
        f"device {device}, {args.steps} steps each (median)"
    )
    print(f"{'text tower forward + backward':44s} {'ms':>8s} {'ratio':>7s}")
    results = {}
    for name, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, baseline))
        results[name] = {"ms": 1000 * statistics.median(samples), "ratio_to_dreamlip_77": ratio}
        print(f"{name:44s} {results[name]['ms']:8.1f} {ratio:7.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
