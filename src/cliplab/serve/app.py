"""The FastAPI application: embedding, zero-shot classification, search and the web page.

Endpoints (all JSON; images are ``multipart/form-data`` uploads in the ``image`` field):

========================  =====================================================
``GET  /``                the web page (static HTML + JS, no external resource)
``GET  /health``          liveness: the process answers
``GET  /ready``           readiness: the model workers run and the queues have room
``GET  /v1/info``         model, index size, whether a key is needed, the limits
``POST /v1/embed/text``   ``{"texts": [...]}`` -> L2-normalised embeddings
``POST /v1/embed/image``  an image -> its embedding
``POST /v1/classify``     an image + comma-separated ``labels`` -> zero-shot top-k
``POST /v1/search/text``  ``{"text": ..., "k": 10}`` -> hits (needs an index)
``POST /v1/search/image`` an image + ``k`` -> hits (needs an index)
``GET  /v1/files/{id}``   the image file of a hit a search returned (needs an index)
``GET  /v1/stats``        micro-batching counters (calls per batch size)
``GET  /openapi.json``    the OpenAPI schema
========================  =====================================================

With an API key, every ``/v1`` endpoint but ``/v1/info`` needs it in the ``X-API-Key``
header (or ``Authorization: Bearer KEY``); a missing or wrong key gets 401.
"""

# No ``from __future__ import annotations``: FastAPI and pydantic read the annotations of the
# routes and models defined inside create_app, which name its local variables.

import contextlib
import hmac
import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.sources import IMAGE_EXTENSIONS
from ..errors import BadImage, CliplabError, DataError, UsageError
from ..validation import check_positive_int
from .batching import MicroBatcher, Overloaded

logger = logging.getLogger("cliplab.serve")

__all__ = ["ServeSettings", "create_app", "API_KEY_HEADER"]

API_KEY_HEADER = "X-API-Key"
STATIC = Path(__file__).with_name("static")
_SERVED_IDS = 100_000  # hits remembered for /v1/files


@dataclass(frozen=True)
class ServeSettings:
    """Limits, batching and the key of a service (most have a ``cliplab serve`` option).

    Attributes
    ----------
    api_key : str or None
        Key the ``/v1`` endpoints require; ``None`` serves without authentication (the
        command allows that only on a loopback address, see :func:`cliplab.serve.check_auth`).
    max_batch : int, default 32
        Most requests per model call (1: no micro-batching).
    max_wait_ms : float, default 5.0
        Longest wait of a request for others to share its model call.
    max_queue : int, default 1024
        Requests waiting per batcher before the service answers 503.
    max_body_bytes : int, default 10 MiB
        Largest request body; a larger one gets 413.
    max_pixels : int or None, default DEFAULT_MAX_PIXELS
        Largest uploaded image (width x height), as :func:`cliplab.data.images.load_image`.
    max_labels, max_texts, max_text_chars, max_k : int
        Most labels per classification (100), texts per embedding request (64),
        characters per text (1000) and hits per search (100).
    timeout_s : float, default 30.0
        Longest wait for the model; then 503.
    templates : str, default "default"
        Prompt templates of zero-shot classification (:func:`cliplab.zeroshot.get_templates`).
    """

    api_key: Optional[str] = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_body_bytes: int = 10 * 2**20
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    max_labels: int = 100
    max_texts: int = 64
    max_text_chars: int = 1000
    max_k: int = 100
    timeout_s: float = 30.0
    templates: str = "default"

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_labels", "max_texts", "max_text_chars",
                     "max_k"):
            check_positive_int(name, getattr(self, name))
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key is empty; give a non-empty key or serve without one (--no-auth)")
        if not self.timeout_s > 0:
            raise UsageError(f"timeout_s must be > 0, got {self.timeout_s}")


class _Service:
    """The model, the batchers and the index behind the endpoints."""

    def __init__(self, backbone, index, settings: ServeSettings):
        self.backbone = backbone
        self.index = index
        self.settings = settings
        self.executor: ThreadPoolExecutor | None = None
        self.text = self.image = None
        self.ready = False
        self._classifiers: OrderedDict = OrderedDict()
        self._served: OrderedDict = OrderedDict()
        self._served_lock = threading.Lock()

    async def start(self) -> None:
        s = self.settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cliplab-model")
        kw = dict(max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue)
        self.text = MicroBatcher(self._embed_texts, self.executor, name="text", **kw)
        self.image = MicroBatcher(self._embed_images, self.executor, name="image", **kw)
        self.text.start()
        self.image.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for b in (self.text, self.image):
            if b is not None:
                await b.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    # ---------------------------------------------------------------- model thread
    def _embed_texts(self, requests: list[list[str]]) -> list[np.ndarray]:
        flat = [t for texts in requests for t in texts]
        feats = self.backbone.encode_texts(flat, batch_size=max(1, len(flat)), progress=False)   # (sum n, D)
        bounds = np.cumsum([0] + [len(t) for t in requests])
        return [feats[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _embed_images(self, tensors: list) -> list[np.ndarray]:
        feats = self.backbone.encode_images(tensors, batch_size=len(tensors), workers=0,
                                            progress=False).features                         # (B, D)
        return list(feats)

    def _make_classifier(self, labels: tuple[str, ...]):
        from ..zeroshot import ZeroShotClassifier

        return ZeroShotClassifier(self.backbone, list(labels), templates=self.settings.templates, progress=False)

    # ---------------------------------------------------------------- request side
    def decode(self, data: bytes, name: str):
        """Encoded image bytes -> the model's input tensor (3, H, W); runs in a request thread."""
        img = load_image(data, max_pixels=self.settings.max_pixels)
        return self.backbone.preprocess(img)

    async def classifier(self, labels: tuple[str, ...]):
        """The zero-shot classifier of ``labels``, built in the model thread (the last 32 kept)."""
        import asyncio

        clf = self._classifiers.get(labels)
        if clf is None:
            loop = asyncio.get_running_loop()
            try:
                clf = await asyncio.wait_for(loop.run_in_executor(self.executor, self._make_classifier, labels),
                                             self.settings.timeout_s)
            except asyncio.TimeoutError:  # not yet the built-in TimeoutError on Python 3.10
                raise TimeoutError(f"no classifier within {self.settings.timeout_s} s") from None
            self._classifiers[labels] = clf
            while len(self._classifiers) > 32:
                self._classifiers.popitem(last=False)
        else:
            self._classifiers.move_to_end(labels)
        return clf

    def remember(self, hits) -> None:
        with self._served_lock:
            for h in hits:
                self._served[int(h.id)] = str(h.path)
                self._served.move_to_end(int(h.id))
            while len(self._served) > _SERVED_IDS:
                self._served.popitem(last=False)

    def served_path(self, id_: int) -> str | None:
        with self._served_lock:
            return self._served.get(id_)


def _load_index(index, backbone):
    """``index`` (a SearchIndex, a path or None), checked against ``backbone``."""
    if index is None:
        return None
    if isinstance(index, (str, os.PathLike)):
        from ..index import SearchIndex

        index = SearchIndex.load(index)
    index.check_model(backbone)  # UsageError: built with another model
    return index


def create_app(backbone, *, index=None, settings: ServeSettings | None = None):
    """The FastAPI application serving ``backbone`` (and ``index``).

    Parameters
    ----------
    backbone : Backbone
        The model; called from one worker thread only.
    index : SearchIndex, path or None
        An index built with the same model (checked at once), for the search endpoints.
    settings : ServeSettings, optional
        Limits, batching and the API key (default: :class:`ServeSettings`, no key).

    Returns
    -------
    fastapi.FastAPI
        ``app.state.service`` holds the batchers (``.text``, ``.image``) and their stats.

    Raises
    ------
    UsageError
        ``index`` was built with another model, or a setting is out of range.
    """
    import anyio
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field

    from ..zeroshot import get_templates

    settings = settings or ServeSettings()
    get_templates(settings.templates)  # a bad template spec fails here, not at the first request
    service = _Service(backbone, _load_index(index, backbone), settings)
    s = settings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        logger.info("serving %s%s", backbone.name,
                    f" with an index of {len(service.index)} items" if service.index is not None else "")
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="cliplab", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Embed, classify and search images with a CLIP model.")
    app.state.service = service
    app.add_middleware(_BodyLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(_SecurityHeaders)

    # ------------------------------------------------------------------ auth
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the service's API key")
    bearer = HTTPBearer(auto_error=False, description="the service's API key as a bearer token")

    def require_key(key: Annotated[Optional[str], Depends(key_header)] = None,
                    cred: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)] = None) -> None:
        given = key if key is not None else (cred.credentials if cred is not None else None)
        if given is None or not hmac.compare_digest(given.encode(), s.api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)] if s.api_key is not None else []

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx") or {}
            return JSONResponse({"detail": f"the request body is not valid JSON ({ctx.get('error', 'parse error')})"},
                                status_code=400)
        msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                         for e in errors[:5])
        return JSONResponse({"detail": msgs}, status_code=422)

    def _error(exc: Exception) -> HTTPException:
        if isinstance(exc, BadImage):
            return HTTPException(400, f"cannot read the image: {exc.reason}")
        if isinstance(exc, (UsageError, DataError)):
            return HTTPException(422, str(exc))
        if isinstance(exc, Overloaded):
            return HTTPException(503, str(exc), headers={"Retry-After": "1"})
        if isinstance(exc, TimeoutError):
            return HTTPException(503, f"the model did not answer within {s.timeout_s:g} s; retry later",
                                 headers={"Retry-After": "1"})
        raise exc

    async def _model(batcher, item):
        try:
            return await batcher.submit(item, timeout=s.timeout_s)
        except (Overloaded, TimeoutError, CliplabError) as exc:
            raise _error(exc) from None

    async def _image(upload) -> np.ndarray:
        data = await upload.read()
        try:
            tensor = await anyio.to_thread.run_sync(service.decode, data, upload.filename or "upload")
        except CliplabError as exc:
            raise _error(exc) from None
        return await _model(service.image, tensor)

    def _need_index():
        if service.index is None:
            raise HTTPException(404, "this service has no index: start it with --index IDX to search")
        return service.index

    # ------------------------------------------------------------------ schemas
    class TextsIn(BaseModel):
        texts: list[Annotated[str, Field(min_length=1, max_length=s.max_text_chars)]] = Field(
            min_length=1, max_length=s.max_texts, description="texts to embed")

    class Embeddings(BaseModel):
        model: str
        dim: int
        embeddings: list[list[float]]

    class Embedding(BaseModel):
        model: str
        dim: int
        embedding: list[float]

    class Label(BaseModel):
        label: str
        prob: float

    class Labels(BaseModel):
        model: str
        labels: list[Label]

    class SearchIn(BaseModel):
        text: str = Field(min_length=1, max_length=s.max_text_chars, description="the query")
        k: int = Field(10, ge=1, le=s.max_k, description="number of hits")

    class HitOut(BaseModel):
        id: int
        score: float
        path: str
        url: str
        metadata: dict

    class Hits(BaseModel):
        model: str
        hits: list[HitOut]

    class Health(BaseModel):
        status: str

    class Ready(BaseModel):
        ready: bool
        queued: int

    def _hits(hits) -> Hits:
        service.remember(hits)
        return Hits(model=backbone.name, hits=[
            HitOut(id=int(h.id), score=float(h.score), path=str(h.path), url=f"/v1/files/{int(h.id)}",
                   metadata=_jsonable(h.metadata)) for h in hits])

    async def _search(query: np.ndarray, k: int) -> Hits:
        idx = _need_index()
        hits = await anyio.to_thread.run_sync(lambda: idx.search(query[None].astype(np.float32), k=k)[0])
        return _hits(hits)

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", response_model=Health, tags=["service"])
    async def health():
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/ready", response_model=Ready, tags=["service"], responses={503: {"description": "not ready"}})
    async def ready():
        """Readiness: the model workers run and their queues have room."""
        queued = sum(b.queued for b in (service.text, service.image) if b is not None)
        ok = service.ready and queued < s.max_queue
        body = Ready(ready=ok, queued=queued)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/v1/info", tags=["service"])
    async def info() -> dict:
        """The model, the index, whether a key is needed, and the limits."""
        idx = service.index
        return {"model": backbone.name, "fingerprint": backbone.fingerprint, "dim": int(backbone.embed_dim),
                "index": None if idx is None else {"size": len(idx), "model": idx.model},
                "auth": s.api_key is not None, "templates": s.templates,
                "limits": {k: v for k, v in asdict(s).items() if k not in ("api_key", "templates")}}

    @app.get("/v1/stats", tags=["service"], dependencies=auth)
    async def stats() -> dict:
        """Micro-batching counters: model calls per batch size, per batcher."""
        return {"text": service.text.stats(), "image": service.image.stats()}

    @app.post("/v1/embed/text", response_model=Embeddings, tags=["embed"], dependencies=auth)
    async def embed_text(body: TextsIn):
        """Embed texts: L2-normalised float32 features, one row per text."""
        feats = await _model(service.text, list(body.texts))
        # returned as is: the model's rows need no validation, and skipping it is cheaper per request
        return JSONResponse({"model": backbone.name, "dim": int(feats.shape[1]), "embeddings": feats.tolist()})

    @app.post("/v1/embed/image", response_model=Embedding, tags=["embed"], dependencies=auth)
    async def embed_image(image: UploadFile = File(..., description="an image file")):
        """Embed an uploaded image: its L2-normalised float32 feature."""
        f = await _image(image)
        return JSONResponse({"model": backbone.name, "dim": int(f.shape[0]), "embedding": f.tolist()})

    @app.post("/v1/classify", response_model=Labels, tags=["classify"], dependencies=auth)
    async def classify(image: UploadFile = File(..., description="an image file"),
                       labels: str = Form(..., description='comma-separated class names, e.g. "cat, dog"'),
                       k: int = Form(5, ge=1, le=s.max_k, description="labels returned")):
        """Zero-shot classification of an uploaded image among free-text labels."""
        names = tuple(x.strip() for x in labels.replace("\n", ",").split(",") if x.strip())
        if not names:
            raise HTTPException(422, 'labels: give at least one class name, comma-separated ("cat, dog")')
        if len(names) > s.max_labels:
            raise HTTPException(422, f"labels: {len(names)} labels, at most {s.max_labels} are allowed")
        if any(len(n) > s.max_text_chars for n in names):
            raise HTTPException(422, f"labels: a label is longer than {s.max_text_chars} characters")
        try:
            clf = await service.classifier(names)
        except (CliplabError, TimeoutError) as exc:
            raise _error(exc) from None
        f = await _image(image)
        from ..zeroshot import top_k

        top, probs = top_k(clf.predict_proba_features(f[None]), clf.classes_, k)
        return Labels(model=backbone.name,
                      labels=[Label(label=str(a), prob=float(b)) for a, b in zip(top[0], probs[0])])

    @app.post("/v1/search/text", response_model=Hits, tags=["search"], dependencies=auth,
              responses={404: {"description": "no index"}})
    async def search_text(body: SearchIn):
        """The k indexed images most similar to a text."""
        _need_index()
        q = await _model(service.text, [body.text])
        return await _search(q[0], body.k)

    @app.post("/v1/search/image", response_model=Hits, tags=["search"], dependencies=auth,
              responses={404: {"description": "no index"}})
    async def search_image(image: UploadFile = File(..., description="an image file"),
                           k: int = Form(10, ge=1, le=s.max_k, description="number of hits")):
        """The k indexed images most similar to an uploaded image."""
        _need_index()
        return await _search(await _image(image), k)

    @app.get("/v1/files/{id}", tags=["search"], dependencies=auth, response_class=FileResponse,
             responses={404: {"description": "not a hit of a search"}})
    async def indexed_file(id: int):
        """The image file of a hit that a search of this service returned.

        Files are looked up by hit id, never by a path from the request: only indexed
        images that a search returned are served.
        """
        _need_index()
        path = service.served_path(id)
        if path is None:
            raise HTTPException(404, f"no file for id {id}: only images returned by a search are served")
        p = Path(path)
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            raise HTTPException(404, f"the indexed file of id {id} is no longer readable")
        return FileResponse(p)

    return app


def _jsonable(metadata) -> dict:
    """A hit's metadata as JSON-safe values (numpy scalars to numbers, others to strings)."""
    return json.loads(json.dumps(dict(metadata or {}), default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _version() -> str:
    from .. import __version__

    return __version__


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by its Content-Length or as it streams."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> bytes:
        return json.dumps({"detail": f"the request body is {size}over the limit of {self.max_bytes:,} bytes "
                                     "(--max-body-mb)"}).encode()

    async def _reject(self, send, size: str) -> None:
        body = self._message(size)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send, f"{int(length):,} bytes, ")
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:  # whatever the app answers to the cut body, the client gets 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._reject(send, "")
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
            if not state["started"]:
                state["started"] = True
                await self._reject(send, "")


class _SecurityHeaders:
    """ASGI middleware: the page may load nothing but this service's own files."""

    HEADERS = [(b"x-content-type-options", b"nosniff"),
               (b"content-security-policy",
                b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self.HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)
