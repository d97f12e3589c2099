"""The FastAPI app of ``gce serve``: the JSON API, the thumbnails and the page at ``/``.

Every error a client can cause is answered as ``{"error": "<one line>"}`` with a 4xx status; an
unexpected failure is a 500 with the same shape and never stops the process.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gce import __version__
from gce.serve.errors import RequestError
from gce.serve.guards import BodyGuard, HeadAsGet
from gce.serve.service import SearchService
from gce.serve.uploads import check_content_type

log = logging.getLogger("gce.serve")

#: Room for the multipart boundaries and the small form fields around the image.
FORM_OVERHEAD_BYTES = 64 * 1024

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

STATIC_DIR = resources.files("gce.serve") / "static"


# -- response models (they make the OpenAPI docs at /docs precise) ---------------------------------


class ErrorResponse(BaseModel):
    error: str


class Hit(BaseModel):
    rank: int
    id: int
    score: float
    label: str | None
    thumbnail: str


class Query(BaseModel):
    type: Literal["upload", "item"]
    id: int | None = None
    thumbnail: str | None = None


class SearchResponse(BaseModel):
    query: Query
    k: int
    learners: list[int]
    weights: list[float] | None
    filter: str | None = None
    results: list[Hit]
    took_ms: float


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    default_k: int


class InfoResponse(BaseModel):
    version: str
    model_id: str | None
    num_learners: int
    embedding_dim: int
    learner_slices: list[list[int]]
    index_type: str
    index_size: int
    index_deleted: int = 0
    image_size: int | None
    uploads: bool
    limits: Limits


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "undecodable image, malformed request or bad filter"),
        (404, "unknown item id"),
        (408, "request body not received within the upload timeout"),
        (413, "upload or image over the limits"),
        (415, "not a form or not an image"),
        (422, "bad k, learners or weights"),
        (503, "too many uploads or connections at once: try again shortly"),
    )
}


# -- the app ---------------------------------------------------------------------------------------


def create_app(service: SearchService) -> FastAPI:
    settings = service.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.close()  # queued searches finish before the worker threads stop

    app = FastAPI(
        lifespan=lifespan,
        title="gce search",
        version=__version__,
        description="Image search with a GCE embedding model: upload an image (or name an indexed item) "
        "and get its nearest neighbours, optionally with a subset of the ensemble's learners.",
    )
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        max_open=settings.max_uploads,
        timeout_s=settings.upload_timeout_s,
        describe=f" (an upload of at most {settings.max_upload_bytes} bytes and its form)",
    )
    app.add_middleware(HeadAsGet)  # outermost: every layer below sees a GET
    _add_error_handlers(app)

    @app.get("/health", summary="liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", response_model=InfoResponse, summary="model, learners, index and limits")
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/search", response_model=SearchResponse, responses=ERRORS, summary="nearest neighbours")
    def search(
        request: Request,
        image: UploadFile | None = File(None, description="query image (PNG, JPEG, WebP, GIF, BMP or TIFF)"),
        id: int | None = Form(None, description="or: the id of an indexed item (it is left out of its results)"),
        k: int | None = Form(None, description="number of neighbours (default and maximum in /info)"),
        learners: str | None = Form(None, description="learner subset, e.g. '0,2' (default: all)"),
        weights: str | None = Form(None, description="one weight per learner, e.g. '1,0.5,1,1'"),
        filter: list[str] | None = Form(
            None,
            description="only items that pass: 'label=NAME', 'label in A,B,C' or 'path startswith PREFIX';"
            " repeat the field to combine conditions (AND); also read from the URL query",
        ),
    ) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in FORM_TYPES:
            raise RequestError(
                415,
                f"send the query as multipart/form-data (field 'image' or 'id'), "
                f"not {kind or 'a body without content type'}",
            )
        subset = service.parse_learners(learners)
        weight_list = service.parse_weights(weights)
        item_filter = service.parse_filter([*(filter or []), *request.query_params.getlist("filter")])
        if (image is None) == (id is None):
            raise RequestError(400, "give exactly one of the form fields 'image' (a file) or 'id' (an item id)")
        if id is not None:
            return json_response(service.search_item(id, k, subset, weight_list, item_filter))
        assert image is not None  # exactly one of the two was given
        check_content_type(image.content_type)
        limit = settings.max_upload_bytes
        data = image.file.read(limit + 1)  # in memory already: bounded by BodyGuard
        if len(data) > limit:  # the part's real size, counted by the form parser, if it says one
            size = f" of {image.size} bytes" if image.size is not None and image.size > limit else ""
            raise RequestError(413, f"upload{size} is over the limit of {limit} bytes")
        return json_response(service.search_upload(data, k, subset, weight_list, item_filter))

    @app.get(
        "/items/{item_id}/thumbnail",
        response_class=Response,
        summary="thumbnail of an indexed item",
        responses={200: {"content": {"image/png": {}}}, 404: ERRORS[404]},
    )
    def thumbnail(item_id: int) -> Response:
        return Response(
            service.thumbnail(item_id), media_type="image/png", headers={"Cache-Control": "public, max-age=3600"}
        )

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app


def json_response(result: dict[str, Any]) -> Response:
    """The service's answer encoded once, as it is (it is built to the SearchResponse shape, which
    the docs still show): FastAPI's validation and re-encoding of the model cost more than the scan
    of a small index."""
    body = json.dumps(result, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        text = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and text == "Not Found":
            text = f"not found: {request.url.path}"
        elif exc.status_code == 405:
            listed = str(headers.get("Allow") or headers.get("allow") or "")
            allowed = [m.strip() for m in listed.split(",") if m.strip()]
            if "GET" in allowed and "HEAD" not in allowed:  # HeadAsGet answers HEAD wherever GET is
                allowed.append("HEAD")
            headers = {"Allow": ", ".join(allowed)}
            text = f"method {request.method} is not allowed on {request.url.path} (allowed: {', '.join(allowed)})"
        return JSONResponse({"error": " ".join(text.split())}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of problems as one line: ``k: Input should be a valid integer (got 'abc')``."""
    parts = []
    for problem in exc.errors():
        where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path"))
        text = problem.get("msg", "invalid value")
        if "input" in problem and isinstance(problem["input"], (str, int, float)):
            text += f" (got {str(problem['input'])[:60]!r})"
        parts.append(f"{where}: {text}" if where else text)
    return " ".join("; ".join(parts).split()) or "invalid request"
