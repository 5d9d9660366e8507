"""`clipdex serve`: the HTTP search and detection API, and the page people look at.

One process, one model, one store opened read-only. Requests are parsed on the event loop; all
work (decoding, the model, FAISS, LMDB) runs on one worker thread (see search/service.py) behind
a bounded queue: a full queue answers 503, a slow request 504, bad input a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.decode import ALLOWED_FORMATS, DecodeLimits
from indexer.errors import ClassifierError, ClipdexError, DecodeError, QueryError

from .dedup import DEFAULT_THRESHOLD
from .limits import BodyLimitMiddleware, TokenAuthMiddleware
from .service import Answer, Detection, NoDetectorError, SearchService, UnknownIdError

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
PUBLIC_PATHS = frozenset({"/", "/v1/health"})
_DECODE_STATUS = {"too_large": 413, "unidentified": 415, "format_not_allowed": 415}


@dataclass(frozen=True)
class ServeSettings:
    """How `clipdex serve` runs; validated so that a bad combination never starts."""

    store: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 20 << 20
    max_pending: int = 16  # queued + running work requests before 503
    max_pending_thumbnails: int = 128  # a page asks for k thumbnails at once
    timeout_s: float = 30.0
    max_k: int = 200
    near_duplicate: float = DEFAULT_THRESHOLD  # hits at or above are flagged as near-duplicates
    reload_interval_s: float = 1.0
    formats: tuple[str, ...] = ALLOWED_FORMATS
    weights: str | None = None
    model_config: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_pending", "max_pending_thumbnails", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.reload_interval_s < 0:
            raise ValueError("timeout_s must be > 0 and reload_interval_s >= 0")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(f"binding to {self.host} exposes the service to other machines; "
                             "give a bearer token with --token-file (or bind to 127.0.0.1)")

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_body_bytes, formats=self.formats)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def read_token_file(path: str) -> str:
    """The bearer token: the file's first line, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ClipdexError(f"cannot read token file {path}: {err}") from err
    if len(token) < 16:
        raise ClipdexError(f"token in {path} is shorter than 16 characters")
    return token


class ApiError(Exception):
    """An answer other than 200, with a stable error code and a human message."""

    def __init__(self, status: int, code: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status, headers=headers)


class Gate:
    """A count of requests admitted to the worker; beyond `limit` the caller gets a 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.pending >= self.limit:
                raise ApiError(503, "busy", f"server busy ({self.pending} requests queued); "
                               "retry shortly", {"Retry-After": "1"})
            self.pending += 1

    def leave(self, _: object = None) -> None:
        with self._lock:
            self.pending -= 1


class Worker:
    """The one thread that does all work, with a queue bound and a per-request timeout."""

    def __init__(self, service: SearchService, timeout_s: float) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="clipdex-serve")

    async def run(self, gate: Gate, fn: Callable[..., Any], *args: Any) -> Any:
        gate.enter()
        try:
            fut: Future[Any] = self.executor.submit(self.service.call, fn, *args)
        except RuntimeError:
            gate.leave()
            raise ApiError(503, "shutting_down", "the server is shutting down") from None
        fut.add_done_callback(gate.leave)  # the slot frees when the work ends, not the wait
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.timeout_s:g} s") from None
        except ClipdexError as err:
            raise api_error(err) from err


def api_error(err: ClipdexError) -> ApiError:
    if isinstance(err, DecodeError):
        return ApiError(_DECODE_STATUS.get(err.reason, 422), err.reason,
                        f"image refused ({err.reason}): {err.message}")
    if isinstance(err, UnknownIdError):
        return ApiError(404, "unknown_id", str(err))
    if isinstance(err, NoDetectorError):
        return ApiError(409, "no_detector", str(err))
    if isinstance(err, ClassifierError):
        return ApiError(409, "detector_unusable", f"the trained detector cannot be used: {err}")
    if isinstance(err, QueryError):
        return ApiError(400, "bad_query", str(err))
    log.error("request failed: %s", err)
    return ApiError(500, "internal", f"{type(err).__name__}: {err}")


# ---- the page ----------------------------------------------------------------------------------
def load_page() -> tuple[str, str]:
    """The page's HTML and a Content-Security-Policy allowing exactly its inline script."""
    html = resources.files("search").joinpath("static/index.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest())
                      .decode() + "'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
           "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; "
           "base-uri 'none'; form-action 'none'")
    return html, csp


# ---- JSON shapes -------------------------------------------------------------------------------
def thumbnail_url(image_id: str) -> str:
    return f"{API_PREFIX}/images/{image_id}/thumbnail"


def answer_json(ans: Answer, near: float) -> dict[str, Any]:
    return {"kind": ans.kind, "generation": ans.generation, "near_duplicate_threshold": near,
            "hits": [{"rank": h.rank, "score": round(h.score, 6), "id": h.sha256,
                      "paths": list(h.paths), "near_duplicate": h.score >= near,
                      "thumbnail": thumbnail_url(h.sha256)} for h in ans.hits]}


def detection_json(det: Detection) -> dict[str, Any]:
    from .detect import verdict_to_dict

    out = verdict_to_dict(det.verdict)
    for n, image_id in zip(out["neighbours"], det.neighbour_ids, strict=True):
        n["id"], n["thumbnail"] = image_id, thumbnail_url(image_id) if image_id else None
    return out


# ---- the app -----------------------------------------------------------------------------------
def open_service(settings: ServeSettings) -> SearchService:
    """The read-only store and the store's own model, loaded once."""
    from indexer.store import Store

    from .app import store_embedder

    store = Store.open(settings.store, readonly=True)
    try:
        embedder = store_embedder(store, settings.weights, settings.model_config,
                                  settings.device)
        return SearchService(store, embedder, settings.limits, settings.reload_interval_s)
    except BaseException:
        store.close()
        raise


def create_app(settings: ServeSettings, service: SearchService | None = None) -> FastAPI:
    service = service or open_service(settings)
    worker = Worker(service, settings.timeout_s)
    work, thumbs = Gate(settings.max_pending), Gate(settings.max_pending_thumbnails)
    page, csp = load_page()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.executor.shutdown(wait=True, cancel_futures=True)
        service.store.close()

    app = FastAPI(title="clipdex", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=f"{API_PREFIX}/openapi.json")
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenAuthMiddleware, token=settings.token, public=PUBLIC_PATHS)

    def k_and_threshold(k: int, threshold: float | None) -> tuple[int, float | None]:
        if not 1 <= k <= settings.max_k:
            raise ApiError(422, "bad_request", f"k must be in 1..{settings.max_k}, got {k}")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise ApiError(422, "bad_request", "threshold is a cosine similarity in [-1, 1]")
        return k, threshold

    async def upload_bytes(image: UploadFile) -> bytes:
        return await image.read()  # spooled by Starlette; its filename is never used

    @app.get("/", include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                           "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API_PREFIX}/stats")
    async def stats() -> dict[str, Any]:
        result: dict[str, Any] = await worker.run(work, service.stats)
        return result

    @app.post(f"{API_PREFIX}/search")
    async def search_image(image: Annotated[UploadFile, File()], k: int = 20,
                           threshold: float | None = None) -> dict[str, Any]:
        args = k_and_threshold(k, threshold)
        ans = await worker.run(work, service.search_upload, await upload_bytes(image), *args)
        return answer_json(ans, settings.near_duplicate)

    @app.get(f"{API_PREFIX}/search/text")
    async def search_text(q: str, k: int = 20, threshold: float | None = None
                          ) -> dict[str, Any]:
        if len(q) > 1000:
            raise ApiError(422, "bad_request", "text query longer than 1000 characters")
        ans = await worker.run(work, service.search_text, q, *k_and_threshold(k, threshold))
        return answer_json(ans, settings.near_duplicate)

    @app.get(f"{API_PREFIX}/images/{{image_id}}/similar")
    async def search_id(image_id: str, k: int = 20, threshold: float | None = None
                        ) -> dict[str, Any]:
        args = k_and_threshold(k, threshold)
        ans = await worker.run(work, service.search_id, image_id, *args)
        return answer_json(ans, settings.near_duplicate)

    @app.get(f"{API_PREFIX}/images/{{image_id}}/thumbnail")
    async def thumbnail(image_id: str) -> Response:
        data = await worker.run(thumbs, service.thumbnail, image_id)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})

    @app.post(f"{API_PREFIX}/detect")
    async def detect(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
        det = await worker.run(work, service.detect_upload, await upload_bytes(image))
        return detection_json(det)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = ["/".join(str(x) for x in e.get("loc", ())[1:]) + ": " + str(e.get("msg"))
                 for e in err.errors()]
        return error_response(422, "bad_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        return error_response(err.status_code, code, str(err.detail), err.headers)


def serve(settings: ServeSettings) -> None:
    """Load the model, open the store, and serve until interrupted."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5, server_header=False,
                limit_concurrency=settings.max_pending + settings.max_pending_thumbnails + 64)
