"""Test helpers for `dreamlip recaption`: a tiny VLM, small datasets, a real server and a fault proxy.

Run as a script (``python tests/recaption_fixtures.py serve MODEL_DIR PORT``) it starts
``transformers serve`` on a local model directory, offline.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Token ids the tiny model may emit: lowercase letters, space and full stop, so its random text
# still splits into sentences, and end-of-turn. Everything else is suppressed.
_ALLOWED_TEXT = "abcdefghijklmnopqrstuvwxyz ."
# The model ends its answer after this many tokens (a generation config any server honours), below
# the tests' smallest budget, so captions are complete; a smaller budget cuts them at the limit.
ANSWER_TOKENS = 4


def build_tiny_vlm(path: Path) -> Path:
    """Save a randomly initialised Qwen2-VL (~0.1 M parameters) with its processor to ``path``."""
    from dreamlip._compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # A byte-level BPE with no merges: every byte is a token, no vocabulary download needed.
    byte_chars = bytes_to_unicode()
    tokenizer = Qwen2Tokenizer(vocab={ch: i for i, ch in enumerate(byte_chars.values())}, merges=[])
    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    allowed = {tokenizer.convert_tokens_to_ids(byte_chars[ord(c)]) for c in _ALLOWED_TEXT} | {ids["<|im_end|>"]}
    generation = model.generation_config
    generation.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    # End-of-turn is held back for ANSWER_TOKENS tokens, then boosted past every other token.
    generation.min_new_tokens = ANSWER_TOKENS
    generation.exponential_decay_length_penalty = (ANSWER_TOKENS - 1, 1e6)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_image(path: Path, seed: int, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(24, 80)), int(rng.integers(24, 80))
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_jsonl_dataset(root: Path, n: int, *, bad: bool = False) -> Path:
    """``root/data.jsonl`` with ``n`` images under ``root/images``; with ``bad``, 4 unusable ones added."""
    records = []
    for i in range(n):
        rel = f"images/{i:04d}.{'png' if i % 2 else 'jpg'}"
        make_image(root / rel, i)
        records.append({"id": f"img{i}", "image": rel, "raw_caption": f"alt text {i}", "label": i % 3})
    if bad:
        (root / "images/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        (root / "images/empty.png").write_bytes(b"")
        truncated = image_bytes(99)
        (root / "images/truncated.png").write_bytes(truncated[: len(truncated) // 2])
        records += [
            {"id": "corrupt", "image": "images/corrupt.jpg", "raw_caption": "x"},
            {"id": "missing", "image": "images/missing.png", "raw_caption": "y"},
            {"id": "empty", "image": "images/empty.png", "raw_caption": "z"},
            {"id": "truncated", "image": "images/truncated.png", "raw_caption": "w"},
        ]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_wds(root: Path, shards: int, per_shard: int) -> list[Path]:
    """Tars of ``<key>.jpg|png + .json + .txt``; the last sample of each tar has no ``.json``."""
    paths = []
    for s in range(shards):
        path = root / f"shard-{s:03d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as archive:
            for j in range(per_shard):
                key = f"{s:03d}{j:04d}"
                members = [
                    (
                        f"{key}.{'jpg' if j % 2 else 'png'}",
                        image_bytes(s * 100 + j, "JPEG" if j % 2 else "PNG"),
                    )
                ]
                if j < per_shard - 1:
                    members.append(
                        (f"{key}.json", json.dumps({"id": key, "url": f"http://x/{key}"}).encode())
                    )
                members.append((f"{key}.txt", f"alt text {key}".encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServer:
    """``transformers serve MODEL`` in a subprocess on 127.0.0.1 (a real OpenAI-compatible server)."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve", str(model_dir), str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited; see {log}:\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"transformers serve did not start in 120 s; see {log}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects scripted failures.

    ``script`` is a list of statuses answered (with an OpenAI-style error body) to the next
    requests instead of forwarding them; ``refuse`` maps a byte string to a status answered to
    every request whose body contains it; ``delay`` slows every forwarded request.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.script: list[int] = []
        self.refuse: dict[bytes, int] = {}
        self.delay = 0.0
        self.log: list[int] = []  # status answered to each chat-completions request
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str, body: bytes | None) -> None:
                import httpx

                response = httpx.request(
                    method,
                    proxy.upstream + self.path.removeprefix("/v1"),
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=120,
                )
                self._answer(response.status_code, response.content)
                return response.status_code

            def do_GET(self) -> None:
                self._forward("GET", None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    injected = proxy.script.pop(0) if proxy.script else None
                    if injected is None:
                        injected = next((s for marker, s in proxy.refuse.items() if marker in body), None)
                if injected is not None:
                    message = json.dumps({"error": {"message": f"injected {injected}", "code": injected}})
                    self._answer(injected, message.encode())
                    status = injected
                else:
                    time.sleep(proxy.delay)
                    status = self._forward("POST", body)
                with proxy._lock:
                    proxy.log.append(status)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat_reply(text: str | None, finish_reason: str = "stop") -> bytes:
    """A chat-completions body whose message content is ``text``."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]}).encode()


class ScriptedServer:
    """A fake OpenAI-compatible server on 127.0.0.1 whose replies a test scripts.

    ``reply(prompt, image, attempt)`` gets the request's prompt text, the image's number (in the
    order the server first saw them) and how many requests with the same prompt and image came
    before, and returns ``(status, headers, body)``, or ``(status, headers, body,
    bytes_per_second)`` to send the body a few bytes at a time. Each request's ``(prompt, image,
    attempt)`` is appended to ``log``.
    """

    def __init__(self, reply) -> None:
        self.reply = reply
        self.log: list[tuple[str, int, int]] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._images: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                image_part, text_part = request["messages"][0]["content"]
                prompt, url = text_part["text"], image_part["image_url"]["url"]
                with server._lock:
                    image = server._images.setdefault(url, len(server._images))
                    attempt = server._seen.get((prompt, url), 0)
                    server._seen[prompt, url] = attempt + 1
                    server.log.append((prompt, image, attempt))
                status, headers, body, *rate = server.reply(prompt, image, attempt)
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = rate[0] if rate else max(1, len(body))
                try:
                    for start in range(0, len(body), step):
                        if start:
                            time.sleep(1.0)
                        self.wfile.write(body[start : start + step])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _prepare_cpu_torchvision() -> None:
    """Make torchvision importable, and decode images with PIL where ``torchvision.io`` cannot
    (CPU-only torch beside PyPI's CUDA-built torchvision wheel)."""
    from dreamlip._compat import ensure_torchvision

    ensure_torchvision()
    import torch
    import transformers.image_processing_backends as backends
    from transformers.image_utils import load_image

    try:
        import torchvision.io

        torchvision.io.decode_image(torch.frombuffer(bytearray(image_bytes(0)), dtype=torch.uint8))
    except RuntimeError:
        backends.load_image_as_tensor = lambda url, *a, **k: torch.from_numpy(
            np.asarray(load_image(url).convert("RGB")).copy()
        ).permute(2, 0, 1)


def _serve(model_dir: str, port: str) -> None:
    _prepare_cpu_torchvision()
    from transformers.cli.transformers import app

    app(
        [
            "serve",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]
    )


if __name__ == "__mp_main__" and sys.argv[1:2] == ["serve"]:
    # transformers>=5.25 loads the model in a process started by spawn, which imports this script
    # as __mp_main__ (with the parent's argv) before it unpickles its target.
    _prepare_cpu_torchvision()

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(*sys.argv[2:4])
