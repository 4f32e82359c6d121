"""Caption generators: a local transformers model, an OpenAI-compatible server, or vLLM offline.

Each backend turns a list of :class:`Request` (image, prompt, token budget) into one
:class:`Generation` per request, in order. A failure that concerns one request (a refused image, a
request that still fails after its retries) comes back as ``Generation(error="<reason>: <detail>")``
so the run can record it and go on, counted by its reason (one of :data:`FAILURE_REASONS`); a
failure that would hit every request (bad URL, unknown model, missing package) raises
:class:`BackendError`, which stops the run with that message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Protocol, Sequence
from urllib.parse import urlsplit

from PIL import ExifTags, Image

from dreamlip.io import decode_image
from dreamlip.launch import launch_from_env

__all__ = [
    "FAILURE_REASONS",
    "BackendError",
    "Captioner",
    "Generation",
    "OpenAIBackend",
    "PreparedImage",
    "Request",
    "TransformersBackend",
    "VLLMBackend",
    "check_key_destination",
    "prepare_image",
]

# Formats every OpenAI-compatible server accepts as a data URL; anything else is re-encoded as PNG.
_PASSTHROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


# The reasons a backend records a request's failure under (docs/recaption.md has the table).
FAILURE_REASONS = {
    "generation_failed": "the local model raised on this image (transformers, vllm)",
    "http_error": "a 4xx other than 401/403/404/429 (400, 413, 422 at once; 408, 409, 425 after the retries)",
    "rate_limited": "429 on every attempt",
    "server_error": "5xx on every attempt",
    "timeout": "no complete reply within --timeout on every attempt",
    "connection_error": "connection refused, reset or dropped on every attempt",
    "malformed_reply": "a 200 that is no chat completion on every attempt: a body that does not decode "
    "(bad gzip), not JSON (an HTML page), no choices, no message",
    "empty_reply": "a 200 whose message has no text (null or empty content) on every attempt",
}


class BackendError(RuntimeError):
    """A configuration or server problem that makes every request fail; the run stops."""


@dataclass(frozen=True)
class PreparedImage:
    """A decoded RGB image plus the encoded bytes to send to a server."""

    pil: Image.Image
    data: bytes
    mime: str


def prepare_image(data: bytes, *, max_side: int = 0) -> PreparedImage:
    """Decode ``data`` as the trainer does (:func:`dreamlip.io.decode_image`: bomb limit, EXIF
    orientation, 16-bit and alpha handled), shrinking it so its longer side is at most
    ``max_side`` (0: keep). Raises :class:`~dreamlip.data.records.BadSample` with the reason.

    The original bytes are sent only when a server decoding them sees the same pixels: 8-bit RGB
    or grey JPEG/PNG/WebP, no transparency, no EXIF rotation, not shrunk. Anything else (a 16-bit
    PNG a server would clip to white, say) is sent as a PNG of the decoded image.
    """
    image = decode_image(data, draft=max_side or None)
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    with Image.open(io.BytesIO(data)) as original:  # the header again: format, mode, orientation
        as_decoded = (
            original.format in _PASSTHROUGH
            and original.mode in ("RGB", "L")
            and "transparency" not in original.info
            and original.getexif().get(ExifTags.Base.Orientation, 1) == 1
            and original.size == image.size
        )
        if as_decoded:
            return PreparedImage(image, data, _PASSTHROUGH[original.format])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PreparedImage(image, buffer.getvalue(), "image/png")


@dataclass(frozen=True)
class Request:
    image: PreparedImage
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    text: str = ""
    truncated: bool = False  # stopped at the token limit: the last sentence may be cut off
    error: str | None = None


class Captioner(Protocol):
    model_id: str

    def generate(self, requests: Sequence[Request]) -> list[Generation]: ...

    def close(self) -> None: ...


def _data_url(image: PreparedImage) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"


def _user_turn(image_part: dict[str, Any], prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}]


def _by_budget(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Indices of ``requests`` in batches that share one ``max_new_tokens``."""
    groups: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.max_new_tokens, []).append(i)
    return [ids[s : s + batch_size] for ids in groups.values() for s in range(0, len(ids), batch_size)]


class _BatchedBackend:
    """Runs batches; when a whole batch raises, retries its requests one by one to isolate the cause."""

    batch_size: int

    def _generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        raise NotImplementedError

    def _free_memory(self) -> None:
        """Called before the one-by-one retry of a failed batch (e.g. after running out of memory)."""

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        for ids in _by_budget(requests, self.batch_size):
            try:
                outputs = self._generate_batch([requests[i] for i in ids])
            except BackendError:
                raise
            except Exception as err:  # noqa: BLE001 - recorded per image below
                if len(ids) == 1:
                    outputs = [Generation(error=f"generation_failed: {type(err).__name__}: {err}")]
                else:
                    self._free_memory()
                    outputs = [self.generate([requests[i]])[0] for i in ids]
            for i, output in zip(ids, outputs):
                results[i] = output
        return results  # type: ignore[return-value]


class TransformersBackend(_BatchedBackend):
    """A local vision-language model directory (or hub id) run with transformers.

    Loaded with ``AutoProcessor`` and ``AutoModelForImageTextToText``; prompts go through the
    processor's chat template; decoding is greedy when ``temperature`` is 0, sampled otherwise.
    """

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        from dreamlip._compat import ensure_torchvision

        ensure_torchvision()  # transformers' image processors import torchvision when installed
        import torch
        import transformers
        from packaging.version import Version

        self.model_id = model
        self.batch_size = batch_size
        self.temperature, self.top_p = temperature, top_p
        torch.manual_seed(seed)
        if device == "auto":  # under torchrun, srun or MPI, one GPU per rank
            device = f"cuda:{launch_from_env().local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            on_gpu = self.device.type == "cuda"
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
        torch_dtype = getattr(torch, dtype)

        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                model, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise BackendError(f"cannot load a processor from {model!r}: {err}") from None
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise BackendError(f"{model!r} has no image+text processor: is it a vision-language model?")
        if not getattr(self.processor, "chat_template", None):
            raise BackendError(f"{model!r} has no chat template; the prompt cannot be formatted for it")
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56.
        dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        try:
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                model, trust_remote_code=trust_remote_code, **{dtype_kwarg: torch_dtype}
            )
        except (OSError, ValueError) as err:
            raise BackendError(f"cannot load {model!r} as an image-text-to-text model: {err}") from None
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos.add(self.tokenizer.eos_token_id)

    def _generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        import torch

        texts = [
            self.processor.apply_chat_template(
                _user_turn({"type": "image"}, r.prompt), add_generation_prompt=True, tokenize=False
            )
            for r in requests
        ]
        inputs = self.processor(
            text=texts, images=[[r.image.pil] for r in requests], padding=True, return_tensors="pt"
        ).to(self.device, dtype=self.model.dtype)  # casts floating tensors only (pixels), not ids
        budget = requests[0].max_new_tokens
        options: dict[str, Any] = {"max_new_tokens": budget, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            options.update(temperature=self.temperature, top_p=self.top_p)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options, pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for tokens in new_tokens:
            ended = any(t in self._eos for t in tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(text=text, truncated=not ended and len(tokens) >= budget))
        return results

    def _free_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        del self.model


class VLLMBackend(_BatchedBackend):
    """vLLM's offline engine: the whole batch is handed to ``LLM.chat`` at once."""

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise BackendError(
                "--backend vllm needs vLLM installed (pip install vllm; Linux with a CUDA GPU). "
                "Without it, serve the model with any OpenAI-compatible server and use --backend openai."
            ) from None
        self.model_id = model
        self.batch_size = batch_size
        self._sampling = lambda budget: SamplingParams(
            max_tokens=budget, temperature=temperature, top_p=top_p, seed=seed
        )
        self.llm = LLM(
            model=model, seed=seed, trust_remote_code=trust_remote_code, limit_mm_per_prompt={"image": 1}
        )

    def _generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        conversations = [
            _user_turn({"type": "image_url", "image_url": {"url": _data_url(r.image)}}, r.prompt)
            for r in requests
        ]
        outputs = self.llm.chat(conversations, self._sampling(requests[0].max_new_tokens), use_tqdm=False)
        return [
            Generation(text=o.outputs[0].text.strip(), truncated=o.outputs[0].finish_reason == "length")
            for o in outputs
        ]

    def close(self) -> None:
        del self.llm


# Statuses worth another try: timeouts, conflicts, rate limits and server-side errors.
_RETRY_STATUSES = {408, 409, 425, 429}
# Statuses that mean every request will fail the same way: stop instead of recording each image.
_FATAL_STATUSES = {401, 403, 404}
_MAX_DELAY = 60.0


def check_key_destination(base_url: str, api_key: str | None, allow_insecure_key: bool = False) -> None:
    """Raise :class:`BackendError` unless ``api_key`` may go to ``base_url``: there is no key, it
    travels over https, or over plain http to this machine only (127.0.0.0/8, ::1, localhost),
    where nobody else can listen in; ``allow_insecure_key`` lifts the rule."""
    parts = urlsplit(base_url)
    if not api_key or allow_insecure_key or parts.scheme != "http":
        return  # https protects the key; a URL of another scheme is refused as a URL
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if not loopback:
        raise BackendError(
            f"refusing to send the API key in clear text over http to {host!r}: use an https:// "
            "--base-url, or pass --allow-insecure-key if the network to that host is trusted"
        )


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:300]


class OpenAIBackend:
    """Any server speaking the OpenAI chat-completions protocol (vLLM, SGLang, TGI, Ollama, ...).

    Each image is sent as a base64 data URL; up to ``concurrency`` requests are in flight.
    ``timeout`` bounds each attempt as a whole, however slowly the reply trickles in. Timeouts,
    connection errors, 408/409/425/429, 5xx and malformed 200 replies (an undecodable body, not a
    chat completion, no text) are retried with exponential backoff and jitter (honouring
    ``Retry-After``), at most ``max_retries`` times, then recorded under the last attempt's reason;
    other 4xx are not retried: 401/403/404 stop the run (wrong key, URL or model), the rest are
    recorded as that image's failure.

    ``api_key`` is sent as a bearer token only over https or to loopback addresses (see
    :func:`check_key_destination`) unless ``allow_insecure_key``; redirects are not followed, so
    a server cannot forward it elsewhere.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        retry_delay: float = 1.0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        allow_insecure_key: bool = False,
    ) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"--base-url must start with http:// or https://, got {base_url!r}")
        check_key_destination(base_url, api_key, allow_insecure_key)
        if concurrency < 1:
            raise BackendError(f"--concurrency must be >= 1, got {concurrency}")
        self._httpx = httpx
        self.base_url = base_url.rstrip("/")
        self.concurrency, self.max_retries, self.retry_delay = concurrency, max_retries, retry_delay
        self.timeout = timeout
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout_config = httpx.Timeout(timeout, connect=min(timeout, 30.0))
        # One event loop and one connection pool for the whole run, reused batch after batch.
        self._loop = asyncio.new_event_loop()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            headers=headers, timeout=timeout_config, limits=limits, follow_redirects=False
        )
        self.model_id = model or self._loop.run_until_complete(self._served_model())

    async def _served_model(self) -> str:
        """The first model the server lists (vLLM and SGLang serve one): used when --model is not given."""
        url = f"{self.base_url}/models"
        try:
            response = await self._client.get(url)
        except self._httpx.HTTPError as err:
            raise BackendError(f"cannot reach {url}: {err!r}; is the server running?") from None
        if response.status_code != 200:
            raise BackendError(
                f"{url} answered HTTP {response.status_code}: {_error_message(response)}; pass --model"
            )
        models = response.json().get("data") or []
        if not models:
            raise BackendError(f"{url} lists no model; pass --model")
        return models[0]["id"]

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self._loop.run_until_complete(self._generate_all(requests))

    async def _generate_all(self, requests: Sequence[Request]) -> list[Generation]:
        gate = asyncio.Semaphore(self.concurrency)
        outcomes = await asyncio.gather(*(self._one(gate, r) for r in requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), _MAX_DELAY)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.retry_delay * 2**attempt, _MAX_DELAY) * random.uniform(0.5, 1.0)

    async def _one(self, gate: asyncio.Semaphore, request: Request) -> Generation:
        url = f"{self.base_url}/chat/completions"
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": _user_turn(
                {"type": "image_url", "image_url": {"url": _data_url(request.image)}}, request.prompt
            ),
            "max_tokens": request.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        reason = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                async with gate:
                    # httpx's timeout is per read: a server sending a few bytes a second never trips it.
                    response = await asyncio.wait_for(self._client.post(url, json=body), self.timeout)
            except (asyncio.TimeoutError, self._httpx.TimeoutException):
                reason = f"timeout: no complete reply within {self.timeout:g} s"
            except self._httpx.TransportError as err:  # refused or dropped connections
                reason = f"connection_error: {type(err).__name__}" + (f": {err}" if str(err) else "")
            except self._httpx.DecodingError as err:  # a body its Content-Encoding does not decode
                reason = f"malformed_reply: the body does not decode ({err})"
            else:
                status = response.status_code
                if status == 200:
                    generation = self._parse(response)
                    if generation.error is None:
                        return generation
                    reason = generation.error
                else:
                    message = _error_message(response)
                    if status in _FATAL_STATUSES:
                        raise BackendError(
                            f"{url} answered HTTP {status}: {message} (check --base-url, --model and --api-key)"
                        )
                    if status not in _RETRY_STATUSES and status < 500:
                        return Generation(error=f"http_error: HTTP {status} (not retried): {message}")
                    kind = "rate_limited" if status == 429 else "server_error" if status >= 500 else "http_error"
                    reason = f"{kind}: HTTP {status}: {message}"
                    retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        kind, _, detail = reason.partition(": ")
        return Generation(error=f"{kind}: {detail} ({self.max_retries + 1} attempts)")

    @staticmethod
    def _parse(response: Any) -> Generation:
        """The caption of a 200 reply, or ``Generation(error=...)`` when it is not a usable chat completion."""
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Generation(error=f"malformed_reply: not a chat completion: {response.text[:200]!r}")
        if isinstance(content, list):  # content parts, as some servers return
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            return Generation(error=f"empty_reply: the message's content is {content!r}")
        return Generation(text=content.strip(), truncated=choice.get("finish_reason") == "length")

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        # A body abandoned mid-stream (a broken gzip one) leaves an async generator to finalise.
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
