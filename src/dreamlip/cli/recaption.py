"""``dreamlip recaption``: add one captioner's long and short captions to every image of a dataset.

    dreamlip recaption --data train.jsonl --out train.qwen.jsonl --captioner qwen2vl \\
        --backend openai --base-url http://127.0.0.1:8000/v1 --concurrency 32

See docs/recaption.md for the output layout and the shard/resume semantics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from dreamlip.launch import launch_from_env
from dreamlip.recaption.backends import (
    BackendError,
    Captioner,
    OpenAIBackend,
    TransformersBackend,
    VLLMBackend,
    check_key_destination,
)
from dreamlip.recaption.runner import DEFAULT_PROMPT_LONG, DEFAULT_PROMPT_SHORT, RecaptionConfig, Unfinished, merge, recaption
from dreamlip.recaption.sources import InputError, open_input
from dreamlip.recaption.store import ManifestMismatch, WorkDir

_BATCH_DEFAULTS = {"transformers": 8, "openai": None, "vllm": 256}  # openai: 4 x --concurrency
# backend -> (module it imports, how to get it): checked at start, not after the input is read.
_BACKEND_NEEDS = {
    "transformers": ("transformers", "pip install 'dreamlip[recaption]'"),
    "openai": ("httpx", "pip install 'dreamlip[recaption]'"),
    "vllm": ("vllm", "pip install vllm; Linux with a CUDA GPU. Without it, serve the model with any "
             "OpenAI-compatible server and use --backend openai"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    io.add_argument(
        "--data",
        required=True,
        help="input: a .jsonl of records, a folder of images, or webdataset "
        "tar shards (a .tar, a brace pattern like 'shards/{000000..000099}.tar', or a folder of tars)",
    )
    io.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output: a .jsonl file (JSONL or folder input) or a "
        "folder of tars (webdataset input); must differ from --data",
    )
    io.add_argument(
        "--captioner", required=True, help="name under which captions are stored: captions.<NAME>"
    )
    io.add_argument("--work-dir", type=Path, help="resume state and parts (default: <OUT>.work)")
    io.add_argument(
        "--chunk-size",
        type=int,
        default=1000,
        help="records per unit of work for JSONL/folder input (a webdataset unit is one tar)",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="caption again images that already have captions from --captioner (default: keep them)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--backend", choices=sorted(_BATCH_DEFAULTS), default="transformers")
    model.add_argument(
        "--model",
        help="model directory or hub id (transformers, vllm; required), or the served "
        "model name (openai; default: the first one the server lists)",
    )
    model.add_argument("--prompt-long", default=DEFAULT_PROMPT_LONG)
    model.add_argument("--prompt-short", default=DEFAULT_PROMPT_SHORT)
    model.add_argument("--max-new-tokens", type=int, default=512, help="token budget of the long caption")
    model.add_argument(
        "--max-new-tokens-short", type=int, default=96, help="token budget of the short caption"
    )
    model.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; > 0: sampling")
    model.add_argument("--top-p", type=float, default=1.0)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument(
        "--batch-size",
        type=int,
        help="images per batch (and per result part); default: "
        "8 (transformers), 4 x --concurrency (openai), 256 (vllm)",
    )
    model.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="shrink images so the longer side is at most this many pixels (0: keep)",
    )
    model.add_argument(
        "--device", default="auto", help="transformers: cuda, cuda:1, cpu (auto: the launcher's local rank's GPU)"
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="transformers (auto: bf16 on GPU, fp32 on CPU)",
    )
    model.add_argument("--trust-remote-code", action="store_true", help="transformers, vllm")

    server = parser.add_argument_group("openai backend")
    server.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI-compatible API root, e.g. http://host:8000/v1",
    )
    server.add_argument(
        "--api-key",
        help="bearer token (default: $OPENAI_API_KEY; none sent if unset). Sent only over https or "
        "to this machine (127.0.0.0/8, ::1, localhost); never logged. Prefer the environment "
        "variable: command lines are visible to other users",
    )
    server.add_argument(
        "--allow-insecure-key",
        action="store_true",
        help="also send the key over plain http to other hosts (a trusted network only)",
    )
    server.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    server.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per attempt, from sending the request to the reply's last byte")
    server.add_argument("--max-retries", type=int, default=5,
                        help="retries on timeouts, dropped connections, 408/409/425/429, 5xx and malformed replies")
    server.add_argument(
        "--retry-delay",
        type=float,
        default=1.0,
        help="first backoff in seconds; doubles per retry (with jitter), capped at 60",
    )

    scale = parser.add_argument_group("scale")
    scale.add_argument(
        "--shard",
        default="0/1",
        help="I/N: process units I, I+N, I+2N, ... (auto: the rank and world of torchrun, srun or MPI, "
        "else a Slurm array)",
    )
    scale.add_argument(
        "--merge",
        action="store_true",
        help="only assemble the output from finished units (also done automatically by the "
        "process that finishes the last unit)",
    )
    scale.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_shard(text: str) -> tuple[int, int]:
    if text == "auto":
        env, launch = os.environ, launch_from_env()
        if launch.world_size > 1:
            return launch.rank, launch.world_size
        if "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like I/N (e.g. 3/8) or 'auto', got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _check_installed(backend: str) -> None:
    module, install = _BACKEND_NEEDS[backend]
    if importlib.util.find_spec(module) is None:
        name = "vLLM" if module == "vllm" else module
        raise BackendError(f"--backend {backend} needs {name} installed, which it is not here ({install})")


def _api_key(args: argparse.Namespace) -> str | None:
    # Read here, not as the flag's default: the key then never sits in the parsed arguments.
    return args.api_key or os.environ.get("OPENAI_API_KEY") or None


def _backend_factory(args: argparse.Namespace, batch_size: int):
    def make() -> Captioner:
        if args.backend == "openai":
            return OpenAIBackend(
                args.base_url,
                model=args.model,
                api_key=_api_key(args),
                concurrency=args.concurrency,
                timeout=args.timeout,
                max_retries=args.max_retries,
                retry_delay=args.retry_delay,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                allow_insecure_key=args.allow_insecure_key,
            )
        if not args.model:
            raise BackendError(f"--backend {args.backend} needs --model (a model directory or hub id)")
        if args.backend == "vllm":
            return VLLMBackend(
                args.model,
                batch_size=batch_size,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                trust_remote_code=args.trust_remote_code,
            )
        return TransformersBackend(
            args.model,
            batch_size=batch_size,
            device=args.device,
            dtype=args.dtype,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )

    return make


def run(args: argparse.Namespace) -> int:
    try:
        if not args.merge:
            _check_installed(args.backend)
            if args.backend == "openai":  # refused before any input is read or connection made
                check_key_destination(args.base_url, _api_key(args), args.allow_insecure_key)
        shard = _parse_shard(args.shard)
        for flag in ("batch_size", "max_new_tokens", "max_new_tokens_short"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise InputError(f"--{flag.replace('_', '-')} must be >= 1")
        source = open_input(args.data, args.out, chunk_size=args.chunk_size)
        work = WorkDir(args.work_dir or Path(f"{args.out}.work"))
        batch_size = args.batch_size or _BATCH_DEFAULTS[args.backend] or 4 * args.concurrency
        config = RecaptionConfig(
            captioner=args.captioner,
            prompt_long=args.prompt_long,
            prompt_short=args.prompt_short,
            max_new_tokens=args.max_new_tokens,
            max_new_tokens_short=args.max_new_tokens_short,
            batch_size=batch_size,
            shard=shard,
            overwrite=args.overwrite,
            max_side=args.max_side,
            progress=not args.no_progress,
        )
        work.check_manifest(config.manifest(source, args.chunk_size))
        if args.merge:
            summary = {"merged": merge(source, work)}
        else:
            summary = recaption(source, work, _backend_factory(args, batch_size), config)
    except (InputError, BackendError, ManifestMismatch, Unfinished) as err:
        print(f"dreamlip recaption: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamlip recaption: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    _report(summary, args.out, work)
    return 0


def _report(summary: dict, out: Path, work: WorkDir) -> None:
    if "shard" in summary:
        rate = summary["images_per_second"]
        print(
            f"shard {summary['shard']}: {summary['captioned']} captioned, {summary['failed']} failed, "
            f"{summary['skipped_existing']} already captioned, {summary['resumed']} done by an earlier run; "
            + (
                f"{rate:.2f} images/s over {summary['captioning_seconds']:.1f} s"
                if rate
                else "nothing to caption"
            ),
            file=sys.stderr,
        )
        if summary["units_busy_elsewhere"]:
            print(
                f"  {len(summary['units_busy_elsewhere'])} unit(s) were being processed by another process",
                file=sys.stderr,
            )
    merged = summary["merged"]
    if merged is None:
        print(
            f"  other shards still running; the last to finish writes {out} (or run with --merge)",
            file=sys.stderr,
        )
    else:
        print(
            f"wrote {out}: {json.dumps(merged)}; failures listed in {work.root / 'failures.jsonl'}",
            file=sys.stderr,
        )
