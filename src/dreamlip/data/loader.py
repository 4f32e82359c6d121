"""The torch side of training data: datasets, the resumable distributed batch sampler, collation,
and :func:`build_train_loader`, the one entry point the trainer calls.

Two modes, chosen by the SPEC:

- map mode (JSONL/CSV sources only): a map-style :class:`RecordDataset` driven by
  :class:`DistributedBatchSampler`, which yields ``[(epoch, index), ...]`` so persistent workers
  always see the right epoch, and resumes mid-epoch exactly at ``start_batch``. A bad sample is
  replaced by the next good record, so batches keep their size (DDP gathers need equal sizes).
- stream mode (any webdataset source): :class:`StreamDataset`, an IterableDataset whose workers
  read shards, mix sources by weight and yield ready batches, a fixed number per epoch. Each
  reader's stream is a function of (seed, epoch, reader), so a resumed epoch replays the records
  every reader had drawn (reading, not decoding them) and continues exactly where it stopped.

Every batch is ``{"images": [B,3,H,W] float, "texts": [B,K+1,L] long, "raw_texts": B lists of
K+1 str, "keys": B str, "skips": {reason: count}}`` (with a multi-crop transform ``images`` [B,2,3,H,W]
and ``local_images`` [B,N,3,h,w]); ``skips`` counts the samples skipped since
the previous batch of the same worker, so summing it over batches gives the run's totals.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .._compat import PortableTransform
from ..captions import NoUsableTextError, SubcaptionSampler
from ..io import BadSample, decode_image, read_image_file
from .records import ConcatTable, Record, RecordTable, key_index
from .shards import ShardSource
from .spec import SpecError, open_source, parse_spec

__all__ = [
    "Collator",
    "DistributedBatchSampler",
    "NoUsableSamples",
    "RecordDataset",
    "SampleLoader",
    "StreamDataset",
    "TrainLoader",
    "build_train_loader",
]

# This many bad samples in a row means the data is unusable (an unmounted image directory, a
# wrong images= root), not that a few samples are bad: stop with the counts instead of spinning.
MAX_CONSECUTIVE_BAD = 10_000
# Each random stream starts from (seed, purpose, ...): one user seed drives them all, and the
# purpose keeps, say, the augmentation of sample i from sharing a stream with the order of epoch i.
_AUGMENT, _ORDER, _TABLE, _MIX = 11, 12, 13, 14
_EXAMPLES = 5  # offending records listed by NoUsableSamples


class NoUsableSamples(ValueError):
    """Every sample tried in a row was bad: the data as given is unusable. The message gives the
    skip counts by reason and the first offending records."""

    @classmethod
    def after(cls, run: _BadRun) -> NoUsableSamples:
        counts = ", ".join(f"{reason} {count}" for reason, count in run.reasons.most_common())
        return cls(
            f"no usable sample: the {run.count} records tried in a row were all bad ({counts}). "
            "The first ones:\n" + "".join(f"  {example}\n" for example in run.examples)
            + "Check the image root (images=) and the captions; docs/data.md lists the skip reasons."
        )

    def unwrapped(self) -> NoUsableSamples:
        """This error as raised in a dataloader worker. torch re-raises a worker's exception in
        the main process with the worker's traceback as its message; keep the message only."""
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        text = str(self)
        return type(self)(text.rsplit(marker, 1)[1].rstrip()) if marker in text else self


class _BadRun:
    """Bad samples met in a row: their count by reason and the first few, for the error."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    @property
    def count(self) -> int:
        return self.reasons.total()

    def add(self, record: Record, bad: BadSample) -> None:
        self.reasons[bad.reason] += 1
        if len(self.examples) < _EXAMPLES:
            named = isinstance(record.image, str) and record.image not in str(bad)
            image = f" ({record.image})" if named else ""
            self.examples.append(f"record {record.key}{image}: {bad}")


@dataclass(frozen=True)
class SampleLoader:
    """Record -> ``{"image", "texts", "key"}``, or :class:`BadSample` with the reason.

    Checks run cheapest first (known record errors, texts, then the image), and the first failure
    names the reason. The image transform runs under a torch seed from (seed, epoch, key), so
    random augmentation is the same whichever reader, worker or resume produced the sample.
    """

    sampler: SubcaptionSampler
    transform: Callable[[Any], torch.Tensor]
    seed: int = 0
    draft: int | None = None

    def __call__(self, record: Record, epoch: int) -> dict[str, Any]:
        if record.error is not None:
            raise BadSample(record.error)
        index = key_index(record.key)
        try:
            texts = self.sampler.sample(record.raw_caption, record.captions, index=index, epoch=epoch)
        except NoUsableTextError as err:
            raise BadSample("no_text", str(err)) from None
        data = record.image if isinstance(record.image, bytes) else read_image_file(record.image)
        image = decode_image(data, draft=self.draft)
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone when num_workers=0
            # The CPU generator only: torch.manual_seed also queues CUDA seeding with a stack trace,
            # which costs a millisecond per sample.
            torch.default_generator.manual_seed(
                int(np.random.SeedSequence([self.seed, _AUGMENT, epoch, index]).generate_state(1)[0])
            )
            pixels = self.transform(image)
        return {"image": pixels, "texts": texts, "key": record.key}


class RecordDataset(Dataset):
    """Map-style dataset over records; ``dataset[(epoch, index)]`` returns one good sample.

    A bad record is replaced by the next good one (index + 1, + 2, ... wrapping around), which is
    deterministic, so resumed and multi-worker runs see the same batches. Only the requested
    record's failure is counted: each bad record counts once per visit by the sampler.
    """

    def __init__(self, table: RecordTable | ConcatTable, load: SampleLoader):
        self.table = table
        self.load = load

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, index = item
        skips: Counter[str] = Counter()
        run = _BadRun()
        for step in range(min(len(self.table), MAX_CONSECUTIVE_BAD)):
            record = self.table[(index + step) % len(self.table)]
            try:
                sample = self.load(record, epoch)
            except BadSample as bad:
                if step == 0:
                    skips[bad.reason] += 1
                run.add(record, bad)
                continue
            sample["skips"] = skips
            return sample
        raise NoUsableSamples.after(run)


def _cycled_permutation(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` indices into ``n`` items: whole permutations back to back, each freshly drawn."""
    cycles = [rng.permutation(n) for _ in range(math.ceil(count / n))]
    return np.concatenate(cycles)[:count] if cycles else np.zeros(0, dtype=np.int64)


class DistributedBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` for one rank; resumable mid-epoch.

    Each epoch has one global order, a function of (seed, epoch) only, cut into global batches of
    ``batch_size * world_size``; rank ``r`` takes slice ``r`` of each, so ranks are disjoint, all
    have the same number of batches, and the last incomplete global batch is dropped.

    ``sizes`` are the lengths of the concatenated sources. Without ``weights`` an epoch is a
    permutation of everything (repeated if ``epoch_samples`` asks for more). With weights, source
    ``s`` gets ``round(weight_s * epoch_samples)`` slots at shuffled positions, filled from its own
    cycled permutation, so the mix is exact every epoch.

    ``set_epoch(epoch, start_batch)`` chooses what ``__iter__`` yields next: the batches of that
    epoch from ``start_batch`` on, exactly as an uninterrupted run would have produced them.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        *,
        weights: Sequence[float] | None = None,
        epoch_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        if weights is not None and len(weights) != len(sizes):
            raise ValueError(f"{len(weights)} weights for {len(sizes)} sources")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every source needs at least one record, sizes: {list(sizes)}")
        self.sizes = list(sizes)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / sum(weights)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch_samples = epoch_samples if epoch_samples is not None else sum(self.sizes)
        self.num_batches = self.epoch_samples // (batch_size * world_size)
        if self.num_batches < 1:
            raise ValueError(
                f"an epoch of {self.epoch_samples} samples is less than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self) -> np.ndarray:
        """The global sample order of the current epoch (indices into the concatenated sources)."""
        rng = np.random.default_rng((self.seed, _ORDER, self.epoch))
        if self.weights is None:
            return _cycled_permutation(rng, sum(self.sizes), self.epoch_samples)
        counts = np.floor(self.weights * self.epoch_samples).astype(np.int64)
        # Hand the rounding remainder to the largest fractional parts, so counts sum exactly.
        remainder = self.epoch_samples - counts.sum()
        counts[np.argsort(counts - self.weights * self.epoch_samples)[:remainder]] += 1
        labels = rng.permutation(np.repeat(np.arange(len(self.sizes)), counts))
        order = np.empty(self.epoch_samples, dtype=np.int64)
        offsets = np.cumsum([0, *self.sizes])
        for source, count in enumerate(counts):
            order[labels == source] = offsets[source] + _cycled_permutation(
                rng, self.sizes[source], int(count)
            )
        return order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.epoch_order()
        step = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.num_batches):
            start = batch * step + self.rank * self.batch_size
            yield [(self.epoch, int(i)) for i in order[start : start + self.batch_size]]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class CachedTokenizer:
    """A tokenizer with a bounded per-process cache of token rows, least recently used out first.

    Sub-captions recur every epoch and BPE in Python costs about 0.2 ms a text, which with K + 1
    texts per image rivals the step itself on small models.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], max_entries: int = 1 << 17):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [text for text in dict.fromkeys(texts) if text not in self._rows]
        if missing:
            # clone: a row must not keep the whole batch's tensor alive
            self._rows.update(zip(missing, (row.clone() for row in self.tokenizer(missing))))
        for text in texts:
            self._rows.move_to_end(text)
        tokens = torch.stack([self._rows[text] for text in texts])
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        return tokens


@dataclass(frozen=True)
class Collator:
    """Samples -> a batch: stacks images, tokenizes all K+1 texts of every sample, sums skips."""

    tokenizer: Callable[[list[str]], torch.Tensor]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [sample["texts"] for sample in samples]
        tokens = self.tokenizer([t for per_image in texts for t in per_image])
        skips: Counter[str] = Counter()
        for sample in samples:
            skips.update(sample["skips"])
        return {
            **_stack_images([sample["image"] for sample in samples]),
            "texts": tokens.view(len(samples), len(texts[0]), -1),
            "raw_texts": texts,
            "keys": [sample["key"] for sample in samples],
            "skips": dict(skips),
        }


def _stack_images(images: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``images`` [B, 3, H, W]; or from multi-crop views (:class:`dreamlip.views.MultiCropTransform`)
    ``images`` [B, 2, 3, H, W], the global crops, and ``local_images`` [B, N, 3, h, w]."""
    if isinstance(images[0], torch.Tensor):
        return {"images": torch.stack(images)}
    return {"images": torch.stack([views[0] for views in images]), "local_images": torch.stack([views[1] for views in images])}


def _table_stream(
    table: RecordTable, *, seed: int, epoch: int, draw: int, slot: int, readers: int, tag: int
) -> Iterator[Record]:
    """A record table as an endless stream for one reader: its share of fresh permutations."""
    if len(table) < readers:
        raise ValueError(f"{table.source} has {len(table)} records, fewer than the {readers} readers")
    cycle = 0
    while True:
        order = np.random.default_rng((seed, _TABLE, epoch, draw, tag, cycle)).permutation(len(table))
        for index in order[slot::readers]:
            yield table[int(index)]
        cycle += 1


class StreamDataset(IterableDataset):
    """Endless sources mixed by weight, cut into a fixed number of batches per epoch.

    Every dataloader worker yields collated batches, and the DataLoader takes them round-robin, so
    batch ``b`` of an epoch comes from reader ``b mod W`` (``W`` workers). A reader's records are a
    function of (seed, epoch, rank, reader) only. Each batch says which reader made it and how many
    records that reader had drawn by then (``"reader"``, ``"records_read"``); given those counts,
    :meth:`set_epoch` resumes mid-epoch exactly: worker ``w`` takes over reader
    ``(start_batch + w) mod W``, replays its first records without decoding them and goes on.
    Epoch, start batch and counts live in shared memory so that persistent workers see
    :meth:`set_epoch` (as open_clip's SharedEpoch does).
    """

    def __init__(
        self,
        sources: Sequence[RecordTable | ShardSource],
        weights: Sequence[float],
        load: SampleLoader,
        collate: Collator,
        *,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
    ):
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.load, self.collate = load, collate
        self.batch_size, self.num_batches = batch_size, num_batches
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.num_readers = max(num_workers, 1)
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._start_batch = multiprocessing.Value("q", 0, lock=False)
        self._draw = multiprocessing.Value("q", 0, lock=False)
        self._records_read = multiprocessing.Array("q", self.num_readers, lock=False)

    def set_epoch(self, epoch: int, start_batch: int = 0, records_read: Sequence[int] | None = None) -> None:
        """Start ``epoch`` at ``start_batch``. Resuming exactly needs ``records_read``, the count
        per reader that the last consumed batch of each reader reported; without it the rest of
        the epoch is a fresh draw (the right number of batches, other samples)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        if records_read is not None and len(records_read) != self.num_readers:
            raise ValueError(f"records_read has {len(records_read)} counts for {self.num_readers} readers")
        fresh = start_batch > 0 and records_read is None
        self._epoch.value, self._start_batch.value = epoch, start_batch
        self._draw.value = start_batch if fresh else 0
        self._records_read[:] = [0] * self.num_readers if records_read is None else list(records_read)

    def __len__(self) -> int:
        return self.num_batches - self._start_batch.value

    def _streams(self, epoch: int, draw: int, reader: int) -> list[Iterator[Record]]:
        slot, readers = self.rank * self.num_readers + reader, self.world_size * self.num_readers
        streams = []
        for tag, source in enumerate(self.sources):
            common = dict(seed=self.seed, epoch=epoch, draw=draw)
            if isinstance(source, ShardSource):
                streams.append(
                    source.records(
                        **common,
                        rank=self.rank,
                        world_size=self.world_size,
                        worker=reader,
                        num_workers=self.num_readers,
                        shuffle_buffer=self.shuffle_buffer,
                    )
                )
            else:
                streams.append(_table_stream(source, **common, slot=slot, readers=readers, tag=tag))
        return streams

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_readers:  # the reader layout decides which records each batch holds
            raise RuntimeError(f"built for {self.num_readers} readers, run by {num_workers} workers")
        epoch, start_batch, draw = self._epoch.value, self._start_batch.value, self._draw.value
        remaining = self.num_batches - start_batch
        mine = remaining // self.num_readers + (worker < remaining % self.num_readers)
        reader = (start_batch + worker) % self.num_readers  # the reader whose batches come next here
        streams = self._streams(epoch, draw, reader)
        pick = np.random.default_rng((self.seed, _MIX, epoch, draw, self.rank * self.num_readers + reader))

        def next_record() -> Record:
            source = int(pick.choice(len(streams), p=self.weights)) if len(streams) > 1 else 0
            return next(streams[source])

        records_read = self._records_read[reader]
        for _ in range(records_read):  # replay what the interrupted run had drawn, without decoding
            next_record()
        skips: Counter[str] = Counter()
        run = _BadRun()
        for _ in range(mine):
            samples: list[dict[str, Any]] = []
            while len(samples) < self.batch_size:
                record = next_record()
                records_read += 1
                try:
                    sample = self.load(record, epoch)
                except BadSample as bad:
                    skips[bad.reason] += 1
                    run.add(record, bad)
                    if run.count >= MAX_CONSECUTIVE_BAD:
                        raise NoUsableSamples.after(run) from None
                    continue
                if run.count:
                    run = _BadRun()
                sample["skips"], skips = skips, Counter()
                samples.append(sample)
            yield {**self.collate(samples), "reader": reader, "records_read": records_read}


@dataclass
class TrainLoader:
    """What :func:`build_train_loader` returns.

    Iterate it for this epoch's batches; ``len()`` is the batches left this epoch on this rank.
    Call ``set_epoch(epoch)`` before each epoch. To resume a run, pass the epoch, the number of
    batches this rank already finished in it and, in stream mode, the :attr:`records_read` it had
    then (saved with the checkpoint).
    """

    dataloader: DataLoader
    num_batches: int  # batches per full epoch on each rank
    num_samples: int  # samples per full epoch over all ranks (num_batches * batch_size * world_size)
    mode: str  # "map" or "stream"
    _control: DistributedBatchSampler | StreamDataset
    # stream mode: records each reader of this rank has drawn, as of the last batch handed out
    records_read: list[int] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0, records_read: Sequence[int] | None = None) -> None:
        if self.mode == "map":
            self._control.set_epoch(epoch, start_batch)
            return
        self._control.set_epoch(epoch, start_batch, records_read)
        self.records_read = list(records_read) if records_read is not None else [0] * self._control.num_readers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for batch in self.dataloader:
                if self.mode == "stream":
                    self.records_read[batch.pop("reader")] = batch.pop("records_read")
                yield batch
        except NoUsableSamples as err:
            raise err.unwrapped() from None

    def __len__(self) -> int:
        return len(self._control)


def _image_transform(image_size: int | None, transform: Callable | None) -> Callable:
    if (image_size is None) == (transform is None):
        raise ValueError("give exactly one of image_size and transform")
    if transform is not None:
        return transform
    from dreamlip.model import load_open_clip

    return load_open_clip().image_transform(image_size, is_train=True)


def _tokenizer(tokenizer: str | Callable) -> Callable:
    if not isinstance(tokenizer, str):
        return tokenizer
    from dreamlip.model import get_tokenizer

    return get_tokenizer(tokenizer)


def _note_unread(specs: Sequence[Any], sources: Sequence[RecordTable | ShardSource]) -> None:
    """Name once, at start, the fields that look like captions but that nothing reads: they are
    kept as metadata, and the user hears of it instead of losing them silently."""
    notes = [f"{item.path}: {', '.join(source.unread)}" for item, source in zip(specs, sources) if source.unread]
    if notes:
        print(
            "dreamlip: note: fields that look like captions are kept as metadata, not read as captions "
            f"(docs/data.md, \"Layouts read\"): {'; '.join(notes)}",
            file=sys.stderr,
        )


def build_train_loader(
    spec: str,
    *,
    sampler: SubcaptionSampler,
    tokenizer: str | Callable[[list[str]], torch.Tensor],
    batch_size: int,
    image_size: int | None = None,
    transform: Callable | None = None,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_batch: int = 0,
    records_read: Sequence[int] | None = None,
    epoch_samples: int | None = None,
    shuffle_buffer: int = 1000,
    persistent_workers: bool = True,
    pin_memory: bool = False,
) -> TrainLoader:
    """Build the training loader for a SPEC string (docs/data.md).

    Args:
        sampler: draws each image's K+1 texts (its ``seed`` and ``k`` apply).
        tokenizer: an open_clip tokenizer, or a model name for ``open_clip.get_tokenizer``.
        batch_size: per rank.
        image_size / transform: exactly one; ``image_size`` uses open_clip's training transform
            (and lets JPEG decoding downscale early); pass the model's own ``preprocess_train``
            as ``transform`` to match its normalisation.
        seed: order of samples, shard choice and augmentation (not the text draw: ``sampler.seed``).
        epoch, start_batch, records_read: where to start (see ``TrainLoader.set_epoch``).
        epoch_samples: samples per epoch over all ranks; default: all records once (the sum of
            the sources' sizes). Webdataset sources need it, or their sizes (sizes.json/samples=).
        shuffle_buffer: samples per shard-reading worker held for shuffling (stream mode).

    Raises SchemaError / SpecError / FileNotFoundError / ValueError before any worker starts.
    """
    specs = parse_spec(spec)
    sources = [open_source(s) for s in specs]
    if rank == 0:
        _note_unread(specs, sources)
    load = SampleLoader(sampler, PortableTransform(_image_transform(image_size, transform)), seed=seed, draft=image_size)
    collate = Collator(CachedTokenizer(_tokenizer(tokenizer)))
    weights = [s.weight for s in specs] if specs[0].weight is not None else None
    workers = dict(
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
    )

    if all(isinstance(s, RecordTable) for s in sources):
        batches = DistributedBatchSampler(
            [len(s) for s in sources],
            batch_size,
            weights=weights,
            epoch_samples=epoch_samples,
            rank=rank,
            world_size=world_size,
            seed=seed,
        )
        dataset = RecordDataset(ConcatTable(sources), load)
        dataloader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **workers)
        control, mode = batches, "map"
    else:
        sizes = [len(s) if isinstance(s, RecordTable) else s.size for s in sources]
        if epoch_samples is None:
            if None in sizes:
                unknown = specs[sizes.index(None)].path
                raise SpecError(
                    f"size of {unknown!r} unknown (no sizes.json): add ?samples=N to it or give epoch_samples"
                )
            epoch_samples = sum(sizes)
        if weights is None:
            if len(sources) > 1 and None in sizes:
                raise SpecError("give weights to mix sources of unknown size (SOURCE:WEIGHT,...)")
            weights = sizes if len(sources) > 1 else [1.0]
        num_batches = epoch_samples // (batch_size * world_size)
        if num_batches < 1:
            raise ValueError(
                f"an epoch of {epoch_samples} samples is less than one global batch "
                f"({batch_size} x {world_size})"
            )
        readers = world_size * max(num_workers, 1)
        for source, item in zip(sources, specs, strict=True):
            count = len(source) if isinstance(source, RecordTable) else len(source.urls)
            if (isinstance(source, RecordTable) or not source.resample) and count < readers:
                raise ValueError(
                    f"{item.path!r}: {count} {'records' if isinstance(source, RecordTable) else 'shards'} "
                    f"can't be split over {world_size} ranks x {max(num_workers, 1)} workers; "
                    "use more shards, fewer workers, or resample=1"
                )
        dataset = StreamDataset(
            sources,
            weights,
            load,
            collate,
            batch_size=batch_size,
            num_batches=num_batches,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
        )
        dataloader = DataLoader(dataset, batch_size=None, **workers)
        control, mode = dataset, "stream"

    loader = TrainLoader(
        dataloader, control.num_batches, control.num_batches * batch_size * world_size, mode, control
    )
    loader.set_epoch(epoch, start_batch, records_read)
    return loader
