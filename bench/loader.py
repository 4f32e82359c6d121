"""The training loader alone (decode, augment, sub-captions, tokenize) against open_clip_train's
loader on the same shards, and against the tiny model's training step; where the loader's time goes.

Data: ``--samples`` images of 256 px (img2dataset's default size) as JPEG, with the embedded
synthetic set's three captioners' captions, written as img2dataset writes webdataset shards
(``<key>.jpg``, ``<key>.txt``, ``<key>.json`` with the caption columns as strings); then the same
shards through ``dreamlip prepare`` (long captions pre-split into sentence lists). Loaders:

- open_clip_train's webdataset pipeline on the img2dataset shards (the ``.txt`` caption, one
  text): its stages rebuilt from webdataset's own filters (split by worker, tar samples, shuffle,
  ``decode("pilrgb")``, rename, transform and tokenize, batch), because ``open_clip_train.data``
  itself needs webdataset <= 0.2.86 (its ``tarfile_to_samples_nothrow`` reads the ``fname`` key
  later versions renamed) and img2dataset's extra installs 0.2.111;
- dreamlip's ``build_train_loader`` on the img2dataset shards (K sub-captions, split per load);
- dreamlip's ``build_train_loader`` on the prepared shards (K sub-captions from the lists).

Each loader reads every sample once per round with ``--workers`` worker processes (a fresh loader
each round, so no sentence cache carries over, as in a real epoch over millions of captions);
rounds alternate between loaders so machine noise hits them alike; medians are printed. The step:
the tiny model's forward, backward and AdamW step with the DreamLIP loss (K sub-captions and
grouping) on one batch. Then the loader's stages are timed one by one in this process.

    python bench/loader.py                      # 1024 samples, 1 worker, DreamLIP-ViT-Tiny-64
    python bench/loader.py --samples 4096 --workers 4 --json loader.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dreamlip._compat import ensure_torchvision

ensure_torchvision()  # before open_clip_train imports torchvision (docs: CPU torch beside PyPI's torchvision)

from dreamlip.captions import SubcaptionSampler, _split_cached
from dreamlip.data.loader import CachedTokenizer, build_train_loader
from dreamlip.data.shards import SIZES_FILE, record_from_sample
from dreamlip.distributed import init_distributed, make_strategy
from dreamlip.io import decode_image
from dreamlip.objectives import LossConfig, build_objective
from dreamlip.model import create_model, get_tokenizer, load_open_clip
from dreamlip.prepare import PrepareConfig, prepare
from dreamlip.synthetic import make_record
from dreamlip.train import TrainModule, TrainStep

import webdataset as wds  # noqa: E402

SHARD = 256  # samples per img2dataset shard


def write_img2dataset_shards(folder: Path, samples: int) -> int:
    """Shards as img2dataset writes them for the authors' caption file; returns the shard count."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard, start in enumerate(range(0, samples, SHARD)):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for index in range(start, min(start + SHARD, samples)):
                record, pixels, _ = make_record("train", index, 0, 64)
                buffer = io.BytesIO()
                Image.fromarray(pixels).resize((256, 256), Image.BICUBIC).save(buffer, "JPEG", quality=90)
                meta = {"raw_caption": record["raw_caption"]}
                for captioner, by_length in record["captions"].items():
                    meta |= {f"short{captioner}_captions": by_length["short"], f"long{captioner}_captions": by_length["long"]}
                key = f"{shard:05d}{index - start:04d}"
                meta |= {"url": f"https://example.com/{index}.jpg", "key": key, "status": "success", "width": 256, "height": 256}
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "txt": record["raw_caption"].encode(),
                              "json": json.dumps(meta, indent=4).encode()})
        sizes[name] = min(SHARD, samples - start)
    (folder / SIZES_FILE).write_text(json.dumps(sizes))
    return len(sizes)


def samples_per_second(make_loader, samples: int) -> float:
    loader = make_loader()
    started = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["images"] if isinstance(batch, dict) else batch[0])
    elapsed = time.perf_counter() - started
    assert seen == samples, (seen, samples)
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the step (default 1: the cores the loader's workers leave; "
                        "more threads than free cores slow a step many times over)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.samples % (args.batch * max(args.workers, 1)):
        parser.error("--samples must be a multiple of --batch x --workers (every loader reads each sample once)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    shards = write_img2dataset_shards(root / "img2dataset", args.samples)
    prepare(PrepareConfig(images=root / "img2dataset", out=root / "prepared", shard_size=SHARD, token_sample=0))
    pattern = {name: f"{root}/{name}/{{00000..{shards - 1:05d}}}.tar" for name in ("img2dataset", "prepared")}

    model, _, _ = create_model(args.model)
    size = model.clip.visual.image_size[0] if isinstance(model.clip.visual.image_size, tuple) else model.clip.visual.image_size
    tokenizer = get_tokenizer(args.model)
    sampler = SubcaptionSampler(k=args.k)

    def dreamlip(name: str):
        return lambda: build_train_loader(pattern[name], sampler=sampler, tokenizer=tokenizer, batch_size=args.batch,
                                          image_size=size, num_workers=args.workers, persistent_workers=False)

    def open_clip_train():
        transform = load_open_clip().image_transform(size, is_train=True)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(pattern["img2dataset"]),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.shuffle(1000, initial=100),
            wds.decode("pilrgb"),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=transform, text=lambda text: tokenizer(text)[0]),
            wds.to_tuple("image", "text"),
            wds.batched(args.batch, partial=False),
        )
        return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers)

    loaders = {
        "open_clip_train (1 caption)": open_clip_train,
        f"dreamlip, img2dataset shards (K={args.k}, split per load)": dreamlip("img2dataset"),
        f"dreamlip, prepared shards (K={args.k}, pre-split)": dreamlip("prepared"),
    }
    rates = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, make in loaders.items():
            rates[name].append(samples_per_second(make, args.samples))

    # the step, on one batch the loader made
    batch = next(iter(dreamlip("prepared")()))
    strategy = make_strategy("ddp", init_distributed("cpu"))
    objective = build_objective(LossConfig(), args.k + 1, model.embed_dim)
    objective.set_run_length(1)  # as the trainer does; the ramp scales the term, not its cost
    strategy.wrap(TrainModule(model, objective))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step = TrainStep(strategy)
    step_times = []
    for index in range(2 + 2 * args.rounds):
        optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        step([{"images": batch["images"], "texts": batch["texts"]}])
        optimizer.step()
        if index >= 2:
            step_times.append(time.perf_counter() - started)
    step_rate = args.batch / statistics.median(step_times)

    # where one sample's time goes, stage by stage, in this process
    transform = load_open_clip().image_transform(size, is_train=True)
    stages = {"read record (tar member json)": [], "sub-captions, split per load": [], "sub-captions, pre-split": [],
              "decode JPEG (draft)": [], "augment (RandomResizedCrop, ToTensor, Normalize)": [], "tokenize K+1 texts": []}
    bare = CachedTokenizer(tokenizer, max_entries=0)  # no token rows kept: every text tokenized
    for name, stage in (("img2dataset", "sub-captions, split per load"), ("prepared", "sub-captions, pre-split")):
        _split_cached.cache_clear()  # as a fresh worker starts
        for sample in wds.WebDataset(pattern[name], shardshuffle=False):
            started = time.perf_counter()
            record = record_from_sample(sample)
            read = time.perf_counter()
            texts = sampler.sample(record.raw_caption, record.captions, index=0)
            sampled = time.perf_counter()
            stages[stage].append(sampled - read)
            if name != "prepared":
                continue
            stages["read record (tar member json)"].append(read - started)
            image = decode_image(record.image, draft=size)
            decoded = time.perf_counter()
            transform(image)
            augmented = time.perf_counter()
            bare(texts)
            stages["decode JPEG (draft)"].append(decoded - sampled)
            stages["augment (RandomResizedCrop, ToTensor, Normalize)"].append(augmented - decoded)
            stages["tokenize K+1 texts"].append(time.perf_counter() - augmented)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    names = list(loaders)
    print(f"{args.samples} samples of 256 px JPEG, batch {args.batch}, {args.workers} worker(s), model {args.model} "
          f"({size} px), step on {args.threads} thread(s), {args.rounds} rounds (median)")
    for name in names:
        print(f"  {name:58s} {medians[name]:8.1f} samples/s")
    print(f"  {'training step (DreamLIP loss, K=' + str(args.k) + ', grouping)':58s} {step_rate:8.1f} samples/s")
    presplit_ratio = medians[names[2]] / medians[names[1]]
    step_ratio = medians[names[2]] / step_rate
    print(f"pre-split / split per load: {presplit_ratio:.2f}x;  loader ({args.workers} worker) / step: {step_ratio:.2f}x;  "
          f"dreamlip pre-split / open_clip_train: {medians[names[2]] / medians[names[0]]:.2f}x")
    print("one sample's loader time by stage (ms, median, this process):")
    for stage, values in stages.items():
        print(f"  {stage:52s} {1000 * statistics.median(values):7.3f}")
    if args.json:
        results = {"args": vars(args), "samples_per_s": medians, "step_samples_per_s": step_rate,
                   "presplit_over_split": presplit_ratio, "loader_over_step": step_ratio,
                   "stage_ms": {k: 1000 * statistics.median(v) for k, v in stages.items()}}
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
