"""The daemon's real download API (daemon/distribution/http.py over a real registry folder), behind a link that
misbehaves as a phone's does, for the device's sync tests.

The faults sit in an ASGI layer between uvicorn and the real app, so every answer the device gets is
the server's own (ETags, 304, Range and 206, the token check, the JSON errors) unless a test says
otherwise:

- ``cut_after`` bytes of a model download, ``cuts`` times: the connection closes mid-body;
- ``ignore_range``: the Range header never reaches the server (a proxy that drops it), so 200 and
  the whole file come back;
- ``substitute``: other bytes for a URL path (a mirror or a cache serving something else);
- ``before``: a function run once, before the first answer to a URL path (a publish between two
  requests of one sync).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from daemon.distribution.http import DownloadApi, RequestTimeoutProtocol, build_app


class CutConnection(Exception):
    """Raised inside the ASGI layer to make uvicorn drop a connection mid-body."""


class FaultyLink:
    def __init__(self, registry_root: Path, token: str | None = None):
        self.cut_after: int | None = None
        self.cuts = 0
        self.ignore_range = False
        self.substitute: dict[str, bytes] = {}
        self.before: dict[str, Callable[[], object]] = {}
        self.requests: list[dict[str, Any]] = []
        self.url = ""  # known once started
        self.api = DownloadApi(registry_root, token)  # its fleet counts what was downloaded
        self.app = build_app(None, self.api)
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=0,
            log_level="critical",
            lifespan="off",
            access_log=False,
            http=RequestTimeoutProtocol,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)

    def start(self) -> FaultyLink:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the download API did not start"
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def model_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/model.tflite")]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = {
            "path": path,
            "range": headers.get("range"),
            "if_none_match": headers.get("if-none-match"),
            "status": None,
            "sent": 0,
        }
        self.requests.append(record)
        if (hook := self.before.pop(path, None)) is not None:
            hook()
        if self.ignore_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
        if path in self.substitute:
            return await self._send_substitute(self.substitute[path], record, send)
        cut = self.cut_after if self.cuts > 0 and path.endswith("/model.tflite") else None

        async def observed(message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if cut is not None and record["sent"] + len(body) > cut:
                    self.cuts -= 1
                    await send({"type": "http.response.body", "body": body[: cut - record["sent"]], "more_body": True})
                    record["sent"] = cut
                    raise CutConnection(f"cut after {cut} bytes")
                record["sent"] += len(body)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except CutConnection:
            pass  # uvicorn sees a response shorter than its Content-Length and closes the connection

    @staticmethod
    async def _send_substitute(data: bytes, record: dict[str, Any], send) -> None:
        record["status"], record["sent"] = 200, len(data)
        headers = [
            (b"content-length", str(len(data)).encode()),
            (b"content-type", b"application/octet-stream"),
            (b"etag", f'"{hashlib.sha256(data).hexdigest()}"'.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})
