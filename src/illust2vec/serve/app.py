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

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from rich.console import Console
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import UserError
from ..infer.autobatch import measure
from ..infer.tagger import BACKENDS, PRECISIONS, Tagger
from .batcher import Batcher
from .routes import add_routes
from .state import ServeState, model_name, open_index

if TYPE_CHECKING:
    from ..search import VectorIndex

log = logging.getLogger(__name__)

MB = 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small fields around the file


@dataclass(frozen=True)
class ServeConfig:
    """What `i2v serve` serves and how."""

    model: str
    index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 32.0
    max_batch: int | str = "auto"  # a number (1: no batching), or auto: timed at start-up (infer.autobatch.measure)
    max_wait_ms: float = 5.0
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"  # auto (int8 on a CPU where model.int8.onnx exists), fp32 or int8
    k: int = 12  # neighbours the page asks for

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        if self.index is not None:
            object.__setattr__(self, "index", str(self.index))
            if not Path(self.index).exists():
                raise UserError(f"{self.index}: no such index (build one with i2v index build)")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, not {self.port!r}")
        if not self.max_upload_mb > 0:
            raise UserError(f"--max-upload-mb must be above 0, not {self.max_upload_mb!r}")
        if isinstance(self.max_batch, str) and self.max_batch.isdigit():
            object.__setattr__(self, "max_batch", int(self.max_batch))
        if self.max_batch != "auto" and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise UserError(f"--max-batch must be auto or at least 1, not {self.max_batch!r}")
        if not self.max_wait_ms >= 0:
            raise UserError(f"--max-wait-ms must be at least 0, not {self.max_wait_ms!r}")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= 200:
            raise UserError(f"ServeConfig.k must be between 1 and 200, not {self.k!r}")


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


# ---- the app


def load_state(cfg: ServeConfig, tagger: Tagger | None = None, index: VectorIndex | None = None) -> ServeState:
    """The model (and index) to serve, opened from `cfg` unless given, behind a batcher set up as `cfg` says."""
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision)
    if index is None and cfg.index:
        index = open_index(cfg.index, tagger)
    # auto: on a CPU, the batch size that ran fastest per image on blank images at start-up (at 448 px that is one
    # a pass: batching served 0.72x the requests, issue 18); on a GPU, infer.autobatch.GPU_BATCH.
    max_batch = measure(tagger, cfg.max_batch)
    log.info("max batch %d%s", max_batch, " (auto)" if cfg.max_batch == "auto" else "")
    batcher = Batcher(tagger.run, max_batch=max_batch, max_wait_ms=cfg.max_wait_ms)
    return ServeState(tagger, batcher, index, model_name(tagger))


def create_app(cfg: ServeConfig, tagger: Tagger | None = None, index: VectorIndex | None = None) -> FastAPI:
    """The ASGI app. `tagger` and `index` may be given already loaded (tests, benchmarks); otherwise they are opened
    from `cfg.model` and `cfg.index`."""
    state = load_state(cfg, tagger, index)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        yield
        await state.batcher.stop()

    app = FastAPI(
        title="illust2vec",
        summary="Tags and similar images for anime-style illustrations",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.serve = state
    app.add_middleware(UploadLimit, limit=int(cfg.max_upload_mb * MB) + FORM_OVERHEAD)
    _add_error_handlers(app)
    add_routes(app, state, cfg)
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


def _version() -> str:
    from .. import __version__

    return __version__


def serve(cfg: ServeConfig, console: Console | None = None) -> None:
    """Load the model (and index) and serve the app with uvicorn until interrupted."""
    import uvicorn

    console = console or Console(stderr=True)
    app = create_app(cfg)
    index = app.state.serve.index
    where = f"http://{cfg.host}:{cfg.port}"
    extra = f", index of {len(index)} images" if index is not None else ""
    name = app.state.serve.name
    console.print(f"serving {name}{extra} at {where} (API docs at {where}/docs)", highlight=False)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]listening on {cfg.host}: reachable from other machines, with no authentication[/]")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
