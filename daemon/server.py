"""The daemon's HTTP side, on Starlette and uvicorn: for now the health check.

uvicorn runs in its own thread with its own event loop; it installs no signal
handlers off the main thread, so the Daemon keeps sole control of signals.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("sprout.server")

Health = Callable[[], dict[str, bool]]


def build_app(health: Health) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        parts = health()
        return JSONResponse(parts, status_code=200 if all(parts.values()) else 503)

    return Starlette(routes=[Route("/healthz", healthz)])


class HttpServer:
    def __init__(self, host: str, port: int, health: Health):
        config = uvicorn.Config(
            build_app(health), host=host, port=port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="sprout-http", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as err:  # uvicorn exits via SystemExit when it cannot bind
            self.error = err

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving; returns the bound address (useful with port 0)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self._server.config.host}:{self._server.config.port}")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
