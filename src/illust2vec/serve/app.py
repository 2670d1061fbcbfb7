"""The web app of `i2v serve`: an HTTP API for tags and similar images, and the page that uses it.

    POST /api/tag              multipart `file` -> tags per head with scores (the record of `i2v tag --format json`),
                               every tag's score, and the thresholds, so the page moves thresholds without asking again
    POST /api/similar          multipart `file` (or `id` of an indexed image) -> neighbours with scores and image URLs
    GET  /api/image/{id}       an indexed image, by its id in the index only
    GET  /api/thumb/{id}       its thumbnail (JPEG)
    GET  /api/health           model, tags, backend, index, batching statistics
    GET  /                     the page (static/index.html, app.js, style.css; no build step)
    GET  /docs                 OpenAPI documentation

Uploads are decoded off the event loop and tagged through the `Batcher`, which puts concurrent requests into one
forward pass. Every error is a JSON object `{"error": "..."}`; a bug's traceback goes to the server's log only.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from rich.console import Console
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import UserError
from ..infer.preprocess import DRAFT_INFO, prepare, read_image
from ..infer.tagger import Selection, Tagger
from ..infer.writers import CaptionOptions, make_record
from ..util.images import BadImage, load_rgb
from .batcher import Batcher

if TYPE_CHECKING:
    from ..search import VectorIndex

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MB = 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small fields around the file
THUMB_SIZE = 256
THUMB_CACHE = 512  # thumbnails kept in memory (about 15 KB each)
# A BadImage's reason -> the HTTP status: a decompression bomb is "too large" (413), anything else that does not
# decode is not an image type we take (415).
STATUS_BY_REASON = {"too_large": 413, "empty": 415, "not_image": 415, "corrupt": 415, "unreadable": 415}


@dataclass(frozen=True)
class ServeConfig:
    """What `i2v serve` serves and how."""

    model: str
    index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 32.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    backend: str = "auto"
    device: str = "auto"
    k: int = 12  # neighbours the page asks for


QueryThreshold = Annotated[float | None, Query(ge=0.0, le=1.0, description="Threshold for this head (0..1).")]
HIDDEN: dict[str, Any] = {"include_in_schema": False}  # the form twins of query parameters: one entry in the docs


class UploadLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 (JSON), from its Content-Length header before
    anything is read, or as soon as the bytes read pass the limit (a chunked upload states no length).

    Written here rather than Starlette's RequestBodyLimitMiddleware: that one answers in plain text and exists only
    in recent Starlette releases.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        read = 0

        async def limited() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    # FastAPI passes an HTTPException raised while it reads the form on to our handler (JSON 413).
                    raise HTTPException(413, _too_large_text(self.limit))
            return message

        await self.app(scope, limited, send)


def _too_large_text(limit: int) -> str:
    return f"upload too large: the limit is {max(0, limit - FORM_OVERHEAD) / MB:g} MB"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": _too_large_text(limit)}, status_code=413)


# ---- the index


def open_index(path: str, tagger: Tagger) -> VectorIndex:
    """The index of `i2v index build`, checked against the model: vectors of two models do not compare."""
    from ..search import VectorIndex
    from ..search.similar import check_model

    index = VectorIndex.load(path)
    check_model(index, tagger, tagger.source)
    return index


# ---- the app


def create_app(cfg: ServeConfig, tagger: Tagger | None = None, index: VectorIndex | None = None) -> FastAPI:
    """The ASGI app. `tagger` and `index` may be given already loaded (tests, benchmarks); otherwise they are opened
    from `cfg.model` and `cfg.index`."""
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    if index is None and cfg.index:
        index = open_index(cfg.index, tagger)
    batcher = Batcher(tagger.run, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)
    model_name = _model_name(tagger)
    thumbs: OrderedDict[str, bytes] = OrderedDict()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="illust2vec",
        summary="Tags and similar images for anime-style illustrations",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.tagger, app.state.batcher, app.state.index = tagger, batcher, index
    app.add_middleware(UploadLimit, limit=int(cfg.max_upload_mb * MB) + FORM_OVERHEAD)
    _add_error_handlers(app)

    async def features_of(upload: UploadFile) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        data = await upload.read()
        x, size = await run_in_threadpool(_decode, data, tagger.image_size)
        probs, feats = await batcher.submit(x)
        return probs, feats, size

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    async def health() -> dict:
        """The model, its tags, the backend, whether an index is loaded, and what the batcher has done."""
        return {
            "status": "ok",
            "model": model_name,
            "kind": tagger.kind,
            "tags": len(tagger.labels),
            "heads": {h: len(ix) for h, ix in tagger.labels.heads.items()},
            "image_size": tagger.image_size,
            "backend": getattr(tagger.backend, "name", type(tagger.backend).__name__),
            "index": index is not None,
            "index_size": len(index) if index is not None else 0,
            "thresholds": tagger.thresholds.heads,
            "max_upload_mb": cfg.max_upload_mb,
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, **batcher.stats.to_json()},
        }

    @app.post("/api/tag")
    async def tag(
        file: Annotated[UploadFile, File(description="The image (JPEG, PNG, WebP, GIF, BMP...).")],
        general: QueryThreshold = None,
        character: QueryThreshold = None,
        mcut: Annotated[bool, Query(description="MCut thresholds for general and character tags.")] = False,
        general_form: Annotated[float | None, Form(alias="general", ge=0.0, le=1.0, **HIDDEN)] = None,
        character_form: Annotated[float | None, Form(alias="character", ge=0.0, le=1.0, **HIDDEN)] = None,
        mcut_form: Annotated[bool | None, Form(alias="mcut", **HIDDEN)] = None,
    ) -> dict:
        """Tag one image: the tags above the thresholds per head, highest first (as `i2v tag --format json`), plus
        every tag's score (`scores`) and the thresholds used (`thresholds`) and the model's own (`model_thresholds`).

        Thresholds (general, character, mcut) may be given in the query or as form fields; the model's calibrated
        ones apply otherwise.
        """
        probs, _, size = await features_of(file)
        general = general if general is not None else general_form
        character = character if character is not None else character_form
        use_mcut = mcut or bool(mcut_form)
        sel = Selection(general=general, character=character, mcut_general=use_mcut, mcut_character=use_mcut)
        tags = tagger.select(probs, sel)
        record = make_record(file.filename or "upload", tags, CaptionOptions())  # as `i2v tag --format json`
        record["model"] = model_name
        record["width"], record["height"] = size
        record["scores"] = {h: _rounded(s) for h, s in tagger.scores(probs).items()}
        record["thresholds"] = _applied(tagger, probs, sel)
        record["model_thresholds"] = {"heads": tagger.thresholds.heads, "tags": tagger.thresholds.tags}
        return record

    @app.post("/api/similar")
    async def similar(
        file: Annotated[UploadFile | None, File(description="The image to find neighbours of.")] = None,
        id: Annotated[str | None, Form(description="Or: the id of an image in the index.")] = None,
        k: Annotated[int, Query(ge=1, le=200, description="How many neighbours.")] = cfg.k,
        tags: Annotated[
            str | None, Query(description='Only images with these predicted tags: "blue_hair -hat".')
        ] = None,
    ) -> dict:
        """The `k` nearest images in the index (cosine similarity of feature vectors; Hamming for a binary index),
        best first, with their scores and the URLs of their image and thumbnail, which are served by id.

        Send an image as `file`, or `id` for "more like this" on an indexed image (the image itself is left out).
        """
        if index is None:
            raise HTTPException(404, "no index loaded: start the server with --index")
        if (file is None) == (id is None):
            raise HTTPException(422, "send either an image (file) or the id of an indexed image (id)")
        if file is not None:
            _, feats, _ = await features_of(file)
            if feats is None:
                raise HTTPException(422, f"{model_name} gives no feature vector (a WD ONNX file gives tags only)")
            query, row = feats, None
        else:
            row = index.rows_by_id().get(id)
            if row is None:
                raise HTTPException(404, "no image with that id in the index")
            query = index.vector(id)
        hits = await run_in_threadpool(_neighbours, index, query, k, tags, row)
        return {"neighbours": hits}

    @app.get("/api/image/{id:path}")
    async def image(id: str) -> FileResponse:
        """An indexed image's file, by its id in the index."""
        return FileResponse(_indexed_path(index, id))

    @app.get("/api/thumb/{id:path}")
    async def thumb(id: str) -> Response:
        """An indexed image's thumbnail, a JPEG at most 256 px on its longer side."""
        path = _indexed_path(index, id)
        if id not in thumbs:
            thumbs[id] = await run_in_threadpool(_thumbnail, path)
            if len(thumbs) > THUMB_CACHE:
                thumbs.popitem(last=False)
        thumbs.move_to_end(id)
        return Response(thumbs[id], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"error": message}`; an unexpected one is logged with its traceback, answered without."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(UserError)
    async def bad_input(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)

    # Starlette's own 404 and 405 for unknown routes are HTTPExceptions of starlette's class; same shape.
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, http_error)


def _decode(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Upload bytes -> the model's input for one image and the picture's size; refusals as HTTP errors."""
    try:
        image = read_image(data, size)
    except BadImage as e:
        status = STATUS_BY_REASON.get(e.reason, 415)
        # The reason, not Pillow's message: that one names in-memory objects and says nothing more to a user.
        what = f"image refused: {e}" if status == 413 else f"not an image we can read ({e.reason})"
        raise HTTPException(status, what) from None
    draft = image.info.get(DRAFT_INFO)  # a big JPEG decoded at a fraction of its size knows its full size
    return prepare(image, size), (tuple(draft[:2]) if draft else image.size)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {t: round(float(s), 6) for t, s in scores.items()}


def _applied(tagger: Tagger, probs: np.ndarray, sel: Selection) -> dict[str, float]:
    """The head thresholds behind an answer: given, MCut's, or the model's (per-tag ones are in model_thresholds)."""
    from ..infer.tagger import MIN_CHARACTER_MCUT, mcut_threshold

    out = {}
    for head, ix in tagger.labels.heads.items():
        if head == "rating":
            continue
        value = sel.override(head)
        if sel.mcut_general and head == "general":
            value = mcut_threshold(probs[list(ix)])
        elif sel.mcut_character and head == "character":
            value = max(MIN_CHARACTER_MCUT, mcut_threshold(probs[list(ix)]))
        out[head] = round(float(value if value is not None else tagger.thresholds.heads.get(head, 0.5)), 6)
    return out


def _model_name(tagger: Tagger) -> str:
    root = Path(tagger.source)
    try:
        arch = json.loads((root / "config.json").read_text()).get("model", {}).get("name")
    except (OSError, ValueError, AttributeError):
        arch = None
    return f"{root.name} ({arch})" if isinstance(arch, str) and arch else root.name


def _version() -> str:
    from .. import __version__

    return __version__


# ---- index helpers


def _indexed_path(index: VectorIndex | None, id: str) -> Path:
    # Only ids the index holds map to files; anything else, path-like or not, is unknown.
    row = index.rows_by_id().get(id) if index is not None else None
    if row is None:
        raise HTTPException(404, "no image with that id in the index")
    path = Path(index.paths[row])
    if not path.is_file():
        raise HTTPException(404, "the indexed image is no longer on disk")
    return path


def _neighbours(index: VectorIndex, query: np.ndarray, k: int, tags: str | None, row: int | None) -> list[dict]:
    from ..search.similar import search_hits, tag_mask

    allow = tag_mask(index, tags)
    # With the query's own row given, search_hits puts it first: "more like this" leaves it out.
    hits = search_hits(index, query, k + (row is not None), allow, row)
    hits = [h for h in hits if h.row != row][:k]
    return [
        {
            "id": h.id,
            "score": round(h.score, 6) if math.isfinite(h.score) else None,
            "name": Path(h.path).name if h.path else None,
            "image": f"/api/image/{quote(h.id, safe='')}",  # ids may hold slashes (`i2v embed --ids path`)
            "thumb": f"/api/thumb/{quote(h.id, safe='')}",
        }
        for h in hits
    ]


def _thumbnail(path: Path) -> bytes:
    try:
        image = load_rgb(path.read_bytes(), shrink_to=THUMB_SIZE)
    except (BadImage, OSError) as e:
        raise HTTPException(404, f"the indexed image cannot be read ({e})") from None
    image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def serve(cfg: ServeConfig, console: Console | None = None) -> None:
    """Load the model (and index) and serve the app with uvicorn until interrupted."""
    import uvicorn

    console = console or Console(stderr=True)
    app = create_app(cfg)
    index = app.state.index
    where = f"http://{cfg.host}:{cfg.port}"
    extra = f", index of {len(index)} images" if index is not None else ""
    name = _model_name(app.state.tagger)
    console.print(f"serving {name}{extra} at {where} (API docs at {where}/docs)", highlight=False)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]listening on {cfg.host}: reachable from other machines, with no authentication[/]")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
