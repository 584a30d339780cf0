"""The daemon's HTTP side, on Starlette and uvicorn: health, metrics, the status page, and the download API.

Paths (DESIGN.md, docs/devices.md), served from the registry folder as it is
on disk, so a static mirror of that folder serves the same bytes
(docs/nginx-mirror.conf):

- ``GET /v1/models/<model>/latest``: the latest manifest; ``Cache-Control:
  no-cache`` and an ETag (sha256 of the document), so a device's conditional
  GET costs a 304 until a new version is published.
- ``GET /v1/models/<model>/latest.sig``: its detached Ed25519 signature (64 bytes).
- ``GET /v1/models/<model>/versions``: the published versions, newest first.
- ``GET /v1/models/<model>/versions/<v>/{manifest.json,manifest.json.sig,model.tflite,labels.txt}``:
  immutable once published. ``model.tflite``'s ETag is its sha256 (from the
  manifest); ``If-None-Match`` gives 304 and ``Range`` 206, so a download cut
  off in a field resumes where it stopped.
- ``GET /v1/models/<model>/versions/<v>/from-<base>.zst``: the download delta from version
  ``base`` (daemon/registry/deltas.py), served as model.tflite is: its ETag the sha256 the
  manifest lists, 304, Range, immutable. Downloads are counted by version and kind (full, delta).
- ``POST /v1/models/<model>/telemetry``: a device's report of how each version does
  (daemon/ingest/telemetry.py), counted in the store before the answer: 202 counted, 200 a resend
  counted before, 400 with the field that is wrong, 413 too large, 503 (retry later) when the store
  cannot take it now, 404 where reports are not taken (``field.telemetry`` off, ``sprout serve``).
- ``POST /v1/models/<model>/field-photos``: a device's photo for labelling (daemon/ingest/field_photos.py),
  queued in the store before the answer: 202 queued, 200 stored before, 429 over the device's daily cap
  (``Retry-After``: the next UTC day), 400 with what is wrong, 413 too large, 503, 404 as above
  (``field.photos``).

Model names and versions are checked against what the registry can hold
before any path is built, so no request reaches outside it. With a bearer
token configured every /v1 request must carry it.

uvicorn runs in its own thread with its own event loop; it installs no signal
handlers off the main thread, so the Daemon keeps sole control of signals.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.common.lifecycle import left
from daemon.distribution.fleet import DELTA, FULL, Fleet
from daemon.ingest.field_photos import PhotoLimits, parse_field_photo
from daemon.ingest.telemetry import MAX_ID_CHARS, MAX_REPORT_BYTES, bucket_of, device_digest, parse_report
from daemon.registry import rollout as staged
from daemon.registry.deltas import DELTA_FILE
from daemon.registry.layout import MANIFEST_FILE, SIGNATURE_FILE, RegistryError
from daemon.store.labelling import DAY_S
from daemon.store.records import FieldPhoto, FieldReport, Reason, Rejection

if TYPE_CHECKING:
    from daemon.store.examples import CommitResult

log = logging.getLogger("sprout.server")

Health = Callable[[], dict[str, bool]]
# latest and latest.sig differ by device while a version rolls out in stages: a cache keys them by its id.
VARY = "Sprout-Device"
# Commits a device's report (or its rejection) to the store; True when counted, False for a resend.
ReportSink = Callable[[FieldReport | Rejection], bool]
# Commits a device's photo for labelling (or its rejection) to the store.
PhotoSink = Callable[[FieldPhoto | Rejection], "CommitResult"]

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as settings.model.name allows
_VERSION = re.compile(r"^[1-9][0-9]{0,9}$")
_FILES = {
    "manifest.json": "application/json",
    "manifest.json.sig": "application/octet-stream",
    "model.tflite": "application/octet-stream",
    "labels.txt": "text/plain; charset=utf-8",
}
IMMUTABLE = "public, max-age=31536000, immutable"  # a published version's files never change


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _etag_matches(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match")
    if wanted is None:
        return False
    return wanted.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in wanted.split(",")]


def _document(request: Request, path: Path, cache: str, vary: str | None = None) -> Response:
    """A small file of the registry (JSON, or a signature), with an ETag of its bytes and 304 when the device has it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _error(404, "nothing published yet" if path.name in ("latest", "latest.sig") else f"no {path.name} here")
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": cache, **({"Vary": vary} if vary else {})}
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    kind = "application/octet-stream" if path.name.endswith(".sig") else "application/json"
    return Response(data, media_type=kind, headers=headers)


class DownloadApi:
    """The /v1 routes over ``registry_root`` (one folder per model, as daemon/registry/versions.py lays it out)."""

    def __init__(
        self,
        registry_root: Path,
        token: str | None = None,
        reports: tuple[str, ReportSink] | None = None,
        photos: tuple[str, PhotoSink] | None = None,
        photo_limits: PhotoLimits | None = None,
    ):
        self.root = registry_root
        self.token = token
        self.fleet = Fleet()  # which versions devices run and fetch (daemon/distribution/fleet.py): counts only
        self.reports = reports  # (model, sink): where devices' reports on that model go; None: not taken here
        # Reports POSTed here, by outcome: counted, resent (counted before), rejected, failed (the store refused).
        self.report_outcomes = {"counted": 0, "resent": 0, "rejected": 0, "failed": 0}
        self.photos = photos if photo_limits is not None else None  # (model, sink), as reports
        self.photo_limits = photo_limits
        # Photos POSTed here, by outcome: queued, resent (stored before), capped, rejected, failed.
        self.photo_outcomes = {"queued": 0, "resent": 0, "capped": 0, "rejected": 0, "failed": 0}

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models/{model}/latest", self.latest),
            Route("/v1/models/{model}/latest.sig", self.latest_signature),
            Route("/v1/models/{model}/versions", self.versions),
            Route("/v1/models/{model}/versions/{version}/{name}", self.version_file),
            Route("/v1/models/{model}/telemetry", self.telemetry, methods=["POST"]),
            Route("/v1/models/{model}/field-photos", self.field_photo, methods=["POST"]),
        ]

    def _refusal(self, request: Request) -> Response | None:
        """Why this request gets nothing (bad token, bad name, unknown model); None when it may proceed."""
        if self.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return JSONResponse(
                    {"error": "a valid bearer token is required: Authorization: Bearer <token>"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="sprout"'},
                )
        self.fleet.heard(request.headers.get("sprout-device"), request.headers.get("sprout-version"))
        model = request.path_params["model"]
        if not _MODEL.match(model):
            return _error(400, "model names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not (self.root / model).is_dir():
            return _error(404, f"no model {model!r} is published here")
        return None

    async def latest(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        path = self._offered(request) or self.root / request.path_params["model"] / "latest"
        return _document(request, path, "no-cache", VARY)

    async def latest_signature(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        offered = self._offered(request)
        path = offered.with_name(SIGNATURE_FILE) if offered else self.root / request.path_params["model"] / "latest.sig"
        return _document(request, path, "no-cache", VARY)

    def _offered(self, request: Request) -> Path | None:
        """The manifest of the version rolling out, when the requesting device's cohort has it (rollout.py); else
        None: ``latest``. Decided from the device's own id, so the document and its signature agree."""
        device = request.headers.get("sprout-device")
        if not device or len(device) > MAX_ID_CHARS or not device.isprintable():
            return None
        try:
            rolling = staged.read(self.root / request.path_params["model"])
        except RegistryError as err:
            log.warning("%s: every device gets latest", err)
            return None
        if rolling is None or not rolling.reaches(bucket_of(device_digest(device))):
            return None
        return self.root / request.path_params["model"] / str(rolling.version) / MANIFEST_FILE

    async def versions(self, request: Request) -> Response:
        refusal = self._refusal(request)
        return refusal or _document(request, self.root / request.path_params["model"] / "versions", "no-cache")

    async def version_file(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        version, name = request.path_params["version"], request.path_params["name"]
        if not _VERSION.match(version):
            return _error(400, "versions are positive integers")
        delta = DELTA_FILE.match(name)
        if name not in _FILES and delta is None:
            return _error(404, f"a version holds {', '.join(_FILES)} and from-<version>.zst deltas")
        folder = self.root / request.path_params["model"] / version
        if not (folder / "manifest.json").is_file():
            return _error(404, f"version {version} is not published (or was removed by retention)")
        if name in ("manifest.json", "manifest.json.sig"):
            return _document(request, folder / name, IMMUTABLE)
        if delta is not None and not (folder / name).is_file():
            return _error(404, f"version {version} has no delta from version {delta.group(1)}: fetch model.tflite")
        if name == "labels.txt":
            etag = f'"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}"'
        else:
            etag = self._file_etag(folder, name, delta.group(1) if delta else None)
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        if (name == "model.tflite" or delta) and request.headers.get("range", "bytes=0-").startswith("bytes=0-"):
            # A download begun; its resumes are not counted again.
            self.fleet.downloaded(int(version), DELTA if delta else FULL)
        # Starlette's FileResponse answers Range with 206 (and If-Range against this ETag).
        return FileResponse(folder / name, media_type=_FILES.get(name, "application/zstd"), headers=headers)

    async def telemetry(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        model = request.path_params["model"]
        if self.reports is None or self.reports[0] != model:
            return _error(404, f"reports on model {model!r} are not taken here (field.telemetry, or MQTT instead)")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_REPORT_BYTES:
            return _error(413, f"a report is at most {MAX_REPORT_BYTES} bytes: send more often, fewer versions")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REPORT_BYTES:
                return _error(413, f"a report is at most {MAX_REPORT_BYTES} bytes: send more often, fewer versions")
        item = parse_report(bytes(body))
        try:
            counted = await run_in_threadpool(self.reports[1], item)
        except Exception as err:  # the store is down or full: the device keeps the report and sends it again
            self.report_outcomes["failed"] += 1
            log.warning("a device's report could not be stored: %s; it was told to retry", err)
            return JSONResponse({"error": "cannot store reports now: retry later"}, 503, {"Retry-After": "60"})
        if isinstance(item, Rejection):
            self.report_outcomes["rejected"] += 1
            return JSONResponse({"error": item.detail, "reason": item.reason.value}, status_code=400)
        self.report_outcomes["counted" if counted else "resent"] += 1
        if counted:
            return JSONResponse({"counted": True}, status_code=202)
        return JSONResponse({"counted": False, "why": f"seq {item.seq} was counted before: send seq + 1 next"})

    async def field_photo(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        model = request.path_params["model"]
        if self.photos is None or self.photo_limits is None or self.photos[0] != model:
            return _error(404, f"photos of model {model!r} are not taken here (field.photos, or MQTT instead)")
        most = self.photo_limits.max_document_bytes
        too_large = f"a photo document is at most {most} bytes: send the photo at 640 pixels on the long side"
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > most:
            return _error(413, too_large)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > most:
                return _error(413, too_large)
        # Decoding the photo to check it is CPU work: off the event loop, as the commit is.
        item = await run_in_threadpool(parse_field_photo, bytes(body), self.photo_limits)
        try:
            result = await run_in_threadpool(self.photos[1], item)
        except Exception as err:  # the store is down or full: the device keeps the photo and sends it again
            self.photo_outcomes["failed"] += 1
            log.warning("a device's photo could not be stored: %s; it was told to retry", err)
            return JSONResponse({"error": "cannot store photos now: retry later"}, 503, {"Retry-After": "300"})
        if isinstance(item, Rejection):
            self.photo_outcomes["rejected"] += 1
            status = 413 if item.reason is Reason.TOO_LARGE else 400
            return JSONResponse({"error": item.detail, "reason": item.reason.value}, status_code=status)
        if result.photos.refused:
            self.photo_outcomes["capped"] += 1
            wait = int(DAY_S - time.time() % DAY_S) + 1
            refused = result.photos.refused[0]
            return JSONResponse(
                {"error": refused.detail, "reason": refused.reason.value}, 429, {"Retry-After": str(wait)}
            )
        if result.photos.queued:
            self.photo_outcomes["queued"] += 1
            return JSONResponse({"queued": True}, status_code=202)
        self.photo_outcomes["resent"] += 1
        return JSONResponse({"queued": False, "why": "this photo_id was stored before"})

    @staticmethod
    def _file_etag(folder: Path, name: str, base: str | None) -> str:
        # The manifest's sha256 of the file: the registry made it at publish, and hashing
        # megabytes on every conditional GET would be waste.
        entry = json.loads((folder / "manifest.json").read_bytes())["files"]["model.tflite"]
        if base is not None:
            listed = entry.get("deltas", {}).get(base) if isinstance(entry.get("deltas"), dict) else None
            if not isinstance(listed, dict) or not isinstance(listed.get("sha256"), str):
                return f'"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}"'  # on disk, yet not listed
            return f'"{listed["sha256"]}"'
        return f'"{entry["sha256"]}"'


def build_app(
    health: Health | None,
    api: DownloadApi | None = None,
    metrics: Callable[[], bytes] | None = None,
    status: Callable[[], str] | None = None,
    operator_routes: list[Route] | None = None,
) -> Starlette:
    """The routes given: the phone-facing API (``api``) and the operator's (``health``, ``metrics``,
    ``status``, and ``operator_routes``: the labelling page), together on one listener or apart on two
    (daemon/service/daemon.py decides)."""

    def healthz(parts_of: Health) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def answer(request: Request) -> JSONResponse:
            parts = parts_of()
            return JSONResponse(parts, status_code=200 if all(parts.values()) else 503)

        return answer

    def prometheus(text: Callable[[], bytes]) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            return Response(text(), media_type="text/plain; version=0.0.4; charset=utf-8")

        return answer

    def page(html: Callable[[], str]) -> Callable[[Request], Awaitable[HTMLResponse]]:
        async def answer(request: Request) -> HTMLResponse:
            return HTMLResponse(html(), headers={"Cache-Control": "no-cache"})

        return answer

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, f"no such path: {request.url.path} (the API is in docs/devices.md)")

    routes = [*([Route("/healthz", healthz(health))] if health else []), *(api.routes() if api else [])]
    routes += [Route("/metrics", prometheus(metrics))] if metrics else []
    routes += [Route("/", page(status))] if status else []
    routes += operator_routes or []
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    # Starlette would answer "/healthz/" with a redirect whose Location is built from the client's Host
    # header (an open redirect), and before the /v1 token check; a path is served as written or not at all.
    app.router.redirect_slashes = False
    return app


class RequestTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request (head and body) has not all arrived
    within ``request_timeout_s``: uvicorn times only the idle wait between requests (keep-alive), so a
    client that never finishes its request (slow loris) would hold a connection for ever. Built on h11
    explicitly, so installing httptools (uvicorn's "auto" choice) cannot drop the timer.

    The timer runs from the connection's opening, or a later request's first byte, until the whole
    request is parsed; never while the response is sent (a slow download) nor between requests.
    """

    request_timeout_s = 10.0
    _request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer = self.loop.call_later(self.request_timeout_s, self._request_timed_out)

    def handle_events(self) -> None:
        super().handle_events()
        # h11 stays IDLE until a request's head is complete: bytes in its buffer are a head under way.
        receiving = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if receiving and self._request_timer is None:
            self._request_timer = self.loop.call_later(self.request_timeout_s, self._request_timed_out)
        elif not receiving:
            self._cancel_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        self.transport.close()


class HttpServer:
    """One listener on its own thread: a part of the daemon (:class:`daemon.common.lifecycle.Part`) named ``name``."""

    def __init__(
        self,
        host: str,
        port: int,
        health: Health | None,
        api: DownloadApi | None = None,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        metrics: Callable[[], bytes] | None = None,
        status: Callable[[], str] | None = None,
        request_timeout_s: float = 10.0,
        name: str = "http",
        operator_routes: list[Route] | None = None,
    ):
        self.name = name
        # A class of this server's own: uvicorn builds the protocol itself, from the class alone.
        protocol = type("RequestTimeoutProtocol", (RequestTimeoutProtocol,), {"request_timeout_s": request_timeout_s})
        config = uvicorn.Config(
            build_app(health, api, metrics, status, operator_routes),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=protocol,
            ssl_certfile=str(tls_cert_file) if tls_cert_file else None,
            ssl_keyfile=str(tls_key_file) if tls_key_file else None,
        )
        self.scheme = "https" if tls_cert_file else "http"
        self.api = api
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="sprout-http", daemon=True)
        self.error: BaseException | None = None
        self.address: str | None = None  # host:port once started (the port chosen, with port 0)

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as err:  # uvicorn exits via SystemExit when it cannot bind
            self.error = err

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; raises OSError when it cannot (a port taken). ``address`` is then the bound one."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self._server.config.host}:{self._server.config.port}")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        """Close the listener and the connections (uvicorn waits for requests in flight); True once it has."""
        self._server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        return not self.alive()
