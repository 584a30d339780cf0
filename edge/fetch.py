"""Talking to a Sprout model server over HTTP: the latest manifest (conditional GET), and a model file, resumably.

Standard library only (urllib), so that the device package stays small. The
paths are those of docs/devices.md, served by ``sprout run`` and by any static
mirror of the registry folder:

- ``GET /v1/models/<model>/latest`` with ``If-None-Match``: 304 when nothing changed.
- ``GET /v1/models/<model>/latest.sig``: the 64-byte Ed25519 signature of those bytes.
- ``GET /v1/models/<model>/versions/<v>/model.tflite`` with ``Range: bytes=N-``
  to resume after a cut connection; a server that answers 200 instead of 206
  sends the whole file, and the download starts over.
- ``POST /v1/models/<model>/telemetry`` and ``.../field-photos``: a device's report and its
  photos for labelling (edge/telemetry.py, edge/field_photos.py).

Every failure is a :class:`FetchError` whose message says what failed and what
happens or what to do next. Nothing here decides whether to trust the bytes:
that is edge/trust.py's job, after the download.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge import __version__

USER_AGENT = f"sprout-edge/{__version__}"
CHUNK = 64 * 1024
# A manifest is a few KB; anything far larger is not one, and must not fill a small device's memory.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1024  # an Ed25519 signature is 64; edge/trust.py says what is wrong with another size
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class FetchError(Exception):
    """The server could not be reached or did not give what was asked; the message says what to do."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After of a 429 or 503), if it said


class Stopped(Exception):
    """The caller asked to stop (SIGTERM) in the middle of a download; the partial file is kept for resuming."""


@dataclass(frozen=True)
class Latest:
    document: bytes | None  # the manifest as served; None when the server answered 304 Not Modified
    etag: str | None

    @property
    def not_modified(self) -> bool:
        return self.document is None

    @property
    def body(self) -> bytes:
        """The manifest's bytes; only a 304 has none, and callers ask after handling it."""
        if self.document is None:
            raise FetchError("the server answered 304 Not Modified: no manifest was sent")
        return self.document


@dataclass
class Transfer:
    resumed_from: int  # bytes already on disk before the first request
    received: int = 0  # bytes that came over the network in this call
    requests: int = 0


class ModelServer:
    """One model on one server: ``base_url`` is e.g. ``http://10.0.0.5:8080`` (the paths start with /v1)."""

    def __init__(self, base_url: str, model: str, token: str | None = None, timeout_s: float = 30.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"server URL {base_url!r} must look like http://host:port or https://host")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_url = f"{self.base_url}/v1/models/{urllib.parse.quote(model, safe='')}/"
        self.token = token
        self.timeout_s = timeout_s
        self.identity: dict[str, str] = {}  # Sprout-Device and Sprout-Version, once the caller knows them

    def identify(self, device_id: str, running: int | None) -> None:
        """Tell the server, with every request, this device's opaque id and the version it runs: the
        operator sees which versions the fleet runs (counts only; docs/devices.md)."""
        self.identity = {"Sprout-Device": device_id, "Sprout-Version": str(running) if running is not None else "none"}

    def latest(self, etag: str | None = None) -> Latest:
        """The latest manifest, or ``Latest(None, etag)`` when it is still the one whose ETag is given."""
        headers = {"Accept": "application/json"}
        if etag:
            headers["If-None-Match"] = etag
        url = self.model_url + "latest"
        try:
            response = self._open(url, headers, what=f"the latest manifest of {self.model!r}")
        except FetchError as err:
            if err.status == 304:
                return Latest(None, etag)
            raise
        with response:
            document = _read_all(response, MAX_MANIFEST_BYTES, url)
            return Latest(document, response.headers.get("ETag"))

    def latest_signature(self) -> bytes:
        """``latest.sig``: the detached signature of the latest manifest (edge/trust.py checks it)."""
        url = self.model_url + "latest.sig"
        with self._open(
            url, {"Accept": "application/octet-stream"}, what=f"the signature of {self.model!r}'s latest manifest"
        ) as response:
            return _read_all(response, MAX_SIGNATURE_BYTES, url, "a signature")

    def download(
        self,
        path: str,
        partial: Path,
        size: int,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        attempts: int = 3,
    ) -> Transfer:
        """Bring ``partial`` to ``size`` bytes of the file at ``path`` (relative to the model's URL).

        Resumes what ``partial`` holds with a Range request, and again after a
        cut connection, up to ``attempts`` requests. Never writes past ``size``.
        Raises :class:`FetchError` (``partial`` kept when resuming can help, removed
        when it cannot) or :class:`Stopped`.
        """
        url = self.model_url + path
        what = f"{path} of {self.model!r}"
        transfer = Transfer(resumed_from=_size_of(partial))
        why_short = "no request made"
        while transfer.requests < attempts:
            have = _size_of(partial)
            if have > size:  # longer than the file can be: not a prefix of it
                partial.unlink()
                have = 0
            if have == size:
                return transfer
            transfer.requests += 1
            try:
                response = self._open(url, {"Range": f"bytes={have}-"} if have else {}, what)
            except FetchError as err:
                if err.status != 416:
                    raise
                # The server has fewer bytes than we do: our partial is not its file. Start over.
                partial.unlink(missing_ok=True)
                why_short = "the server could not resume (416)"
                continue
            with response:
                start = self._start_of(response, size, partial, what)
                with open(partial, "r+b" if start else "wb") as f:
                    f.seek(start)
                    f.truncate()
                    have, cut = self._copy(response, f, start, size, partial, on_progress, should_stop, transfer)
            if cut is None and have < size:
                cut = f"the server closed the connection after {have} of {size} bytes"
            if cut is not None:
                why_short = cut
        have = _size_of(partial)
        if have == size:
            return transfer
        raise FetchError(
            f"download of {what} cut short at {have} of {size} bytes after {transfer.requests} requests "
            f"({why_short}); {partial.name} is kept and the next sync resumes it"
        )

    def _start_of(self, response, size: int, partial: Path, what: str) -> int:
        """Where the body goes in the file: the Range start for a 206, 0 for a 200 (the whole file again)."""
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{what}: a 206 answer without a usable Content-Range; the next sync starts over")
            start, total, have = int(match.group(1)), match.group(3), _size_of(partial)
            if total != "*" and int(total) != size:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{what} is {total} bytes on the server, the manifest says {size}: refused")
            if start != have:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{what}: asked to resume at byte {have}, the server sent from {start}; starting over")
            return start
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != size:
            partial.unlink(missing_ok=True)
            raise FetchError(f"{what} is {length} bytes on the server, the manifest says {size}: refused")
        return 0

    @staticmethod
    def _copy(response, f, have: int, size: int, partial: Path, on_progress, should_stop, transfer: Transfer):
        """Copy the body into ``f`` from offset ``have``; (bytes now in the file, why it stopped short or None)."""
        while True:
            if should_stop is not None and should_stop():
                f.flush()
                raise Stopped(f"stopped at {have} of {size} bytes; {partial.name} is kept for the next sync")
            try:
                chunk = response.read(CHUNK)
            except (http.client.HTTPException, OSError) as err:  # reset, timeout, IncompleteRead
                f.flush()
                return have, f"connection lost after {have} of {size} bytes ({type(err).__name__}: {err})"
            if not chunk:
                f.flush()
                return have, None
            if have + len(chunk) > size:
                f.close()
                partial.unlink(missing_ok=True)
                raise FetchError(f"the server sent more than the {size} bytes the manifest names: refused")
            f.write(chunk)
            have += len(chunk)
            transfer.received += len(chunk)
            if on_progress is not None:
                on_progress(have, size)

    def report(self, body: bytes) -> tuple[int, dict]:
        """POST a device's report (edge/telemetry.py): the status (202 counted, 200 counted before) and the
        JSON answer; :class:`FetchError` with the status for a refusal or a server that cannot take it now."""
        return self._post("telemetry", body, f"a report on {self.model!r}")

    def send_photo(self, body: bytes) -> tuple[int, dict]:
        """POST a photo for labelling (edge/field_photos.py): the status (202 queued, 200 stored before) and the
        JSON answer; :class:`FetchError` with the status, and ``retry_after`` where the server gave one, for a
        refusal (400, 413), a device over its daily cap (429) or a server that cannot take it now (503)."""
        return self._post("field-photos", body, f"a photo for labelling of {self.model!r}")

    def _post(self, path: str, body: bytes, what: str) -> tuple[int, dict]:
        url = self.model_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        with self._open(url, headers, what, data=body) as response:
            answer = _read_all(response, MAX_MANIFEST_BYTES, url, "an answer")
            try:
                document = json.loads(answer)
            except ValueError:
                document = {}
            return response.status, document if isinstance(document, dict) else {}

    def _open(self, url: str, headers: dict[str, str], what: str, data: bytes | None = None):
        request = urllib.request.Request(url, data=data, headers={"User-Agent": USER_AGENT, **self.identity, **headers})
        if self.token:
            # Unredirected: a redirect to another host must not carry the token there.
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as err:
            with err:
                detail = _error_detail(err)
            wait = _retry_after(err.headers.get("Retry-After")) if err.headers is not None else None
            raise FetchError(self._why(err.code, err.reason, what, detail), err.code, wait) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise FetchError(
                f"cannot reach {self.base_url} for {what}: {reason}; check --url and the network"
            ) from None

    def _why(self, code: int, reason: str, what: str, detail: str) -> str:
        said = f"{code} {reason}" + (f": {detail}" if detail else "")
        if code == 304:
            return f"{what}: not modified"
        if code == 401:
            if self.token:
                return f"the server refused the token for {what} ({said}): check --token-file"
            return f"the server wants a bearer token for {what} ({said}): pass --token-file"
        if code == 403:
            return f"the server forbids {what} ({said}): check the token's rights"
        if code == 404:
            return f"{what} is not on {self.base_url} ({said}): check --url and --model, or wait for the first publish"
        if code == 429 or code >= 500:
            return f"the server could not give {what} now ({said}): it will be tried again"
        return f"the server answered {said} for {what}"


def _read_all(response, limit: int, url: str, kind: str = "a manifest") -> bytes:
    try:
        data = response.read(limit + 1)
    except (http.client.HTTPException, OSError) as err:
        raise FetchError(f"connection lost while reading {url}: {err}") from None
    if len(data) > limit:
        raise FetchError(f"{url} sent more than {limit} bytes: that is not {kind}")
    return data


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The ``error`` of a JSON error body (the daemon's 404 says what is missing), else nothing."""
    try:
        body = json.loads(err.read(4096))
    except (ValueError, OSError, http.client.HTTPException):
        return ""
    message = body.get("error") if isinstance(body, dict) else None
    return " ".join(str(message).split())[:200] if message else ""


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds, or an HTTP date; None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    if parsed[9] is None:  # HTTP dates are GMT; a server that leaves the zone out means it too
        parsed = (*parsed[:9], 0)
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
