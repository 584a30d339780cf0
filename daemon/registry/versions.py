"""The model registry: numbered, signed, never-changing versions of one model on disk.

Layout of ``<state_dir>/registry/<model>/``::

    <version>/model.tflite, labels.txt, manifest.json, manifest.json.sig   one folder per version
    latest      a byte copy of the latest version's manifest: the pointer and the document served
    latest.sig  a byte copy of that version's manifest.json.sig
    versions    JSON list of {version, created_at, quantization, pinned}, newest first
    pins        JSON list of pinned versions (retention never deletes them)
    log.jsonl   the model's history, one event per line with its time: published, rejected, rollback, pin,
                unpin, deleted, repaired, cleaned, signed, and label_renamed, label_merged, label_deleted
                (``sprout labels``, timed when the change was made)

Each manifest.json is signed as the bytes it is (Ed25519, detached: the 64
bytes of manifest.json.sig), so a device verifies what it received, as it
received it. ``latest.sig`` is written before ``latest``: a device that reads
the two across a publish sees a mismatch, reads ``latest`` again and finds it
changed (docs/devices.md).

A SIGKILL at any instant leaves ``latest`` naming a complete, signed version:
a version folder is built under ``.tmp-<version>-<pid>`` and renamed whole,
every other file is written under a ``.tmp-*`` name, fsynced and renamed, and
the constructor removes what a killed writer left and finishes a publish
killed after its version folder was in place. Writers take an flock on
``.lock`` for each change, so the daemon and ``sprout models rollback`` may
change one registry at the same time; readers (:meth:`Registry.open_readonly`)
take no lock and write nothing, since every name they read is swapped in by rename.

>>> import os, tempfile, pathlib
>>> from daemon.registry.signing import Signer
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> reg = Registry(root, "maize", Signer.load_or_create(root / "signing.key"), keep_versions=3)
>>> fields = {"base": "tiny", "labels": ["healthy", "rust"], "quantization": "int8", "metrics": {},
...           "input": {"shape": [1, 96, 96, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
...           "runtimes_verified": [{"name": "ai-edge-litert", "version": "2.3.0"}]}
>>> reg.publish(os.urandom(1000), fields)["version"], reg.publish(os.urandom(1000), fields)["version"]
(1, 2)
>>> reg.versions(), reg.latest()["files"]["model.tflite"]["path"]
([1, 2], 'versions/2/model.tflite')
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.registry.signing import SIGNATURE_SUFFIX, SignatureError, Signer, verify, verify_file
from daemon.store.labels import EVENTS, LabelChange
from edge.atomic import TMP_PREFIX, fsync_dir, write_atomic, write_new
from edge.manifest import INPUT_DTYPES, Quantization, is_image_shape

if TYPE_CHECKING:
    from daemon.common.settings import Settings

log = logging.getLogger("sprout.registry")

# 2: the signature left the manifest for manifest.json.sig (a schema-1 reader cannot check it).
SCHEMA = 2
QUANTIZATIONS = tuple(q.value for q in Quantization)
# What publish() takes from the exporter; the registry sets the rest (schema, model, version,
# created_at, files, signing_key_id) so that no caller can get them wrong.
FIELDS = ("base", "labels", "input", "quantization", "metrics", "runtimes_verified")
MANIFEST_KEYS = (
    "schema", "model", "version", "created_at", "base", "labels", "input", "quantization",
    "files", "metrics", "runtimes_verified", "signing_key_id",
)  # fmt: skip
MODEL_FILE, LABELS_FILE, MANIFEST_FILE = "model.tflite", "labels.txt", "manifest.json"
SIGNATURE_FILE = MANIFEST_FILE + SIGNATURE_SUFFIX
LATEST, VERSIONS, PINS, LOG, LOCK = "latest", "versions", "pins", "log.jsonl", ".lock"
LATEST_SIGNATURE = LATEST + SIGNATURE_SUFFIX

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_DIR = re.compile(r"^[1-9][0-9]*$")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says what to do."""


class NoRegistryError(RegistryError):
    """Nothing was ever published for this model here."""


class UnknownVersionError(RegistryError, LookupError):
    """The version asked for is not (or no longer) on disk."""


def registry_root(state_dir: Path) -> Path:
    return Path(state_dir) / "registry"


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-05-09T07:35:25.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_time(at: float) -> str:
    """Unix time ``at`` as :func:`utc_now` writes times."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON-clean copy of the exporter's ``fields``, or :class:`RegistryError` listing every problem."""
    if not isinstance(fields, dict):
        raise RegistryError(f"publish: fields must be a dict with {', '.join(FIELDS)}")
    missing = [k for k in FIELDS if k not in fields]
    extra = sorted(set(fields) - set(FIELDS))
    if missing or extra:
        raise RegistryError(
            f"publish: fields missing {missing}, unexpected {extra}; the exporter gives exactly {list(FIELDS)} "
            "(the registry sets schema, model, version, created_at, files and signing_key_id)"
        )
    try:
        body = json.loads(json.dumps(fields, allow_nan=False))
    except ValueError:
        raise RegistryError(
            "publish: fields contain NaN or Infinity (a metric?); the gates should reject such a model"
        ) from None
    except TypeError as err:
        raise RegistryError(f"publish: fields must be plain JSON data: {err}") from None

    problems = []
    if not isinstance(body["base"], str) or not body["base"]:
        problems.append("base must be the backbone's name")
    labels = body["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x and not set(x) & {"\n", "\r"} for x in labels)
    ):
        problems.append("labels must be a non-empty list of class names without line breaks (index = output index)")
    elif len(set(labels)) != len(labels):
        problems.append("labels must be unique")
    problems += _input_problems(body["input"])
    if body["quantization"] not in QUANTIZATIONS:
        problems.append(f"quantization must be one of {list(QUANTIZATIONS)}, not {body['quantization']!r}")
    if not isinstance(body["metrics"], dict):
        problems.append("metrics must be an object")
    runtimes = body["runtimes_verified"]
    if (
        not isinstance(runtimes, list)
        or not runtimes
        or not all(
            isinstance(r, dict) and set(r) == {"name", "version"} and all(isinstance(v, str) and v for v in r.values())
            for r in runtimes
        )
    ):
        problems.append("runtimes_verified must list at least one {name, version} (both non-empty strings)")
    if problems:
        raise RegistryError("publish: " + "; ".join(problems))
    return body


def _input_problems(spec: Any) -> list[str]:
    wanted = {"shape", "layout", "dtype", "range"}
    if not isinstance(spec, dict) or set(spec) != wanted:
        return [f"input must be an object with exactly {sorted(wanted)}"]
    problems = []
    shape = spec["shape"]
    if not is_image_shape(shape):
        problems.append(f"input.shape must be [1, H, W, 3], not {shape!r}")
    if spec["layout"] != "NHWC":
        problems.append("input.layout must be 'NHWC'")
    if spec["dtype"] not in INPUT_DTYPES:
        problems.append(f"input.dtype must be one of {list(INPUT_DTYPES)}")
    rng = spec["range"]
    if not (
        isinstance(rng, list)
        and len(rng) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)
        and rng[0] < rng[1]
    ):
        problems.append("input.range must be [low, high], e.g. [0, 255]")
    return problems


class Registry:
    """The versions of one model under ``root/<model>``; see the module docstring for the layout."""

    def __init__(
        self, root: Path, model: str, signer: Signer | None = None, keep_versions: int = 10, *, readonly: bool = False
    ):
        if not _NAME.match(model):
            raise RegistryError(f"model name {model!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if keep_versions < 1:
            raise RegistryError(f"keep_versions must be at least 1, not {keep_versions}")
        self.root = Path(root)
        self.model = model
        self.folder = self.root / model
        self.signer = signer
        self.keep_versions = keep_versions
        self.readonly = readonly
        if readonly:
            if not self.folder.is_dir():
                raise NoRegistryError(f"no registry at {self.folder}: nothing has been published for {model!r} yet")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._recover()

    @classmethod
    def open_readonly(cls, root: Path, model: str) -> Registry:
        """A registry that only reads: creates no folder or key, repairs nothing, takes no lock."""
        return cls(root, model, readonly=True)

    @classmethod
    def from_settings(cls, settings: Settings, *, create_key: bool = True) -> Registry:
        """The daemon's registry; ``create_key=False`` signs nothing new and never creates a key."""
        key_path = settings.signing.resolved_key_file(settings.state_dir)
        if create_key:
            signer: Signer | None = Signer.load_or_create(key_path)
        else:
            signer = Signer.load(key_path) if key_path.exists() else None
        return cls(registry_root(settings.state_dir), settings.model.name, signer, settings.registry.keep_versions)

    # Reading: never writes, safe beside a writer in another process.

    def versions(self) -> list[int]:
        """Versions on disk, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if _VERSION_DIR.match(n) and (self.folder / n).is_dir())

    def manifest(self, version: int) -> dict[str, Any]:
        path = self._dir(version) / MANIFEST_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._unknown(version) from None
        return _parse(data, path)

    def model_path(self, version: int) -> Path:
        path = self._dir(version) / MODEL_FILE
        if not path.is_file():
            raise self._unknown(version)
        return path

    def document(self, version: int) -> bytes:
        """manifest.json of ``version`` as stored and served: the bytes its signature covers."""
        try:
            return (self._dir(version) / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            raise self._unknown(version) from None

    def signature(self, version: int) -> bytes:
        """manifest.json.sig of ``version``: the Ed25519 signature of its manifest.json's bytes."""
        try:
            return (self._dir(version) / SIGNATURE_FILE).read_bytes()
        except FileNotFoundError:
            raise self._unknown(version) from None

    def latest(self) -> dict[str, Any] | None:
        """The latest manifest, or None before the first publish."""
        path = self.folder / LATEST
        try:
            return _parse(path.read_bytes(), path)
        except FileNotFoundError:
            return None

    def pins(self) -> list[int]:
        path = self.folder / PINS
        try:
            return sorted(int(v) for v in _parse(path.read_bytes(), path))
        except FileNotFoundError:
            return []

    def index(self) -> list[dict[str, Any]]:
        """What ``versions`` holds, computed from the folders: newest first."""
        pins = set(self.pins())
        out = []
        for v in reversed(self.versions()):
            try:
                m = self.manifest(v)
            except UnknownVersionError:  # deleted by retention while we listed
                continue
            out.append(
                {
                    "version": v,
                    "created_at": m.get("created_at"),
                    "quantization": m.get("quantization"),
                    "pinned": v in pins,
                }
            )
        return out

    def events(self) -> list[dict[str, Any]]:
        """The log, oldest first; a line cut short by a crash is skipped."""
        try:
            lines = (self.folder / LOG).read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    # Writing: each change holds the lock.

    def publish(
        self, tflite: bytes, fields: dict[str, Any], stamp: Callable[[bytes, int], bytes] | None = None
    ) -> dict[str, Any]:
        """Store ``tflite`` as the next version, make it ``latest``, apply retention; returns the manifest.

        ``stamp(tflite, version)``, when given, returns the bytes to store once the version number is
        known (the exporter writes it into the model's own metadata); it runs under the lock.
        """
        self._writable()
        if self.signer is None:
            raise RegistryError("publish: this registry has no signing key (build it with a Signer)")
        body = check_fields(fields)
        if not isinstance(tflite, (bytes, bytearray)) or not tflite:
            raise RegistryError("publish: the model must be non-empty bytes (the .tflite file's content)")
        tflite = bytes(tflite)
        with self._locked():
            version = self._next_version()
            if stamp is not None:
                tflite = bytes(stamp(tflite, version))
            digest = hashlib.sha256(tflite).hexdigest()
            manifest = {
                "schema": SCHEMA,
                "model": self.model,
                "version": version,
                "created_at": utc_now(),
                "base": body["base"],
                "labels": body["labels"],
                "input": body["input"],
                "quantization": body["quantization"],
                "files": {
                    MODEL_FILE: {"sha256": digest, "size": len(tflite), "path": f"versions/{version}/{MODEL_FILE}"}
                },
                "metrics": body["metrics"],
                "runtimes_verified": body["runtimes_verified"],
                # Informative only: which key to check with, said before a device has checked anything.
                "signing_key_id": self.signer.key_id,
            }
            document = _dump(manifest)
            signature = self.signer.sign(document)
            labels_txt = "".join(f"{label}\n" for label in body["labels"]).encode("utf-8")

            tmp = self.folder / f"{TMP_PREFIX}{version}-{os.getpid()}"
            tmp.mkdir()
            try:
                for name, data in (
                    (MODEL_FILE, tflite),
                    (LABELS_FILE, labels_txt),
                    (MANIFEST_FILE, document),
                    (SIGNATURE_FILE, signature),
                ):
                    write_new(tmp / name, data)
                fsync_dir(tmp)
                os.rename(tmp, self._dir(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(self.folder)
            # From here the version is complete on disk; switching latest is two renames (signature first).
            self._point_latest(version)
            self._write_versions()
            self._append_log(
                {
                    "event": "published",
                    "version": version,
                    "sha256": digest,
                    "size": len(tflite),
                    "quantization": body["quantization"],
                }
            )
            self._apply_retention()
        log.info("published %s version %d (%s, %d bytes)", self.model, version, body["quantization"], len(tflite))
        return manifest

    def record_rejection(self, fields: dict[str, Any], reasons: list[str]) -> None:
        """Log a candidate the gates refused; nothing else is kept."""
        self._writable()
        with self._locked():
            self._append_log(
                {"event": "rejected", "reasons": [str(r) for r in reasons], "candidate": _jsonable(fields)}
            )

    def record_label_changes(self, changes: Iterable[LabelChange]) -> list[LabelChange]:
        """Log the label changes the log lacks, each timed when it was made; returns those it logged.

        Known by change id and time (a store made afresh numbers its changes from 1 again), so that the
        command that makes a change and every export after it may all call this.
        """
        self._writable()
        with self._locked():
            logged = {(e.get("change"), e.get("time")) for e in self.events() if e.get("event") in EVENTS.values()}
            new = [c for c in changes if (c.id, utc_time(c.at)) not in logged]
            for c in new:
                into = {"into": c.into} if c.into is not None else {}
                self._append_log({"time": utc_time(c.at), "event": c.event, "change": c.id, "label": c.label, **into})
        return new

    def rollback(self, version: int) -> dict[str, Any]:
        """Make ``version`` the latest again, its manifest unchanged; returns that manifest."""
        self._writable()
        with self._locked():
            manifest = self.manifest(version)
            document = (self._dir(version) / MANIFEST_FILE).read_bytes()
            try:
                verify_file(manifest, self.model_path(version).read_bytes())
                signature = self.signature(version)
                if self.signer is not None:
                    verify(document, signature, self.signer.public_key)
            except SignatureError as err:
                raise RegistryError(f"version {version} cannot become latest: {err}; pick another version") from None
            before = self.latest()
            self._point_latest(version)
            self._append_log(
                {"event": "rollback", "version": version, "from": before.get("version") if before else None}
            )
        log.info("rolled %s back to version %d", self.model, version)
        return manifest

    def pin(self, version: int) -> bool:
        """Keep ``version`` through retention; False when it was pinned already."""
        self._writable()
        with self._locked():
            self.manifest(version)
            pins = self.pins()
            if version in pins:
                return False
            self._set_pins([*pins, version])
            self._append_log({"event": "pin", "version": version})
        return True

    def unpin(self, version: int) -> bool:
        """Let retention delete ``version`` again (at the next publish); False when it was not pinned."""
        self._writable()
        with self._locked():
            pins = self.pins()
            if version not in pins:
                if version not in self.versions():
                    raise self._unknown(version)
                return False
            self._set_pins([v for v in pins if v != version])
            self._append_log({"event": "unpin", "version": version})
        return True

    # Internals; the callers hold the lock.

    def _dir(self, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UnknownVersionError(f"version must be a positive integer, not {version!r}")
        return self.folder / str(version)

    def _unknown(self, version: int) -> UnknownVersionError:
        known = ", ".join(map(str, self.versions())) or "none"
        return UnknownVersionError(f"model {self.model!r} has no version {version} (on disk: {known})")

    def _writable(self) -> None:
        if self.readonly:
            raise RegistryError("this registry was opened read-only")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we are killed
            yield
        finally:
            os.close(fd)

    def _point_latest(self, version: int) -> None:
        """Serve ``version`` as latest: its signature, then its manifest, each a byte copy swapped in by rename."""
        where = self._dir(version)
        if (where / SIGNATURE_FILE).exists():  # absent only in a schema-1 registry opened without its key
            write_atomic(self.folder / LATEST_SIGNATURE, (where / SIGNATURE_FILE).read_bytes())
        write_atomic(self.folder / LATEST, (where / MANIFEST_FILE).read_bytes())

    def _next_version(self) -> int:
        # The log remembers versions whose folders retention deleted, so numbers never come back.
        seen = self.versions()
        seen += [e["version"] for e in self.events() if isinstance(e.get("version"), int)]
        latest = self._latest_or_none()
        if latest is not None and isinstance(latest.get("version"), int):
            seen.append(latest["version"])
        return max(seen, default=0) + 1

    def _latest_or_none(self) -> dict[str, Any] | None:
        try:
            return self.latest()
        except RegistryError:
            return None

    def _append_log(self, event: dict[str, Any]) -> None:
        line = json.dumps({"time": utc_now(), **event}, ensure_ascii=False, allow_nan=False)
        fd = os.open(self.folder / LOG, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            # A writer killed mid-line left no newline: start afresh rather than glue two events together.
            prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
            os.write(fd, prefix + line.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _set_pins(self, pins: list[int]) -> None:
        write_atomic(self.folder / PINS, _dump(sorted(set(pins))))
        self._write_versions()

    def _write_versions(self) -> None:
        write_atomic(self.folder / VERSIONS, _dump(self.index()))

    def _apply_retention(self) -> None:
        versions = self.versions()
        latest = self._latest_or_none()
        keep = set(versions[-self.keep_versions :]) | set(self.pins())
        if latest is not None:
            keep.add(latest.get("version"))
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            # Renamed out of sight first, so no reader ever sees a half-deleted version;
            # a kill during rmtree leaves a .tmp-* folder that the next writer removes.
            trash = self.folder / f"{TMP_PREFIX}deleted-{v}-{os.getpid()}"
            os.rename(self._dir(v), trash)
            self._append_log(
                {"event": "deleted", "version": v, "reason": f"retention: keep_versions={self.keep_versions}"}
            )
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            fsync_dir(self.folder)
            self._write_versions()

    def _recover(self) -> None:
        """Undo what a killed writer left: temporaries, a missing or dangling ``latest``, a stale ``versions``."""
        stale = sorted(p.name for p in self.folder.iterdir() if p.name.startswith(TMP_PREFIX))
        for name in stale:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if stale:
            self._append_log({"event": "cleaned", "removed": stale})
            log.warning("registry %s: removed %d leftovers of an interrupted write: %s", self.folder, len(stale), stale)

        self._sign_unsigned_versions()
        problem = self._latest_problem()
        if problem is not None:
            self._repair_latest(problem)
        self._finish_interrupted_publish()

        current = self.index()
        try:
            on_disk = json.loads((self.folder / VERSIONS).read_bytes())
        except (FileNotFoundError, ValueError):
            on_disk = None
        if on_disk != current and (on_disk is not None or current):
            write_atomic(self.folder / VERSIONS, _dump(current))

    def _sign_unsigned_versions(self) -> None:
        """Give each version that lacks manifest.json.sig one, over its manifest's bytes as they are.

        Registries written before signatures were detached (schema 1) carried the signature inside
        the manifest; this Sprout's devices check only manifest.json.sig. Without a signing key
        (a read-only command) nothing is signed and such versions stay unservable.
        """
        if self.signer is None:
            return
        for version in self.versions():
            where = self._dir(version)
            if (where / SIGNATURE_FILE).exists() or not (where / MANIFEST_FILE).is_file():
                continue
            write_atomic(where / SIGNATURE_FILE, self.signer.sign((where / MANIFEST_FILE).read_bytes()))
            self._append_log(
                {
                    "event": "signed",
                    "version": version,
                    "key_id": self.signer.key_id,
                    "reason": "manifest.json.sig was missing (a registry from before detached signatures)",
                }
            )
            log.info("registry %s: signed version %d's manifest as it is (manifest.json.sig)", self.folder, version)

    def _finish_interrupted_publish(self) -> None:
        """Complete a publish killed after its version folder was renamed into place (that rename commits it).

        Without this, a kill between the rename and the log left a verified version on disk that was
        never made latest (or was served as latest) and that the log did not know of.
        """
        events = self.events()
        logged = {e.get("version") for e in events if e.get("event") == "published"}
        newest_known = max((e["version"] for e in events if isinstance(e.get("version"), int)), default=0)
        for version in self.versions():
            if version in logged:
                continue
            try:
                manifest = self.manifest(version)
                tflite = self.model_path(version).read_bytes()
                verify_file(manifest, tflite)
            except (RegistryError, SignatureError):
                continue  # not one of ours to finish: left as it is, never made latest
            latest = self._latest_or_none()
            # Newer than anything the log knows, rollbacks included: it was meant to be latest.
            if version > newest_known and (latest is None or latest.get("version") != version):
                self._point_latest(version)
            self._append_log(
                {
                    "event": "published",
                    "version": version,
                    "sha256": hashlib.sha256(tflite).hexdigest(),
                    "size": len(tflite),
                    "quantization": manifest.get("quantization"),
                    "recovered": "the publishing process stopped after the version was complete",
                }
            )
            log.warning("registry %s: finished the interrupted publish of version %d", self.folder, version)

    def _latest_problem(self) -> str | None:
        path = self.folder / LATEST
        if not path.exists():
            return None if not self.versions() else "latest is missing"
        try:
            document = path.read_bytes()
            latest = _parse(document, path)
            version = latest["version"]
            verify_file(latest, self.model_path(version).read_bytes())
            if document != (self._dir(version) / MANIFEST_FILE).read_bytes():
                return f"latest is not a copy of version {version}'s manifest"
            if not (self._dir(version) / SIGNATURE_FILE).exists() and self.signer is None:
                return None  # a schema-1 registry opened without its key: the daemon signs it, not us
            if (self.folder / LATEST_SIGNATURE).read_bytes() != self.signature(version):
                return f"latest.sig is not version {version}'s signature"
        except FileNotFoundError as err:
            return f"{Path(err.filename).name} is missing"
        except (RegistryError, SignatureError, KeyError, TypeError) as err:
            return f"latest is unusable: {err}"
        return None

    def _repair_latest(self, problem: str) -> None:
        # The version latest names first (a rollback stays a rollback), then the newest complete one.
        named = self._latest_or_none()
        named = named.get("version") if isinstance(named, dict) else None
        versions = self.versions()
        for version in [v for v in versions if v == named] + [v for v in reversed(versions) if v != named]:
            try:
                manifest = self.manifest(version)
                verify_file(manifest, self.model_path(version).read_bytes())
                if self.signer is not None:
                    self.signature(version)
            except (RegistryError, SignatureError):
                continue
            self._point_latest(version)
            self._append_log({"event": "repaired", "version": version, "reason": problem})
            log.warning("registry %s: %s; latest is now version %d", self.folder, problem, version)
            return
        (self.folder / LATEST).unlink(missing_ok=True)
        (self.folder / LATEST_SIGNATURE).unlink(missing_ok=True)
        self._append_log({"event": "repaired", "version": None, "reason": f"{problem}; no complete version left"})
        log.error("registry %s: %s and no complete version is left; nothing is served", self.folder, problem)


def _parse(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise RegistryError(f"{path}: not valid JSON ({err}); the registry's writer repairs it on start") from None


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON for the log: a rejected candidate may well carry a NaN metric."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
