"""``sprout serve``: the model download API over a registry folder, read-only, any number of them.

The distribution tier of a deployment past one machine (docs/scale.md): the exporter publishes into the
registry on shared storage, and each ``sprout serve`` answers the devices' GET requests from it, as the
daemon's own API does (same routes, ETags, bearer token and TLS, from ``[server]``). It writes nothing,
loads no torch and opens no store or broker session; it needs read access to ``STATE/registry`` only.
/healthz answers 200 while the registry's folder is readable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from daemon.cli.flags import LOG_LEVELS, load_settings
from daemon.common import logs
from daemon.common.exits import Exit
from daemon.common.settings import ConfigError

log = logging.getLogger("sprout.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the registry's models over HTTP, read-only (more download servers; docs/scale.md)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, help="TOML config file: [server] is read (address, TLS, token)")
    serve.add_argument("--state", type=Path, help="the state folder whose registry/ is served (overrides state_dir)")
    serve.add_argument("--http", help="HOST:PORT to listen on (overrides server.http)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="overrides logging.level (default INFO)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.distribution.http import DownloadApi, HttpServer
    from daemon.registry.versions import registry_root

    settings = load_settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    server = settings.server
    root = registry_root(settings.state_dir)
    try:
        token = server.resolved_token()
    except OSError as err:
        raise ConfigError(f"server.token_file: cannot read {server.token_file}: {err.strerror}") from None

    def health() -> dict[str, bool]:
        return {"registry": root.is_dir() and os.access(root, os.R_OK | os.X_OK)}

    http = HttpServer(
        server.host,
        server.port,
        health=health,
        api=DownloadApi(root, token),
        tls_cert_file=server.tls_cert_file,
        tls_key_file=server.tls_key_file,
        request_timeout_s=server.request_timeout_s,
        name="serve",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http.start()
    except OSError as err:  # the port is taken, say
        log.error("cannot start: %s", err)
        return Exit.UNAVAILABLE
    if not health()["registry"]:
        log.warning("%s is not there (yet): every model answers 404 until the exporter publishes", root)
    log.info("serving the models of %s read-only on %s://%s", root, http.scheme, http.address)
    while not stop.wait(1.0):
        if not http.alive():
            log.error("the HTTP server stopped")
            return Exit.SOFTWARE
    http.stop(time.monotonic() + 5)
    log.info("stopped")
    return Exit.OK
