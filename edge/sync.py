"""Keeping a device's model current: fetch the latest manifest, download, verify, swap atomically.

One :func:`sync` is, in order (docs/devices.md tells app developers the same):

1. ``GET latest`` with the remembered ETag; 304 means nothing to do.
2. ``GET latest.sig`` and check the publisher's Ed25519 signature over the
   manifest's bytes as received, before reading them (skipped only with
   ``--insecure``). A signature that does not match while ``latest`` has
   changed meanwhile was a publish between the two requests: both are read
   again. Then check that the manifest is a schema this client reads, for the
   model asked for, and that its file path is its own version's.
3. Already installed (the same version, or the previous one after a rollback
   by the publisher): point ``current`` at it, nothing to download.
4. When the manifest lists a delta from the installed version (and the installed
   file still matches its manifest), download that instead (resumable too),
   check its sha256, apply it with the installed file as dictionary into
   ``.partial-<v>`` (edge/delta.py); on any failure, say why and fall back to:
   download ``model.tflite`` into ``.partial-<v>``, resuming with ``Range``.
5. Check its size and sha256 against the signed manifest, and that it loads
   and runs on this device's interpreter with the tensors the manifest names.
6. Install it whole under ``versions/<v>`` and swap ``current`` (edge/modeldir.py).

Nothing unverified is ever installed; on any failure the installed model stays
current and the result says why. edge/watch.py repeats it on a poll interval,
at once when a retained MQTT notice announces another version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.delta import DeltaError, apply
from edge.fetch import FetchError, Latest, ModelServer, Stopped
from edge.manifest import Delta, ManifestError, check, delta_from, file_entry
from edge.model import EdgeModel, ModelError
from edge.modeldir import FolderBusy, ModelDir, NoModelInstalled
from edge.runtime import RuntimeUnavailable
from edge.trust import SignatureError, check_digest, file_sha256, load_public_key, verify_document

log = logging.getLogger("sprout.edge.sync")

# Event kinds, in the order one download produces them.
STARTED, PROGRESS, COMPLETED, FAILED = "started", "progress", "completed", "failed"
# Result statuses.
INSTALLED, UNCHANGED, REFUSED, STOPPED = "installed", "unchanged", "failed", "stopped"
# How the new model file came: whole, or as a delta applied to the installed one.
FULL, DELTA = "full", "delta"
PROGRESS_LOG_EVERY_S = 2.0
# Pairs of latest + latest.sig read before a mismatch is taken for a bad signature rather than a publish
# between the two requests (one publish every few seconds at most: two reads nearly always suffice).
SIGNED_READS = 3


@dataclass(frozen=True)
class Event:
    kind: str  # started | progress | completed | failed
    model: str
    version: int | None  # the version being installed; None when the manifest was not read
    received: int = 0  # bytes of the file being downloaded on disk so far (model.tflite, or its delta)
    total: int = 0  # its size, from the manifest
    reason: str | None = None  # why it failed
    transfer: str | None = None  # full | delta: what is (started, progress) or was (completed) downloaded
    downloaded: int = 0  # completed: bytes that came over the network for this version


@dataclass(frozen=True)
class SyncResult:
    status: str  # installed | unchanged | failed | stopped
    current: int | None  # the version current when the sync ended
    previous: int | None = None  # the version current before, when one was installed
    reason: str | None = None  # why it failed or stopped
    downloaded: int = 0  # bytes that came over the network (a failed delta's included)
    kind: str | None = None  # installed from a download: full (the whole file) or delta

    @property
    def ok(self) -> bool:
        return self.status in (INSTALLED, UNCHANGED)


class _Refused(Exception):
    """A step of the sync failed; carries the version it was about."""

    def __init__(self, reason: str, version: int | None):
        super().__init__(reason)
        self.version = version


class _NothingPublished(_Refused):
    """The server knows the model and has published no version of it yet: a device waits, it is not failing."""


def sync(
    url: str,
    model: str,
    dir: Path | str,
    public_key: Any = None,
    token: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    *,
    runtime: str | None = "auto",
    should_stop: Callable[[], bool] | None = None,
    timeout_s: float = 30.0,
) -> SyncResult:
    """Bring ``dir`` to the latest version of ``model`` served at ``url``.

    A failed sync is a result with the reason, never an exception; only bad arguments raise (ValueError for
    the URL, :class:`edge.trust.SignatureError` for an unreadable public key).

    ``public_key``: the publisher's signing.pub (path, PEM or key); without it signatures are not checked.
    ``runtime``: the interpreter a new model must load and run on before it is swapped in: a runtime name,
    ``"auto"`` (the first installed; skipped when there is none, as on a device that only relays models),
    or None to skip the check.
    """
    emit = _Emitter(model, on_event)
    folder = ModelDir(dir)
    server = ModelServer(url, model, token, timeout_s)
    key = load_public_key(public_key) if public_key is not None else None
    if key is None:  # `sprout-edge sync --insecure`: said at every sync, not once
        log.warning(
            "model %s: signatures are NOT checked (no public key): whoever answers at %s decides what runs here",
            model,
            url,
        )
    current = current_version(folder, warn=True)
    try:
        with folder.lock():
            # Read again under the lock: another sync may have swapped versions since the line above.
            running = current_version(folder)
            server.identify(folder.device_id(), running)
            return _sync(server, folder, running, key, emit, runtime, should_stop)
    except FolderBusy as err:
        return emit.failed(str(err), None, current)
    except _NothingPublished as err:
        return emit.waiting(str(err), current)
    except _Refused as err:
        return emit.failed(str(err), err.version, current_version(folder))
    except OSError as err:  # the folder itself: permissions, a full or read-only disk
        return emit.failed(f"cannot use {folder.root}: {err}", None, current_version(folder))
    except Stopped as err:
        log.info("model %s: %s", model, err)
        return SyncResult(STOPPED, current, reason=str(err))


def current_version(folder: ModelDir, warn: bool = False) -> int | None:
    try:
        return folder.current()
    except NoModelInstalled as err:  # an unreadable pointer: installing a version repairs it
        if warn:
            log.warning("%s", err)
        return None


def _sync(
    server: ModelServer, folder: ModelDir, current: int | None, key, emit: _Emitter, runtime, should_stop
) -> SyncResult:
    try:
        latest = server.latest(folder.etag_for(current) if current is not None else None)
    except FetchError as err:
        # The daemon's own words for a model that exists with no version yet (daemon/distribution/http.py).
        if err.status == 404 and "nothing published yet" in str(err):
            raise _NothingPublished(str(err), None) from None
        raise _Refused(str(err), None) from None
    if latest.not_modified:
        log.debug("model %s: version %s is still the latest (304)", server.model, current)
        return SyncResult(UNCHANGED, current)

    latest, signature = _signed(server, latest, key)
    manifest, version = _trusted_manifest(latest.body, server.model)
    path, size, sha256 = file_entry(manifest)
    if folder.holds(version, latest.body, size, sha256, signature):
        # The same version again, or one still kept (the publisher rolled back): no download.
        previous = folder.activate(version) if version != current else None
        folder.remember_etag(latest.etag, version)
        if version == current:
            return SyncResult(UNCHANGED, current)
        emit.completed(version, previous, 0, size)
        return SyncResult(INSTALLED, version, previous)

    folder.tidy(downloading=version)
    partial = folder.partial(version)
    kind, downloaded = FULL, 0
    try:
        delta = _usable_delta(folder, manifest, current) if not partial.exists() else None
        if delta is not None:  # a full download under way is resumed instead: its bytes are already here
            patched, downloaded = _patch(server, folder, manifest, delta, emit, should_stop)
            kind = DELTA if patched else FULL
        if kind == FULL:
            emit.started(version, size, partial.stat().st_size if partial.exists() else 0)
            downloaded += server.download(path, partial, size, emit.progress(version), should_stop).received
        received, digest = file_sha256(partial)
        try:
            check_digest(manifest, received, digest)
        except SignatureError:
            partial.unlink(missing_ok=True)  # not a prefix of the right file either: do not resume from it
            raise
        _check_runs(manifest, partial, runtime)
        previous = folder.install(version, partial, latest.body, manifest["labels"], signature)
        folder.remember_etag(latest.etag, version)
    except (FetchError, SignatureError, ModelError) as err:
        raise _Refused(f"version {version}: {err}", version) from None
    except OSError as err:
        raise _Refused(f"version {version}: cannot write {folder.root}: {err}", version) from None
    emit.completed(version, previous, downloaded, size, kind)
    return SyncResult(INSTALLED, version, previous, downloaded=downloaded, kind=kind)


def _usable_delta(folder: ModelDir, manifest: dict[str, Any], current: int | None) -> Delta | None:
    """The manifest's delta from the installed version, when it lists one and the installed file is intact."""
    if current is None:
        return None
    delta = delta_from(manifest, current)
    if delta is None:
        return None
    if folder.intact_model(current) is None:
        log.warning(
            "model %s: version %d's installed file does not match its manifest: no delta, full download",
            manifest["model"],
            current,
        )
        return None
    return delta


def _patch(
    server: ModelServer, folder: ModelDir, manifest: dict[str, Any], delta: Delta, emit: _Emitter, should_stop
) -> tuple[bool, int]:
    """Download ``delta`` and apply it into the version's partial file; (whether it did, bytes received).

    Every failure is said at WARNING and ends with no partial file, for the full download to start
    clean; only a stop (SIGTERM) propagates, leaving the delta's partial file to resume.
    """
    version = manifest["version"]
    _, size, sha256 = file_entry(manifest)
    staging = folder.delta_partial(version, delta.base)
    partial = folder.partial(version)
    resumed_from = staging.stat().st_size if staging.exists() else 0
    emit.started(version, delta.size, resumed_from, DELTA)
    received = 0
    try:
        transfer = server.download(delta.path, staging, delta.size, emit.progress(version, DELTA), should_stop)
        received = transfer.received
        if file_sha256(staging) != (delta.size, delta.sha256):
            raise DeltaError("its sha256 is not the one the signed manifest lists")
        old = folder.intact_model(delta.base)
        if old is None:
            raise DeltaError(f"version {delta.base}'s installed file changed meanwhile")
        new = apply(old.read_bytes(), staging.read_bytes(), size)
        if hashlib.sha256(new).hexdigest() != sha256:
            raise DeltaError("the patched file's sha256 is not the model file's in the signed manifest")
        with open(partial, "wb") as f:
            f.write(new)
    except Stopped:
        raise  # the delta's partial file stays: the next sync resumes it
    except (FetchError, DeltaError, OSError) as err:
        log.warning(
            "model %s: the delta from version %d to %d failed (%s); downloading the full file",
            manifest["model"],
            delta.base,
            version,
            err,
        )
        if not received and staging.exists():  # a download that failed part-way still used the network
            received = max(0, staging.stat().st_size - resumed_from)
        partial.unlink(missing_ok=True)
        staging.unlink(missing_ok=True)
        return False, received
    staging.unlink(missing_ok=True)
    log.info(
        "model %s: version %d from a %d-byte delta of version %d", manifest["model"], version, delta.size, delta.base
    )
    return True, received


def _signed(server: ModelServer, latest: Latest, key) -> tuple[Latest, bytes | None]:
    """``latest`` (or a newer one) with its signature, checked over the bytes as received; None without a key."""
    if key is None:
        return latest, None
    for _ in range(SIGNED_READS):
        try:
            signature = server.latest_signature()
        except FetchError as err:
            raise _Refused(f"cannot check the latest manifest: {err}", None) from None
        try:
            verify_document(latest.body, signature, key)
            return latest, signature
        except SignatureError as err:
            mismatch = err
        try:
            again = server.latest()
        except FetchError as err:
            raise _Refused(f"cannot check the latest manifest: {err}", None) from None
        if again.document == latest.document:
            break  # the same document, and its signature does not match it: refused
        latest = again  # published between our two requests: check the new pair
    raise _Refused(f"refused the latest manifest: {mismatch}", None)


def _trusted_manifest(document: bytes, model: str) -> tuple[dict[str, Any], int]:
    """The manifest's fields, checked (its signature, when there is a key, was checked on its bytes already)."""
    try:
        manifest = json.loads(document)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise _Refused(f"the latest manifest is not JSON ({err}): the server sent something else", None) from None
    version = manifest.get("version") if isinstance(manifest.get("version"), int) else None
    try:
        check(manifest, model)
    except ManifestError as err:
        raise _Refused(
            f"refused the latest manifest{f' (version {version})' if version else ''}: {err}", version
        ) from None
    return manifest, manifest["version"]


def _check_runs(manifest: dict[str, Any], partial: Path, runtime: str | None) -> None:
    """Load the new model on this device's interpreter and run one image: a model that cannot run here stays out."""
    if runtime is None:
        return
    try:
        loaded = EdgeModel.from_parts(manifest, partial.read_bytes(), None if runtime == "auto" else runtime, threads=1)
    except RuntimeUnavailable as err:
        if runtime != "auto":
            raise ModelError(str(err)) from None
        log.info("no interpreter installed here: version %s was not test-run before installing", manifest["version"])
        return
    loaded.check()
    verified = {str(r.get("name")) for r in manifest.get("runtimes_verified", []) if isinstance(r, dict)}
    if loaded.runtime not in verified:
        log.warning(
            "version %s was verified by the publisher on %s, not on %s; it loaded and ran here",
            manifest["version"],
            ", ".join(sorted(verified)) or "nothing",
            loaded.runtime,
        )


class _Emitter:
    """Events to the caller's callback, and the same as log lines."""

    def __init__(self, model: str, on_event: Callable[[Event], None] | None):
        self.model = model
        self.on_event = on_event

    def _send(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def started(self, version: int, total: int, resume_at: int, kind: str = FULL) -> None:
        what = "the delta to version" if kind == DELTA else "version"
        if resume_at:
            log.info("model %s: resuming %s %d at byte %d of %d", self.model, what, version, resume_at, total)
        else:
            log.info("model %s: downloading %s %d (%d bytes)", self.model, what, version, total)
        self._send(Event(STARTED, self.model, version, resume_at, total, transfer=kind))

    def progress(self, version: int, kind: str = FULL) -> Callable[[int, int], None]:
        last_logged = time.monotonic()

        def report(received: int, total: int) -> None:
            nonlocal last_logged
            if time.monotonic() - last_logged >= PROGRESS_LOG_EVERY_S:
                last_logged = time.monotonic()
                log.info("model %s: version %d: %d of %d bytes", self.model, version, received, total)
            self._send(Event(PROGRESS, self.model, version, received, total, transfer=kind))

        return report

    def completed(
        self, version: int, previous: int | None, downloaded: int, total: int, kind: str | None = None
    ) -> None:
        was = f"was {previous}" if previous is not None else "the first"
        how = f" ({kind})" if kind else ""
        log.info(
            "model %s: version %d installed and current (%s); %d bytes downloaded%s",
            self.model,
            version,
            was,
            downloaded,
            how,
        )
        self._send(Event(COMPLETED, self.model, version, total, total, transfer=kind, downloaded=downloaded))

    def waiting(self, reason: str, current: int | None) -> SyncResult:
        """Nothing published yet: said at INFO (a new deployment is not an error); still not a success."""
        log.info("model %s: nothing published yet; waiting for the first version (%s)", self.model, reason)
        self._send(Event(FAILED, self.model, None, reason=reason))
        return SyncResult(REFUSED, current, reason=reason)

    def failed(self, reason: str, version: int | None, current: int | None) -> SyncResult:
        stays = f"version {current} stays current" if current is not None else "no model is installed yet"
        log.error("model %s: sync failed: %s; %s", self.model, reason, stays)
        self._send(Event(FAILED, self.model, version, reason=reason))
        return SyncResult(REFUSED, current, reason=reason)
