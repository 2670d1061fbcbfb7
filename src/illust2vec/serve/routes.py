"""The routes of `i2v serve`: the page, health, tagging, similar images, and indexed images with their thumbnails."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..infer.thresholds import Selection
from .state import ServeState, neighbours

if TYPE_CHECKING:
    from .app import ServeConfig

STATIC = Path(__file__).parent / "static"

QueryThreshold = Annotated[float | None, Query(ge=0.0, le=1.0, description="Threshold for this head (0..1).")]
HIDDEN: dict[str, Any] = {"include_in_schema": False}  # the form twins of query parameters: one entry in the docs


def add_routes(app: FastAPI, state: ServeState, cfg: ServeConfig) -> None:
    """Every route and the page's static files, on `app`."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    async def health() -> dict:
        """The model, its tags, the backend, whether an index is loaded, and what the batcher has done."""
        tagger, index = state.tagger, state.index
        return {
            "status": "ok",
            "model": state.name,
            "kind": tagger.kind,
            "tags": len(tagger.labels),
            "heads": {h: len(ix) for h, ix in tagger.labels.heads.items()},
            "image_size": tagger.image_size,
            "backend": getattr(tagger.backend, "name", type(tagger.backend).__name__),
            "precision": getattr(tagger.backend, "precision", "fp32"),
            "index": index is not None,
            "index_size": len(index) if index is not None else 0,
            "thresholds": tagger.thresholds.heads,
            "max_upload_mb": cfg.max_upload_mb,
            "batching": {
                "max_batch": state.batcher.max_batch,
                "max_wait_ms": cfg.max_wait_ms,
                **state.batcher.stats.to_json(),
            },
        }

    _add_tagging(app, state)
    _add_similar(app, state, cfg.k)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_tagging(app: FastAPI, state: ServeState) -> None:
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
        every tag's score (`scores`), the thresholds used (`thresholds`), MCut's for general and character tags
        (`mcut_thresholds`, the character one floored as the WD Space does) and the model's own
        (`model_thresholds`).

        Thresholds (general, character, mcut) may be given in the query or as form fields; the model's calibrated
        ones apply otherwise.
        """
        probs, _, decoded = await state.forward(await file.read())
        use_mcut = mcut or bool(mcut_form)
        sel = Selection(
            general=general if general is not None else general_form,
            character=character if character is not None else character_form,
            mcut_general=use_mcut,
            mcut_character=use_mcut,
        )
        return state.tag_answer(file.filename or "upload", probs, decoded, sel)


def _add_similar(app: FastAPI, state: ServeState, default_k: int) -> None:
    @app.post("/api/similar")
    async def similar(
        file: Annotated[UploadFile | None, File(description="The image to find neighbours of.")] = None,
        id: Annotated[str | None, Form(description="Or: the id of an image in the index.")] = None,
        k: Annotated[int, Query(ge=1, le=200, description="How many neighbours.")] = default_k,
        tags: Annotated[
            str | None, Query(description='Only images with these predicted tags: "blue_hair -hat".')
        ] = None,
    ) -> dict:
        """The `k` nearest images in the index (cosine similarity of feature vectors; Hamming for a binary index),
        best first, with their scores and the URLs of their image and thumbnail, which are served by id.

        Send an image as `file`, or `id` for "more like this" on an indexed image (the image itself is left out).
        """
        index = state.index
        if index is None:
            raise HTTPException(404, "no index loaded: start the server with --index")
        if (file is None) == (id is None):
            raise HTTPException(422, "send either an image (file) or the id of an indexed image (id)")
        if file is not None:
            _, feats, _ = await state.forward(await file.read())
            if feats is None:
                raise HTTPException(422, f"{state.name} gives no feature vector (a WD ONNX file gives tags only)")
            query, row = feats, None
        else:
            row = index.rows_by_id().get(id)
            if row is None:
                raise HTTPException(404, "no image with that id in the index")
            query = index.vector(id)
        hits = await run_in_threadpool(neighbours, index, query, k, tags, row)
        return {"neighbours": hits}

    @app.get("/api/image/{id:path}")
    async def image(id: str) -> FileResponse:
        """An indexed image's file, by its id in the index."""
        return FileResponse(state.indexed_path(id))

    @app.get("/api/thumb/{id:path}")
    async def thumb(id: str) -> Response:
        """An indexed image's thumbnail, a JPEG at most 256 px on its longer side."""
        data = await state.thumbnail(id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
