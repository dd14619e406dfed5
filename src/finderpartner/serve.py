"""``finderpartner serve``: an HTTP search service for apps (FastAPI on uvicorn) over a model and a vector store.

Endpoints (OpenAPI at ``/docs``, the schema at ``/openapi.json``):

- ``POST /search``: JSON ``{"text": ..., "k": 10, "where": "city = 'Paris'"}``, or a multipart form with an
  ``image`` file (and ``k``, ``where`` fields) -> ``{"hits": [{"rank", "id", "path", "score", "attributes"}], ...}``;
- ``GET /healthz``: model, store, live count, generation, reloads, request and error counts.

What it keeps true:

- The model and the store are loaded once. Encoding runs on one inference thread, never on the event loop: the
  text queries that arrive while it is busy are encoded together in the next batch (no waiting for a batch to
  fill, so a lone query is never delayed), and store searches run on a thread pool of their own, so encoding the
  next batch overlaps searching the last one.
- A store updated on disk (``finderpartner index`` adding or removing photos, a compaction) is noticed by a watcher
  thread that opens the new version beside the one serving, then swaps it in with one assignment; queries already
  running finish on the old one, which is closed when the last of them leaves. No query is refused or fails
  during a swap; a new version that cannot be opened (or was made by another model) is not swapped in, and
  ``/healthz`` says why. A Milvus server needs no reload: every search sees the collection as it is.
- 127.0.0.1 unless ``--host`` says otherwise; an optional bearer token (compared in constant time); the request
  body and the uploaded image's pixel count are limited before anything is decoded.
- A bad request (malformed filter, oversized upload, a file that is not an image, a missing or wrong token, a bad
  ``k``) gets a 4xx with ``{"error": "..."}`` naming the problem; it changes nothing.
- SIGTERM and Ctrl-C stop it gracefully: uvicorn stops accepting, finishes the requests in flight, then the
  command exits with errors.INTERRUPTED (130), as every command stopped by a signal does.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data.transforms import DECODE_ERRORS, ImageTooLarge, load_image
from .errors import FinderPartnerError, IndexMismatchError, UsageError
from .search.filters import FilterError, parse

log = logging.getLogger(__name__)

TOKEN_ENV = "FINDERPARTNER_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _web() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise FinderPartnerError(
            "the search service needs FastAPI and uvicorn: pip install 'finderpartner[serve]'"
        ) from None
    return fastapi, uvicorn


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token; None: no authentication
    max_upload_bytes: int = 10 * 1024 * 1024  # the whole request body
    max_pixels: int = 40_000_000  # an uploaded image's width x height (a decompression bomb stops at its header)
    max_k: int = 100
    max_text_chars: int = 1_000
    max_batch: int = 32  # text queries encoded (and searched) at once
    search_threads: int = 1  # FAISS's OpenMP threads (the model's PyTorch threads are separate)
    reload_interval_s: float = 1.0  # how often the store's files are checked for a new version (0: never)


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` and the message sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------------- the live store


@dataclass(eq=False)
class _Served:
    """One opened version of the store, with the queries running on it."""

    store: Any
    version: Hashable
    opened_at: float
    columns: dict[str, str] = field(default_factory=dict)  # read once at open (filters are parsed against them)
    in_flight: int = 0
    retired: bool = False


class LiveStore:
    """The store being served, swapped for a newer version without refusing queries (module docstring).

    ``open_store()`` opens the store as it is now; ``version()`` is a cheap token that changes when the store on
    disk does (None: the store is live by itself, e.g. a Milvus server: never reopened).
    """

    def __init__(self, open_store: Callable[[], Any], version: Callable[[], Hashable | None], fingerprint: str) -> None:
        self._open, self._version, self.fingerprint = open_store, version, fingerprint
        self._lock = threading.Lock()
        first_version = version()
        store = self._checked(open_store())
        self._now = _Served(store, first_version, time.time(), dict(store.columns()))
        self.reloads = 0
        self.reload_error: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _checked(self, store: Any) -> Any:
        if store.fingerprint != self.fingerprint:
            store.close()
            raise IndexMismatchError(
                f"the store was built by another model (fingerprint {store.fingerprint[:12]}, the served model "
                f"{self.fingerprint[:12]})"
            )
        return store

    def acquire(self) -> _Served:
        with self._lock:
            served = self._now
            served.in_flight += 1
            return served

    def release(self, served: _Served) -> None:
        with self._lock:
            served.in_flight -= 1
            close = served.retired and served.in_flight == 0
        if close:
            self._close(served)

    @property
    def current(self) -> _Served:
        return self._now

    def poll(self) -> bool:
        """Open and swap in the store's new version if its files changed; True when it swapped."""
        version = self._version()
        if version is None or version == self._now.version:
            return False
        try:
            store = self._checked(self._open())
        except Exception as e:  # noqa: BLE001 - keep serving the old version, say why on /healthz, retry later
            message = f"{type(e).__name__}: {e}"
            if message != self.reload_error:
                log.warning("the store changed but its new version cannot be served (still serving the old): %s", e)
            self.reload_error = message
            return False
        if self._version() != version:  # written to while it opened: open again at the next poll
            store.close()
            return False
        new = _Served(store, version, time.time(), dict(store.columns()))
        with self._lock:
            old, self._now = self._now, new
            old.retired = True
            close = old.in_flight == 0
        self.reloads += 1
        self.reload_error = None
        log.info("store reloaded: %d photos (reload %d)", _safe_count(store), self.reloads)
        if close:
            self._close(old)
        return True

    def _close(self, served: _Served) -> None:
        try:
            served.store.close()
        except Exception as e:  # noqa: BLE001 - a store that fails to close must not fail a query
            log.warning("closing an old store version failed: %s", e)

    def start_watching(self, interval_s: float) -> None:
        if interval_s <= 0 or self._version() is None:
            return

        def watch() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._watcher = threading.Thread(target=watch, name="store-watcher", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        with self._lock:
            served = self._now
            served.retired = True
            close = served.in_flight == 0
        if close:
            self._close(served)


def _safe_count(store: Any) -> int | None:
    try:
        return int(store.count())
    except Exception:  # noqa: BLE001 - a count for a log line or /healthz only
        return None


# ------------------------------------------------------------------------------------------- the service


@dataclass
class Counters:
    requests: int = 0
    searches: int = 0
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx: what a load test checks is 0
    by_status: dict[int, int] = field(default_factory=dict)

    def record(self, status: int) -> None:
        self.requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if 400 <= status < 500:
            self.client_errors += 1
        elif status >= 500:
            self.server_errors += 1


class Batcher:
    """Runs ``run(key, items) -> results`` on one executor thread for everything waiting at once: requests that
    arrive while a batch runs go together into the next one, grouped by ``key`` (at most ``max_batch`` a run).
    Nothing waits for a batch to fill: a lone request runs at once."""

    def __init__(self, run: Callable[[Any, list[Any]], Sequence[Any]], executor: ThreadPoolExecutor, max_batch: int):
        self._run, self._executor, self._max = run, executor, max_batch
        self._waiting: list[tuple[Any, Any, asyncio.Future[Any]]] = []
        self._running = False

    async def submit(self, key: Any, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((key, item, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                key = self._waiting[0][0]
                batch = [w for w in self._waiting if w[0] == key][: self._max]
                taken = {id(w[2]) for w in batch}
                self._waiting = [w for w in self._waiting if id(w[2]) not in taken]
                try:
                    results = await loop.run_in_executor(self._executor, self._run, key, [item for _, item, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to each waiting request
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, _, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._running = False


class SearchService:
    """The model and the live store behind the endpoints (plain Python: the app and tests call the same code)."""

    def __init__(self, searcher: Any, live: LiveStore, settings: ServeSettings, *, model: str, store: str) -> None:
        self.searcher, self.live, self.settings = searcher, live, settings
        self.model_name, self.store_name = model, store
        self.counters = Counters()
        self.started_at = time.time()
        self._closed = False
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")  # one model, one thread
        # one thread for every use of the store: stores batch queries, and a SQLite connection is not shared
        self._searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self.texts = Batcher(self._encode_texts, self._encoder, settings.max_batch)
        self.searches = Batcher(self._search_batch, self._searcher, settings.max_batch)

    def _encode_texts(self, key: Any, texts: list[str]) -> np.ndarray:
        return np.asarray(self.searcher.embed_texts(texts), dtype=np.float32)

    @staticmethod
    def _search_batch(key: tuple[_Served, int, Any], vectors: list[np.ndarray]) -> list[Any]:
        served, k, where = key
        return served.store.search(np.stack(vectors), k, where)

    # ---- checks shared by both kinds of query

    def check_k(self, k: Any) -> int:
        """``k`` from JSON (an integer) or a form field (digits)."""
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k.strip())
        if isinstance(k, bool) or not isinstance(k, int):
            raise RequestError(400, f"k must be a whole number from 1 to {self.settings.max_k} (got {k!r})")
        if not 1 <= k <= self.settings.max_k:
            raise RequestError(400, f"k must be from 1 to {self.settings.max_k} (got {k})")
        return k

    def parse_where(self, where: Any, columns: dict[str, str]) -> Any:
        if where is None or (isinstance(where, str) and not where.strip()):
            return None
        if not isinstance(where, str):
            raise RequestError(400, f"where must be a filter text such as \"city = 'Paris'\" (got {where!r})")
        try:
            return parse(where, columns)
        except FilterError as e:
            raise RequestError(400, str(e).replace("--where: ", "where: ", 1)) from None

    # ---- queries

    async def search_text(self, text: Any, k: Any, where: Any) -> dict[str, Any]:
        if not isinstance(text, str) or not text.strip():
            raise RequestError(400, 'give "text": a description of the photos to find (or upload an "image")')
        if len(text) > self.settings.max_text_chars:
            raise RequestError(400, f"text is {len(text)} characters long; at most {self.settings.max_text_chars}")
        k = self.check_k(k)
        served = self.live.acquire()
        try:
            expr = self.parse_where(where, served.columns)
            vector = await self.texts.submit(None, text.strip())
            return await self._search(served, vector, k, expr, {"text": text.strip(), "where": where})
        finally:
            self.live.release(served)

    async def search_image(self, data: bytes, filename: str, k: Any, where: Any) -> dict[str, Any]:
        k = self.check_k(k)
        served = self.live.acquire()
        try:
            expr = self.parse_where(where, served.columns)
            loop = asyncio.get_running_loop()
            vector = await loop.run_in_executor(self._encoder, self._embed_image, data, filename)
            return await self._search(served, vector, k, expr, {"image": filename, "where": where})
        finally:
            self.live.release(served)

    def _embed_image(self, data: bytes, filename: str) -> np.ndarray:
        if not data:
            raise RequestError(400, f"the uploaded file {filename!r} is empty")
        try:
            image = load_image(io.BytesIO(data), max_pixels=self.settings.max_pixels)
        except ImageTooLarge as e:
            raise RequestError(413, f"the uploaded image {filename!r} is too large: {e}") from None
        except DECODE_ERRORS as e:
            reason = str(e) or type(e).__name__
            raise RequestError(
                415, f"the uploaded file {filename!r} is not a readable image ({reason}); send a JPEG, PNG or WebP"
            ) from None
        vectors, failed = self.searcher.embed_paths([image])
        if failed:
            raise RequestError(415, f"the uploaded file {filename!r} is not a readable image: {failed[0][1]}")
        return np.asarray(vectors[0], dtype=np.float32)

    async def _search(self, served: _Served, vector: np.ndarray, k: int, where: Any, query: dict[str, Any]) -> dict:
        start = time.perf_counter()
        hits = await self.searches.submit((served, k, where), vector)
        self.counters.searches += 1
        return {
            "query": {**{key: v for key, v in query.items() if v is not None}, "k": k},
            "hits": [
                {
                    "rank": r + 1,
                    "id": h.id,
                    "path": h.path,
                    "score": round(float(h.score), 6),
                    "attributes": h.attributes,
                }
                for r, h in enumerate(hits)
            ],
            "generation": _generation(served),
            "search_ms": round((time.perf_counter() - start) * 1000, 3),
        }

    async def health(self, full: bool) -> dict[str, Any]:
        if not full:
            return {"status": "ok"}
        served = self.live.acquire()  # held: the version is not closed under the count
        try:
            # on the search thread: a store's connection (SQLite) is used by one thread at a time
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._searcher, self._health, served)
        finally:
            self.live.release(served)

    def _health(self, served: _Served) -> dict[str, Any]:
        store = served.store
        return {
            "status": "ok",
            "model": self.model_name,
            "fingerprint": self.searcher.fingerprint[:12],
            "store": self.store_name,
            "backend": type(store).__name__,
            "count": _safe_count(store),
            "dim": store.dim,
            "generation": _generation(served),
            "opened_at": served.opened_at,
            "reloads": self.live.reloads,
            "reload_error": self.live.reload_error,
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests": self.counters.requests,
            "searches": self.counters.searches,
            "errors": {"client": self.counters.client_errors, "server": self.counters.server_errors},
            "by_status": {str(k): v for k, v in sorted(self.counters.by_status.items())},
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for executor in (self._encoder, self._searcher):  # the work in flight first, then the store it uses
            executor.shutdown(wait=True, cancel_futures=True)
        self.live.close()


def _generation(served: _Served) -> Any:
    return getattr(served.store, "generation", None)


# ------------------------------------------------------------------------------------------- the app


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app reads it (by its
    Content-Length) or as soon as the stream passes the limit (a chunked body)."""

    def __init__(self, app: Any, limit: int, on_refused: Callable[[int], None] = lambda status: None) -> None:
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.on_refused(413)
            return await _send_error(send, 413, self._message(int(declared)))
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._message(seen))
            return message

        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except BodyTooLarge as e:
            if not started:
                self.on_refused(413)
                await _send_error(send, 413, str(e))

    def _message(self, size: int) -> str:
        return (
            f"the request is {_size(size)} or more; this server accepts at most {_size(self.limit)} (--max-upload-mb)"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


async def _send_error(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "description": "what to look for, e.g. 'a dog on a beach'"},
                        "k": {"type": "integer", "default": 10, "minimum": 1},
                        "where": {"type": "string", "description": "filter, e.g. city = 'Paris' and age > 30"},
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "find photos like this one"},
                        "k": {"type": "integer", "default": 10},
                        "where": {"type": "string"},
                    },
                }
            },
        },
    }
}


def build_app(service: SearchService) -> Any:
    """The FastAPI app over ``service`` (its lifespan closes the service when the server stops)."""
    fastapi, _ = _web()
    from contextlib import asynccontextmanager

    from fastapi.responses import JSONResponse

    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        service.live.start_watching(settings.reload_interval_s)
        yield
        service.close()

    app = fastapi.FastAPI(
        title="FinderPartner search",
        description="Photos matching a description or an image, with attribute filters. "
        "Send `Authorization: Bearer <token>` when the server was started with a token.",
        version="1",
        lifespan=lifespan,
    )

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        service.counters.record(status)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def authorised(request: Any) -> bool:
        if settings.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), settings.token.encode())

    def takes_request(endpoint: Any) -> Any:
        """FastAPI finds the Request parameter by its annotation, a string under ``from __future__ import
        annotations`` that it resolves in this module's globals, where fastapi is not: give it the class."""
        endpoint.__annotations__["request"] = fastapi.Request
        return endpoint

    @app.post("/search", openapi_extra=_SEARCH_BODY, summary="photos matching a text or an uploaded image")
    @takes_request
    async def search(request: Any) -> Any:
        if not authorised(request):
            return error(
                401, "missing or wrong bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"}
            )
        try:
            result = await _dispatch(service, request)
        except RequestError as e:
            return error(e.status, e.message)
        except BodyTooLarge as e:
            return error(413, str(e))
        except Exception:
            log.exception("search failed")
            return error(500, "the search failed on the server (see its log)")
        service.counters.record(200)
        return result

    @app.get("/healthz", summary="model, store, counts, generation")
    @takes_request
    async def healthz(request: Any) -> Any:
        return await service.health(authorised(request))

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request: Any, exc: Any) -> Any:
        return error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(404)
    async def not_found(request: Any, exc: Any) -> Any:
        return error(404, f"no such endpoint {request.url.path}: POST /search, GET /healthz, GET /docs")

    @app.exception_handler(405)
    async def wrong_method(request: Any, exc: Any) -> Any:
        return error(405, f"{request.method} is not allowed on {request.url.path} (POST /search, GET /healthz)")

    return LimitBody(app, settings.max_upload_bytes, service.counters.record)


async def _dispatch(service: SearchService, request: Any) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, 'the body must be a JSON object: {"text": ..., "k": 10, "where": ...}')
        unknown = set(body) - {"text", "k", "where"}
        if unknown:
            raise RequestError(400, f"unknown field(s) {sorted(unknown)}: send text, k, where")
        return await service.search_text(body.get("text"), body.get("k", 10), body.get("where"))
    if kind == "multipart/form-data":
        from starlette.exceptions import HTTPException  # a body the multipart parser refuses

        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=service.settings.max_upload_bytes)
        except HTTPException as e:
            raise RequestError(e.status_code, f"the multipart body cannot be read: {e.detail}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, 'upload the image as a file field named "image"')
            data = await upload.read()
            return await service.search_image(data, upload.filename or "upload", form.get("k", "10"), form.get("where"))
        finally:
            await form.close()
    raise RequestError(
        415, f"send application/json (a text query) or multipart/form-data (an image), not {kind or 'no content type'}"
    )


# ------------------------------------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error (uvicorn would exit by itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP, and accepted
    # sockets take the listener's. With proto 0, a response written in two parts waited for the client's delayed
    # ACK: 40 ms added to every request (measured with httpx on loopback).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FinderPartnerError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(service: SearchService, *, log_level: str = "warning", announce: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM / Ctrl-C (then uvicorn finishes the requests in flight and the signal is re-raised)."""
    _, uvicorn = _web()
    settings = service.settings
    _faiss_threads(settings.search_threads)
    if settings.host not in LOOPBACK and settings.token is None:
        log.warning(
            "serving on %s without a token: anyone who reaches this address can search; set --token-file or $%s",
            settings.host,
            TOKEN_ENV,
        )
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        build_app(service),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {service.store_name} on http://{shown}:{port} (API docs: http://{shown}:{port}/docs)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise FinderPartnerError("the server did not start (see the log above)")


def _faiss_threads(n: int) -> None:
    """FAISS's OpenMP threads for this process: one by default, the cores being the model's (PyTorch encodes
    on them meanwhile). At 100k vectors, 1 and 2 threads cost the same server CPU per query (serve_load.py,
    measured beside other jobs); a store far larger, or a machine with more cores, may want more."""
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(max(1, n))


def read_token(path: str | None, env: dict[str, str]) -> str | None:
    """The bearer token: the first line of ``--token-file``, else ``$FINDERPARTNER_SERVE_TOKEN``, else None."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise UsageError(f"cannot read --token-file {path}: {e.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {path} is empty: put the token on its first line")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None
