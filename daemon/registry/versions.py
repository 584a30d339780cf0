"""The model registry: numbered, signed, never-changing versions of one model on disk (files: layout.py).

Each manifest.json is signed as the bytes it is (Ed25519, detached: the 64
bytes of manifest.json.sig), so a device verifies what it received, as it
received it. ``latest.sig`` is written before ``latest``: a device that reads
the two across a publish sees a mismatch, reads ``latest`` again and finds it
changed (docs/devices.md).

A SIGKILL at any instant leaves ``latest`` naming a complete, signed version:
a version folder (with its download deltas, deltas.py) is built under
``.tmp-<version>-<pid>`` and renamed whole,
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
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.registry import history
from daemon.registry import rollout as staged
from daemon.registry.deltas import make_deltas
from daemon.registry.fields import check_fields, manifest_of
from daemon.registry.layout import (
    LABELS_FILE,
    LATEST,
    LATEST_SIGNATURE,
    LOCK,
    LOG,
    MANIFEST_FILE,
    MODEL_FILE,
    MODEL_NAME,
    PINS,
    SIGNATURE_FILE,
    VERSION_DIR,
    VERSIONS,
    NoRegistryError,
    RegistryError,
    UnknownVersionError,
    dump,
    jsonable,
    parse,
    registry_root,
    utc_now,
    utc_time,
)
from daemon.registry.repair import recover
from daemon.registry.retention import apply_retention
from daemon.registry.signing import SignatureError, Signer, verify, verify_file
from daemon.store.labels import EVENTS, LabelChange
from edge.atomic import TMP_PREFIX, fsync_dir, write_atomic, write_new

if TYPE_CHECKING:
    from daemon.common.settings import RegistrySettings, Settings, SigningSettings

log = logging.getLogger("sprout.registry")

__all__ = ["NoRegistryError", "Registry", "RegistryError", "UnknownVersionError", "registry_root", "utc_time"]


class Registry:
    """The versions of one model under ``root/<model>``; see the module docstring for the layout."""

    def __init__(
        self,
        root: Path,
        model: str,
        signer: Signer | None = None,
        keep_versions: int = 10,
        *,
        readonly: bool = False,
        delta_from_versions: int = 3,
    ):
        if not MODEL_NAME.match(model):
            raise RegistryError(f"model name {model!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if keep_versions < 1:
            raise RegistryError(f"keep_versions must be at least 1, not {keep_versions}")
        self.root = Path(root)
        self.model = model
        self.folder = self.root / model
        self.signer = signer
        self.keep_versions = keep_versions
        if delta_from_versions < 0:
            raise RegistryError(f"delta_from_versions must be 0 or more, not {delta_from_versions}")
        self.delta_from_versions = delta_from_versions
        self.readonly = readonly
        if readonly:
            if not self.folder.is_dir():
                raise NoRegistryError(f"no registry at {self.folder}: nothing has been published for {model!r} yet")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            recover(self)

    @classmethod
    def open_readonly(cls, root: Path, model: str) -> Registry:
        """A registry that only reads: creates no folder or key, repairs nothing, takes no lock."""
        return cls(root, model, readonly=True)

    @classmethod
    def from_settings(cls, settings: Settings, *, create_key: bool = True) -> Registry:
        """The daemon's registry; ``create_key=False`` signs nothing new and never creates a key."""
        return cls.of_model(settings.state_dir, settings.model.name, settings.registry, settings.signing, create_key)

    @classmethod
    def of_model(
        cls,
        state_dir: Path,
        model: str,
        registry: RegistrySettings,
        signing: SigningSettings,
        create_key: bool = True,
    ) -> Registry:
        """``model``'s registry in ``state_dir`` from the two sections it needs (what an export process has)."""
        key_path = signing.resolved_key_file(state_dir)
        if create_key:
            signer: Signer | None = Signer.load_or_create(key_path)
        else:
            signer = Signer.load(key_path) if key_path.exists() else None
        return cls(
            registry_root(state_dir),
            model,
            signer,
            registry.keep_versions,
            delta_from_versions=registry.delta_from_versions,
        )

    # Reading: never writes, safe beside a writer in another process.

    def versions(self) -> list[int]:
        """Versions on disk, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if VERSION_DIR.match(n) and (self.folder / n).is_dir())

    def manifest(self, version: int) -> dict[str, Any]:
        path = self._dir(version) / MANIFEST_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._unknown(version) from None
        return parse(data, path)

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
            return parse(path.read_bytes(), path)
        except FileNotFoundError:
            return None

    def rollout(self) -> staged.Rollout | None:
        """The model's staged rollout (daemon/registry/rollout.py), or None when it never had one."""
        return staged.read(self.folder)

    def offered(self) -> int | None:
        """The newest version offered to any device: the one rolling out, else the latest."""
        r = self.rollout()
        if r is not None and r.rolling:
            return r.version
        latest = self.latest()
        return latest["version"] if latest is not None else None

    def pins(self) -> list[int]:
        path = self.folder / PINS
        try:
            return sorted(int(v) for v in parse(path.read_bytes(), path))
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
        return history.read(self.folder / LOG)

    # Writing: each change holds the lock.

    def publish(
        self,
        tflite: bytes,
        fields: dict[str, Any],
        stamp: Callable[[bytes, int], bytes] | None = None,
        stages: Sequence[float] = (),
    ) -> dict[str, Any]:
        """Store ``tflite`` as the next version, make it ``latest``, apply retention; returns the manifest.

        ``stamp(tflite, version)``, when given, returns the bytes to store once the version number is
        known (the exporter writes it into the model's own metadata); it runs under the lock. With
        ``stages`` (percent of devices, ascending, the last 100: rollout.stages) and a latest version to
        compare with, the version starts a staged rollout at the first stage instead, and ``latest`` stays.
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
            # Made before the folder is renamed into place and written into it: complete with its deltas, or absent.
            deltas = make_deltas(self, version, tflite, self.delta_from_versions)
            manifest = manifest_of(self.model, version, body, tflite, self.signer.key_id)
            if deltas.entries:
                manifest["files"][MODEL_FILE]["deltas"] = deltas.entries
            document = dump(manifest)
            labels_txt = "".join(f"{label}\n" for label in body["labels"]).encode("utf-8")
            self._write_version(
                version,
                {
                    MODEL_FILE: tflite,
                    LABELS_FILE: labels_txt,
                    MANIFEST_FILE: document,
                    SIGNATURE_FILE: self.signer.sign(document),
                    **deltas.files,
                },
            )
            # From here the version is complete on disk; switching latest is two renames (signature first).
            before, current = self._latest_or_none(), self._rollout_or_none()
            if current is not None and current.rolling:  # the newer version takes over the rollout, or all devices
                staged.write(self.folder, replace(current, state="superseded", reason=f"version {version} published"))
                self._append_log({"event": "rollout_superseded", "version": current.version, "by": version})
            rolling = None
            if list(stages) not in ([], [100.0]) and before is not None:
                now = time.time()
                rolling = staged.Rollout(version, before["version"], tuple(stages), 0, "rolling", now, now)
                staged.write(self.folder, rolling)
            else:
                self._point_latest(version)
            self._write_versions()
            self._append_log(
                {
                    "event": "published",
                    "version": version,
                    "sha256": manifest["files"][MODEL_FILE]["sha256"],
                    "size": len(tflite),
                    "quantization": body["quantization"],
                    "deltas": {base: e["size"] for base, e in deltas.entries.items()},
                    **({"rollout": {"percent": rolling.percent, "replaces": rolling.replaces}} if rolling else {}),
                }
            )
            apply_retention(self)
        log.info(
            "published %s version %d (%s, %d bytes; deltas: %s)%s",
            self.model,
            version,
            body["quantization"],
            len(tflite),
            ", ".join(f"from {base} {e['size']} bytes" for base, e in deltas.entries.items()) or "none",
            f", rolling out to {rolling.percent:g}% of devices first" if rolling else "",
        )
        return manifest

    def advance_rollout(self, reason: str, expect: int | None = None) -> staged.Rollout:
        """The rolling version to its next stage (at the last, it becomes ``latest``); ``expect``: only if that
        version is the one rolling (a decision made on figures of another is void)."""
        self._writable()
        with self._locked():
            current = self._rolling(expect)
            after = current.advanced(time.time(), reason)
            if after.state == "complete":
                self._point_latest(after.version)
            staged.write(self.folder, after)
            self._append_log(
                {
                    "event": "rollout_complete" if after.state == "complete" else "rollout_advanced",
                    "version": after.version,
                    "percent": after.percent,
                    "reason": reason,
                }
            )
        log.info("version %d now reaches %g%% of devices: %s", after.version, after.percent, reason)
        return after

    def halt_rollout(
        self, reason: str, figures: dict[str, Any] | None = None, expect: int | None = None
    ) -> staged.Rollout:
        """Stop the rolling version: its cohort is offered ``latest`` again (it rolls back); logged with ``figures``."""
        self._writable()
        with self._locked():
            current = self._rolling(expect)
            after = replace(current, state="halted", reason=reason, stage_started_at=time.time())
            staged.write(self.folder, after)
            event = {"event": "rollout_halted", "version": after.version, "percent": after.percent, "reason": reason}
            self._append_log({**event, **({"figures": jsonable(figures)} if figures else {})})
        log.warning("rollout of version %d halted at %g%% of devices: %s", after.version, after.percent, reason)
        return after

    def _rolling(self, expect: int | None) -> staged.Rollout:
        current = self.rollout()
        if current is None or not current.rolling:
            raise RegistryError(f"model {self.model!r} has no version rolling out")
        if expect is not None and current.version != expect:
            raise RegistryError(f"version {current.version} is rolling out, not {expect}")
        return current

    def record_rejection(
        self, fields: dict[str, Any], reasons: list[str], refusals: list[dict[str, Any]] | None = None
    ) -> None:
        """Log a candidate the gates refused: the sentences, and each refusal's kind and figures; nothing else is kept."""
        self._writable()
        event = {"event": "rejected", "reasons": [str(r) for r in reasons], "candidate": jsonable(fields)}
        if refusals is not None:
            event["refusals"] = jsonable(refusals)
        with self._locked():
            self._append_log(event)

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
            current = self.rollout()
            if current is not None and current.rolling:  # every device to ``version``: the rollout ends here
                staged.write(self.folder, replace(current, state="halted", reason=f"rollback to version {version}"))
                self._append_log({"event": "rollout_halted", "version": current.version, "reason": "rollback"})
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

    def _write_version(self, version: int, files: dict[str, bytes]) -> None:
        """The version's folder, built under a temporary name and renamed whole: it exists complete or not at all."""
        tmp = self.folder / f"{TMP_PREFIX}{version}-{os.getpid()}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                write_new(tmp / name, data)
            fsync_dir(tmp)
            os.rename(tmp, self._dir(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.folder)

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

    def _rollout_or_none(self) -> staged.Rollout | None:
        """The rollout; None, said in the log, when its file is damaged (the next change writes it afresh)."""
        try:
            return self.rollout()
        except RegistryError as err:
            log.error("%s; taken as no rollout", err)
            return None

    def _latest_or_none(self) -> dict[str, Any] | None:
        try:
            return self.latest()
        except RegistryError:
            return None

    def _append_log(self, event: dict[str, Any]) -> None:
        history.append(self.folder / LOG, {"time": utc_now(), **event})

    def _set_pins(self, pins: list[int]) -> None:
        write_atomic(self.folder / PINS, dump(sorted(set(pins))))
        self._write_versions()

    def _write_versions(self) -> None:
        write_atomic(self.folder / VERSIONS, dump(self.index()))
