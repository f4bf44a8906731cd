"""`bloodcell serve`: a trained run behind an HTTP API and a review page for the lab.

    GET  /          the review page: upload cells, check and correct them, export the count
    GET  /health    the model being served; answers at once, even while inference is busy
    POST /predict   multipart image files -> one record per file and the differential count,
                    the same JSON as `bloodcell predict --json`
    POST /explain   one image file -> its record and Grad-CAM overlay (PNG, base64)
    GET  /docs      the OpenAPI page, its scripts served from the package (works offline)
    /reviews ...    the page's reviews, kept in a SQLite database (`review_routes`, `reviews`)

A server on a lab network must survive its clients, so (all in `ServeLimits`):
- limits hold while a request is read, before it is kept: bytes per file, bytes and files per
  request (the body is counted as it arrives; a declared Content-Length over the limit is
  refused at once);
- at most `max_active` requests are read and classified at once and `max_waiting` wait for a
  turn (their bodies stay in the network buffers); beyond that, 503 with Retry-After;
- a client that stops sending gets 408; a connection that never completes its first request is
  closed after `header_timeout`, and when too many such connections pile up the oldest go first,
  so `/health` and real clients still get through;
- off the loopback interface a token is required (`Authorization: Bearer ...`, compared in
  constant time); cross-origin POSTs are refused; error messages name no server paths;
- one JSON line per request in the log; on SIGTERM, requests in flight finish first.
"""

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from bloodcell import __version__, runs
from bloodcell.app.reviews import ReviewStore
from bloodcell.errors import BloodcellError
from bloodcell.images import crops, decode
from bloodcell.inference.classifier import Classifier, PredictOptions, Prepared
from bloodcell.inference.differential import differential

WEB = Path(__file__).with_name("web")
TOKEN_ENV = "BLOODCELL_TOKEN"
log = logging.getLogger("bloodcell.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of the server."""

    max_file_bytes: int = 20 * 2**20  # a microscope cell image is well under 1 MB
    max_request_bytes: int = 64 * 2**20  # the page sends batches of 32 files
    max_files: int = 1024
    max_active: int = 4  # requests being read and classified at once
    max_waiting: int = 32  # requests waiting for a turn; more get 503
    read_timeout: float = 15.0  # seconds without a byte of the body: 408
    body_timeout: float = 120.0  # seconds for a whole body to arrive, however it trickles: 408
    max_buffered_bytes: int = 512 * 2**20  # bodies being received, all requests together; more: 503
    max_head_bytes: int = 16 * 2**10  # request line and headers of one request; more: 431
    header_timeout: float = 10.0  # seconds for a new connection to send its first request
    max_pending_connections: int = 256  # connections without a request yet; the oldest are dropped


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    classifier: Classifier,
    options: PredictOptions | None = None,
    limits: ServeLimits | None = None,
    token: str | None = None,
    hosts: frozenset[str] | None = None,
    reviews: ReviewStore | None = None,
):
    """The ASGI application: FastAPI routes inside the request guard. `hosts`: the names a
    request's Host header may give (None: any); `serve` passes the names it is bound to.
    `reviews`: where the page's reviews are kept (`/reviews` routes; None: none are kept)."""
    try:
        from fastapi import FastAPI, HTTPException, Query, Request
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise BloodcellError("serving needs FastAPI: pip install 'bloodcell[serve]'") from None

    options = options or PredictOptions()
    limits = limits or ServeLimits()
    admission = Admission(limits.max_active, limits.max_waiting)
    model_lock = threading.Lock()  # one forward pass at a time: torch already uses every core
    app = FastAPI(
        title="bloodcell",
        version=__version__,
        summary="Blood-cell image classification (BloodMNIST classes)",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(_Abort)
    async def aborted(request: Request, abort: _Abort) -> JSONResponse:
        """A body that stalls or grows too large while a route reads it (else the framework says 500)."""
        return JSONResponse({"detail": abort.message}, status_code=abort.status)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    _mount_docs(app, HTMLResponse, StaticFiles)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "model": classifier.record.arch,
            "classes": list(classifier.classes),
            "answerable": list(classifier.answerable),
            "image_size": classifier.image_size,
            "crop": options.crop or classifier.record.preprocessing.crop,
            "min_confidence": options.min_confidence,
            "busy": admission.in_use,
            "token_required": token is not None,
        }

    async def uploads_of(request: Request) -> list[tuple[str, bytes]]:
        async with request.form(max_files=limits.max_files, max_fields=limits.max_files) as form:
            files = [v for k, v in form.multi_items() if k == "files" and hasattr(v, "read")]
            if not files:
                raise HTTPException(422, "send one or more image files in the multipart field 'files'")
            too_big = [f.filename for f in files if (f.size or 0) > limits.max_file_bytes]
            if too_big:
                raise HTTPException(413, f"{too_big[0]}: larger than {limits.max_file_bytes // 2**20} MB")
            return [(f.filename or "upload", await f.read()) for f in files]

    async def classify(uploads: list[tuple[str, bytes]], request_options: PredictOptions) -> list[dict]:
        """Records for uploaded images: a turn in the queue, decoding in threads, one forward pass at a time."""
        async with admission.turn():

            def run() -> list[dict]:
                prepared = classifier.prepare_sources(uploads, request_options)  # decoding runs in parallel
                with model_lock:
                    return classifier.classify_prepared([name for name, _ in uploads], prepared, request_options)

            records = await asyncio.to_thread(run)
        _release_memory()
        return records

    @app.post("/predict")
    async def predict(
        request: Request,
        tta: bool = Query(options.tta, description="average over the 8 flips/rotations"),
        min_confidence: float = Query(options.min_confidence, ge=0, le=1, description="flag for review below"),
        top_k: int = Query(options.top_k, ge=1, le=8),
        wbc_count: float | None = Query(None, gt=0, lt=1000, description="white-cell count, x10^9/L"),
    ) -> dict:
        """Classify the multipart `files`: one record per image (per white cell of a field) and the differential."""
        uploads = await uploads_of(request)  # read before taking a turn: slow uploads hold no slot
        request_options = replace(options, tta=tta, min_confidence=min_confidence, top_k=top_k, workers=2)
        records = await classify(uploads, request_options)
        return {"records": records, "summary": differential(records, classifier.classes, wbc_count)}

    if reviews is not None:
        from bloodcell.app.review_routes import add_review_routes

        add_review_routes(app, reviews, classifier, replace(options, workers=2), uploads_of, classify)

    @app.post("/explain")
    async def explain(request: Request, class_name: str | None = Query(None, alias="class")) -> dict:
        """Grad-CAM for one uploaded image: the record, the framed input and the overlay as PNGs."""
        from bloodcell.reporting import explain as gradcam
        from bloodcell.reporting import plots

        uploads = await uploads_of(request)
        async with admission.turn():
            if len(uploads) != 1:
                raise HTTPException(422, "send exactly one image file to /explain")
            name, content = uploads[0]

            def run():
                try:
                    image = decode.open_image(content)
                except decode.ImageError as exc:
                    raise HTTPException(422, f"{name}: {exc}") from None
                pixels, found = classifier.prepare(image, options.crop)
                square, _ = crops.frame(image, runs.Crop.parse(options.crop or classifier.record.preprocessing.crop))
                with model_lock:
                    record = classifier.classify_prepared([name], [Prepared(((pixels, found),))], options)[0]
                    explanation = gradcam.explain_image(classifier, pixels, class_name)
                shown = square.copy()  # thumbnail() works in place
                shown.thumbnail((280, 280))
                overlay = plots.heat_overlay(pixels, explanation.heatmap, side=280)
                return record, _png(shown), _png(Image.fromarray(overlay))

            try:
                record, framed, overlay = await asyncio.to_thread(run)
            except BloodcellError as exc:
                raise HTTPException(422, str(exc)) from None
        target = classifier.classes[explanation_class(record, class_name, classifier)]
        return {"record": record, "explained_class": target, "image": framed, "overlay": overlay}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # no paths or tracebacks to clients
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return Guard(app, limits, token, hosts)


def explanation_class(record: dict, class_name: str | None, classifier: Classifier) -> int:
    return classifier.classes.index(class_name) if class_name else classifier.classes.index(record["class"])


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _mount_docs(app, HTMLResponse, StaticFiles) -> None:
    """/docs with Swagger UI's files from the swagger-ui-bundle package: no CDN, works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        import swagger_ui_bundle
    except ImportError:

        @app.get("/docs", include_in_schema=False)
        def no_docs():
            return HTMLResponse(
                "<p>The interactive docs need the swagger-ui-bundle package (pip install 'bloodcell[serve]'); "
                "the API schema is at <a href='/openapi.json'>/openapi.json</a>.</p>"
            )

        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="bloodcell API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def _release_memory() -> None:
    """Give freed memory back to the system after a request (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Admission:
    """At most `active` requests inside at once and `waiting` more queued; the rest get 503."""

    def __init__(self, active: int, waiting: int):
        self.semaphore = asyncio.Semaphore(active)
        self.capacity = active + waiting
        self.in_use = 0

    def turn(self):
        from contextlib import asynccontextmanager

        from fastapi import HTTPException

        @asynccontextmanager
        async def slot():
            if self.in_use >= self.capacity:
                raise HTTPException(503, "busy: too many requests waiting; try again", headers={"Retry-After": "2"})
            self.in_use += 1
            try:
                async with self.semaphore:
                    yield
            finally:
                self.in_use -= 1

        return slot()


class Guard:
    """The ASGI middleware every request passes: host, token, origin, head and body limits, read
    deadlines, a bound on the bodies held in memory across all requests, and the log line."""

    def __init__(self, app, limits: ServeLimits, token: str | None, hosts: frozenset[str] | None = None):
        self.app = app
        self.limits = limits
        self.token = token.encode() if token else None
        self.hosts = hosts
        self.buffered = 0  # body bytes received by requests in flight, all together

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state = {"status": 0, "bytes": 0, "started": time.monotonic()}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        refusal = self._refusal(scope, headers)
        try:
            if refusal is not None:
                await _reply(logged_send, *refusal)
                return
            await self.app(scope, self._counting(receive, state), logged_send)
        except _Abort as abort:
            if state["status"] == 0 and abort.status != CLIENT_GONE:
                await _reply(logged_send, abort.status, abort.message)
            elif abort.status == CLIENT_GONE:
                state["status"] = CLIENT_GONE
        finally:
            self.buffered -= state["bytes"]
            client = scope.get("client") or ("", 0)
            line = {
                "time": round(time.time(), 3),
                "client": client[0],
                "method": scope["method"],
                "path": scope["path"],
                "status": state["status"],
                "bytes_in": state["bytes"],
                "ms": round(1000 * (time.perf_counter() - started), 1),
            }
            log.info(json.dumps(line))

    def _refusal(self, scope, headers: dict) -> tuple[int, str] | None:
        head = sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path") or b"")
        if head > self.limits.max_head_bytes:
            return 431, f"request head larger than {self.limits.max_head_bytes // 1024} KB"
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return 421, "this server does not answer for that host name"
        path = scope["path"]
        public = path in ("/", "/health", "/docs", "/openapi.json") or path.startswith(("/static/", "/docs-assets/"))
        if self.token is not None and not public:
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return 401, "a token is required: Authorization: Bearer <token>"
        origin = headers.get("origin")
        if scope["method"] == "POST" and origin and origin.split("://", 1)[-1] != host:
            return 403, "cross-origin requests are not allowed"
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_request_bytes):
            return 413, f"request larger than {self.limits.max_request_bytes // 2**20} MB"
        return None

    def _counting(self, receive, state: dict):
        """`receive` that counts the body as it arrives, gives up on a client that stalls or
        trickles, keeps all bodies in flight under one memory budget, and notices a client that left."""
        limits = self.limits

        async def counted():
            if state.get("body_done"):  # the body is in: a response may listen for the client leaving
                return await receive()
            left = limits.body_timeout - (time.monotonic() - state["started"])
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(limits.read_timeout, left)))
            except asyncio.TimeoutError:
                if left <= limits.read_timeout:
                    raise _Abort(408, f"the body took longer than {limits.body_timeout:.0f} s") from None
                raise _Abort(408, f"no data for {limits.read_timeout:.0f} s") from None
            if message["type"] == "http.disconnect":
                raise _Abort(CLIENT_GONE, "the client closed the connection")
            state["body_done"] = not message.get("more_body", False)
            size = len(message.get("body", b""))
            state["bytes"] += size
            self.buffered += size
            if state["bytes"] > limits.max_request_bytes:
                raise _Abort(413, f"request larger than {limits.max_request_bytes // 2**20} MB")
            if self.buffered > limits.max_buffered_bytes:
                raise _Abort(503, "busy: too many uploads in progress; try again")
            return message

        return counted


CLIENT_GONE = 499  # logged for a client that closed the connection mid-request (nothing is sent)


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; 'Example.org' -> 'example.org'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def bound_names(host: str) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers for. On loopback, where no token is needed,
    only the loopback names (a page elsewhere that points a DNS name at 127.0.0.1 is refused);
    bound to every interface, any name (the token guards it)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host.lower()}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "::1"}
    return frozenset(names)


class _Abort(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"2"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(limits: ServeLimits):
    """uvicorn's HTTP/1.1 protocol with the two defences it lacks against idle connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    pending: OrderedDict = OrderedDict()  # connections that have not sent a request yet, oldest first

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            pending[self] = None
            while len(pending) > limits.max_pending_connections:  # make room: drop the oldest idle one
                oldest, _ = pending.popitem(last=False)
                oldest.transport.close()
            self.loop.call_later(limits.header_timeout, self._close_if_idle)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None:  # a whole request head arrived; bytes of a head that never ends do not count
                pending.pop(self, None)

        def connection_lost(self, exc) -> None:
            pending.pop(self, None)
            super().connection_lost(exc)

        def _close_if_idle(self) -> None:
            if self in pending and not self.transport.is_closing():
                pending.pop(self, None)
                self.transport.close()

    return GuardedH11Protocol


def _check_port_free(host: str, port: int) -> None:
    """One line now, instead of uvicorn's log and exit, when the address cannot be listened on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BloodcellError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def serve(
    classifier: Classifier,
    options: PredictOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServeLimits | None = None,
    allowed_hosts: tuple[str, ...] = (),
    reviews: str | Path | None = None,
) -> None:
    """Run the server with uvicorn until interrupted (SIGTERM: in-flight requests finish first).
    Requests must name this server in their Host header (`bound_names`, plus `allowed_hosts`)."""
    try:
        import uvicorn
    except ImportError:
        raise BloodcellError("serving needs uvicorn: pip install 'bloodcell[serve]'") from None
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        raise BloodcellError(
            f"serving on {host} (not this machine only) needs a token: --token or ${TOKEN_ENV}; "
            "clients then send 'Authorization: Bearer <token>'"
        )
    limits = limits or ServeLimits()
    hosts = bound_names(host)
    if allowed_hosts:
        hosts = (hosts or frozenset()) | {_host_name(h) for h in allowed_hosts}
    _check_port_free(host, port)
    store = ReviewStore(reviews) if reviews is not None else None  # a read-only or newer database: one line, now
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(
        create_app(classifier, options, limits, token, hosts, store),
        host=host,
        port=port,
        http=guarded_protocol(limits),
        access_log=False,  # Guard writes one JSON line per request instead
        log_level="warning",
        limit_concurrency=limits.max_pending_connections + limits.max_active + limits.max_waiting,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers
    )
    kept = f"; reviews kept in {store.path}" if store else ""
    print(f"bloodcell {__version__} serving {classifier.record.arch} on http://{host}:{port}/{kept}", flush=True)
    uvicorn.Server(config).run()
