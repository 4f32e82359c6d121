"""``dreamlip serve``: a local web page and JSON API over an image collection (docs/serve.md).

    dreamlip serve --checkpoint runs/dreamlip/model.pt --compare runs/clip/model.pt --images demo/data

Every error is a JSON ``{"detail": ...}`` with a 4xx status (5xx only for a fault of the server
itself, still JSON, its traceback logged on the console, never sent to the page; 503 when the
segmentation queue is full).

Requests are bounded in size (texts, characters, classes, upload bytes and pixels): beyond the
limits they get a 422 (413 for bytes and pixels) before any work. Segmentation, the one request
whose cost grows with its input (every class runs through 80 prompt templates, every window of the
image through the image tower), runs in its own worker, one at a time, at most
:data:`MAX_SEGMENT_WAITING` waiting, so searches and image pages never queue behind it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np

try:
    from fastapi import FastAPI, HTTPException, Query, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field
except ImportError as err:  # the optional dependencies are missing
    raise ImportError(f"dreamlip serve needs its extra: pip install 'dreamlip[serve]' ({err})") from err

__all__ = ["create_app", "model_names"]

MAX_K = 100
MAX_TEXT_CHARS = 2000  # a query or heatmap text
MAX_TEXTS = 32  # texts of one heatmap request
MAX_CLASSES = 64  # class names of one segmentation request
MAX_CLASS_CHARS = 100  # one class name
MAX_UPLOAD_PIXELS = 40_000_000  # an uploaded query image, checked from its header before decoding
MAX_SEGMENT_WAITING = 4  # segmentation requests queued behind the running one; more get a 503
DEFAULT_UPLOAD_MB = 16

log = logging.getLogger("dreamlip.serve")


def model_names(paths: Sequence[str | Path]) -> list[str]:
    """The shortest path suffixes that tell the models apart (``clip/model.pt``, ``dreamlip/model.pt``)."""
    parts = [Path(p).resolve().parts for p in paths]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{Path(p).name} #{i + 1}" for i, p in enumerate(paths)]  # the same path twice


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a JSON 413: at once when the declared
    Content-Length is over, else as soon as the bytes read so far are."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the {self.limit / 2**20:g} MB limit (--max-upload-mb)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


class _SegmentLane:
    """Runs segmentations one at a time in a thread of their own, off the threads that serve
    the light requests; refuses with a 503 once ``waiting`` are queued behind the running one."""

    def __init__(self, waiting: int):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment")
        self.limit, self.admitted = waiting + 1, 0  # touched on the event loop only: no lock

    async def run(self, work: Callable[[], Any]) -> Any:
        if self.admitted >= self.limit:
            raise HTTPException(503, f"busy: {self.admitted} segmentations running or queued; retry shortly",
                                headers={"Retry-After": "5"})
        self.admitted += 1
        try:
            return await asyncio.wrap_future(self.executor.submit(work))
        finally:
            self.admitted -= 1


K = Annotated[int, Query(ge=1, le=MAX_K, description="how many images")]
Texts = Annotated[list[str], Query(alias="text", description="one or more texts")]
LongestSide = Annotated[int | None, Query(ge=16, le=4096, description="longest side in pixels")]


class SegmentRequest(BaseModel):
    id: int
    classes: list[str] = Field(min_length=1)  # at most MAX_CLASSES: checked with a plain message
    dense: str | None = None


def create_app(models, collection, indexes, *, max_upload_bytes: int = DEFAULT_UPLOAD_MB << 20, segment_options=None):
    """The FastAPI app over ``collection`` (a :class:`~dreamlip.serve.index.Collection`), with
    ``models`` (:class:`~dreamlip.serve.readouts.ServedModel`) and one search index per model."""
    from dreamlip.captions import caption_text, split_sentences
    from dreamlip.io import decode_image
    from dreamlip.io import BadSample
    from dreamlip.eval.datasets import EvalDataError, load_image

    from PIL import Image

    from .readouts import DENSE_READOUTS, center_square, dense_supported

    segment_lane = _SegmentLane(MAX_SEGMENT_WAITING)
    static = resources.files("dreamlip.serve") / "static"
    segment_options = dict(segment_options or {})
    # docs_url off: Swagger's page loads its scripts from a CDN; the schema itself stays local.
    app = FastAPI(title="dreamlip serve", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)

    @app.exception_handler(EvalDataError)
    async def unreadable_collection_image(request: Request, err: EvalDataError):
        return JSONResponse({"detail": str(err)}, status_code=500)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server's log"}, status_code=500)

    def item(image_id: int):
        if not 0 <= image_id < len(collection):
            raise HTTPException(404, f"no image {image_id} (ids are 0..{len(collection) - 1})")
        return collection.items[image_id]

    @lru_cache(maxsize=64)
    def image(image_id: int):
        return load_image(item(image_id).image)

    def text(value: str, what: str = "q", limit: int = MAX_TEXT_CHARS) -> str:
        value = value.strip()
        if not value:
            raise HTTPException(400, f"{what} is empty")
        if len(value) > limit:
            raise HTTPException(422, f"{what} has {len(value)} characters, over the limit of {limit}")
        return value

    def ranked(embed, k: int) -> list[dict[str, Any]]:
        """Each model's top k for the query that ``embed(model)`` gives."""
        out = []
        for model, index in zip(models, indexes):
            scores, ids = index.search(embed(model), k)
            results = [
                {"id": int(i), "key": collection.items[i].key, "score": round(float(s), 5)}
                for s, i in zip(scores[0], ids[0])
                if i >= 0  # FAISS pads with -1 when it has fewer than k
            ]
            out.append({"name": model.name, "results": results})
        return out

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/info")
    def info():
        return {
            "images": len(collection),
            "source": collection.source,
            "models": [m.name for m in models],
            "index": indexes[0].kind,
            "dense": list(DENSE_READOUTS) if dense_supported() else [],
            "classes": collection.classes,
            "max_upload_bytes": max_upload_bytes,
        }

    @app.get("/api/search")
    def search(q: Annotated[str, Query(description="the text to search for")], k: K = 12):
        query = text(q)
        return {"query": query, "k": k, "models": ranked(lambda m: m.encode_text(query), k)}

    def within_pixel_limit(data: bytes, name: str | None) -> None:
        """413 for an image over MAX_UPLOAD_PIXELS, from its header alone; what PIL cannot even
        open is left to the decoder to name."""
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Exception:  # noqa: BLE001 - not an image: decode_image says why
            return
        if width * height > MAX_UPLOAD_PIXELS:
            raise HTTPException(413, f"uploaded file {name!r} is {width}x{height} = {width * height / 1e6:.1f} "
                                f"megapixels, over the limit of {MAX_UPLOAD_PIXELS / 1e6:g}")

    @app.post("/api/search/image")
    def search_by_image(file: UploadFile, k: K = 12):
        data = file.file.read()
        within_pixel_limit(data, file.filename)
        try:
            query = decode_image(data)
        except BadSample as err:
            status = 413 if err.reason == "image_too_large" else 400
            raise HTTPException(status, f"uploaded file {file.filename!r}: {err}") from None
        return {"query": file.filename, "k": k, "models": ranked(lambda m: m.encode_image(query), k)}

    @app.get("/api/image/{image_id}")
    def image_info(image_id: int):
        entry = item(image_id)
        width, height = image(image_id).size
        captioners = [
            # a pre-split caption (a list of sentences) is shown as the text it was
            {"name": name, "short": caption_text(c.get("short")) or None, "long": caption_text(c.get("long")) or None,
             "sentences": split_sentences(c.get("long"))}
            for name, c in entry.captioners.items()
        ]
        return {
            "id": image_id,
            "key": entry.key,
            "width": width,
            "height": height,
            "file": f"/api/image/{image_id}/file",
            "captions": {"raw": entry.raw, "captioners": captioners, "texts": entry.texts},
        }

    @app.get("/api/image/{image_id}/file")
    def image_file(image_id: int, size: LongestSide = None):
        picture = image(image_id)
        if size is not None and max(picture.size) > size:
            picture = picture.copy()
            picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/heatmap")
    def heatmap(id: int, text_: Texts):
        if len(text_) > MAX_TEXTS:
            raise HTTPException(422, f"{len(text_)} texts, over the limit of {MAX_TEXTS} per request")
        texts = [text(t, "text") for t in text_]
        picture = image(id)
        maps = []
        for model in models:  # two models may have different patch grids
            weights = model.heatmaps(picture, texts)
            maps.append({"name": model.name, "grid": list(weights.shape[1:]), "heatmaps": np.round(weights.astype(np.float64), 6).tolist()})
        return {"id": id, "texts": texts, "box": list(center_square(picture)), "models": maps}

    @app.post("/api/segment")
    async def segment(request: SegmentRequest):
        item(request.id)
        if len(request.classes) > MAX_CLASSES:
            raise HTTPException(422, f"{len(request.classes)} classes, over the limit of {MAX_CLASSES} per request")
        classes = [text(c, "a class name", MAX_CLASS_CHARS) for c in request.classes]
        if len(set(classes)) != len(classes):
            raise HTTPException(400, "class names repeat")
        if request.dense is not None and request.dense not in DENSE_READOUTS:
            raise HTTPException(400, f"dense must be one of {list(DENSE_READOUTS)}")

        def compute() -> dict[str, Any]:
            picture = image(request.id)
            maps = [
                {"name": m.name, "labels": m.segment(picture, classes, request.dense, **segment_options).tolist()}
                for m in models
            ]
            return {"id": request.id, "classes": classes, "width": picture.width, "height": picture.height, "models": maps}

        return await segment_lane.run(compute)

    return app
