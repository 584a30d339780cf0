"""The device's model folder: installed versions, the ``current`` pointer, and a download in progress.

Layout of ``<dir>``::

    current           the version in use, e.g. ``7``; replaced by one rename, so a reader sees the old or the new
    versions/<v>/     model.tflite, manifest.json (the document exactly as served and verified),
                      manifest.json.sig (its signature; absent when installed with --insecure), labels.txt
    etag              {"etag", "version"}: the ETag of the ``latest`` document that made <version> current
    .partial-<v>      a download of version v cut short; the next sync resumes it with a Range request
    .partial-<v>.from-<b>  the same for the delta from version b (edge/delta.py) to version v
    .tmp-*            what an install cut short left (power loss, kill); the next sync removes it
    .lock             held by the one sync that may change the folder

A version folder is built under ``versions/.tmp-*``, fsynced and renamed whole;
only then is ``current`` swapped, so a power cut at any instant leaves
``current`` naming a complete, verified version. Two versions are kept: the
current one and the one before it, so a rollback by the publisher needs no
download, and an app that opened the previous version a moment ago can still
read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from edge.atomic import TMP_PREFIX, fsync_dir, fsync_file, write_atomic, write_new
from edge.trust import file_sha256

MODEL_FILE, MANIFEST_FILE, LABELS_FILE = "model.tflite", "manifest.json", "labels.txt"
SIGNATURE_FILE = MANIFEST_FILE + ".sig"
CURRENT, ETAG, LOCK, DEVICE_ID = "current", "etag", ".lock", "device-id"
PARTIAL_PREFIX = ".partial-"
_VERSION = re.compile(r"^[1-9][0-9]*$")


class NoModelInstalled(Exception):
    """Nothing has been installed in this folder yet (the CLI exits 66, EX_NOINPUT)."""


class FolderBusy(Exception):
    """Another sync holds the folder's lock."""


class ModelDir:
    """The folder one device keeps one model in; see the module docstring for the layout."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # Reading: never writes, safe beside a sync in another process.

    def current(self) -> int | None:
        """The version in use, or None before the first install."""
        try:
            text = (self.root / CURRENT).read_text(encoding="ascii").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise NoModelInstalled(
                f"{self.root / CURRENT}: unreadable ({err}); run `sprout-edge sync` to reinstall"
            ) from None
        if not _VERSION.match(text):
            raise NoModelInstalled(
                f"{self.root / CURRENT}: {text[:20]!r} is not a version; run `sprout-edge sync` to reinstall"
            )
        return int(text)

    def require_current(self) -> int:
        version = self.current()
        if version is None:
            raise NoModelInstalled(
                f"no model installed in {self.root} yet: run `sprout-edge sync --url URL --model NAME --dir {self.root}`"
            )
        return version

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / str(version)

    def partial(self, version: int) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{version}"

    def delta_partial(self, version: int, base: int) -> Path:
        """Where the delta from ``base`` to ``version`` downloads to (and resumes from)."""
        return self.root / f"{PARTIAL_PREFIX}{version}.from-{base}"

    def intact_model(self, version: int) -> Path | None:
        """``versions/<version>/model.tflite`` when it still has the size and sha256 its stored manifest names."""
        folder = self.version_dir(version)
        try:
            entry = json.loads((folder / MANIFEST_FILE).read_bytes())["files"][MODEL_FILE]
            if file_sha256(folder / MODEL_FILE) == (entry["size"], entry["sha256"]):
                return folder / MODEL_FILE
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def installed(self) -> list[int]:
        """Version folders on disk, oldest first."""
        try:
            names = os.listdir(self.versions_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if _VERSION.match(n))

    def etag_for(self, version: int) -> str | None:
        """The ETag to send with If-None-Match, when the one remembered belongs to ``version``."""
        try:
            record = json.loads((self.root / ETAG).read_bytes())
        except (OSError, ValueError):
            return None
        if isinstance(record, dict) and record.get("version") == version and isinstance(record.get("etag"), str):
            return record["etag"]
        return None

    def holds(self, version: int, document: bytes, size: int, sha256: str, signature: bytes | None = None) -> bool:
        """True when ``versions/<version>`` is complete, its manifest is ``document`` (and its signature
        ``signature``, when one is given) and its file has ``size`` and ``sha256``."""
        folder = self.version_dir(version)
        try:
            if (folder / MANIFEST_FILE).read_bytes() != document or not (folder / LABELS_FILE).is_file():
                return False
            if signature is not None and self.signature(version) != signature:
                return False
            return file_sha256(folder / MODEL_FILE) == (size, sha256)
        except OSError:
            return False

    def signature(self, version: int) -> bytes | None:
        """The installed manifest's signature, or None for a version installed without one (--insecure)."""
        try:
            return (self.version_dir(version) / SIGNATURE_FILE).read_bytes()
        except FileNotFoundError:
            return None

    # Writing: only inside lock().

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one sync; :class:`FolderBusy` when another holds it (the kernel frees it if we die)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusy(
                    f"another sprout-edge sync is changing {self.root} (it holds {self.root / LOCK})"
                ) from None
            yield
        finally:
            os.close(fd)

    def tidy(self, downloading: int | None = None) -> None:
        """Remove what interrupted installs left, and partial downloads of versions other than ``downloading``."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        resumable = self.partial(downloading).name if downloading is not None else None
        for folder in (self.root, self.versions_dir):
            for entry in os.listdir(folder):
                # The resumable download is the version's full file or a delta to it (``.partial-<v>.from-<b>``).
                kept = resumable is not None and (entry == resumable or entry.startswith(f"{resumable}.from-"))
                if entry.startswith(TMP_PREFIX) or (entry.startswith(PARTIAL_PREFIX) and not kept):
                    _remove(folder / entry)

    def device_id(self) -> str:
        """This device's opaque id for the server's counts: random, made once, kept in the folder."""
        path = self.root / DEVICE_ID
        try:
            found = path.read_text(encoding="ascii").strip()
            if found:
                return found
        except (OSError, UnicodeDecodeError):
            pass
        made = uuid.uuid4().hex
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, made.encode("ascii"))
        return made

    def remember_etag(self, etag: str | None, version: int) -> None:
        if etag:
            write_atomic(self.root / ETAG, json.dumps({"etag": etag, "version": version}).encode("utf-8"))
        else:
            (self.root / ETAG).unlink(missing_ok=True)

    def install(
        self, version: int, model_file: Path, document: bytes, labels: list[str], signature: bytes | None = None
    ) -> int | None:
        """Move the verified ``model_file`` into ``versions/<version>`` with its manifest, signature and labels,
        make it current.

        Returns the version that was current before. ``model_file`` must be in this folder (a rename, not a copy).
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        fsync_file(model_file)
        tmp = self.versions_dir / f"{TMP_PREFIX}{version}-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        trash = None
        try:
            os.rename(model_file, tmp / MODEL_FILE)
            write_new(tmp / MANIFEST_FILE, document)
            if signature is not None:
                write_new(tmp / SIGNATURE_FILE, signature)
            write_new(tmp / LABELS_FILE, "".join(f"{label}\n" for label in labels).encode("utf-8"))
            fsync_dir(tmp)
            target = self.version_dir(version)
            if target.exists():  # a copy that did not verify (or a leftover): out of the way first
                trash = self.versions_dir / f"{TMP_PREFIX}old-{version}-{os.getpid()}"
                os.rename(target, trash)
            os.rename(tmp, target)
            fsync_dir(self.versions_dir)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            if trash is not None:
                _remove(trash)
        return self.activate(version)

    def activate(self, version: int) -> int | None:
        """Point ``current`` at the (complete) ``versions/<version>``, keep the one before it, delete the rest."""
        try:
            previous = self.current()
        except NoModelInstalled:  # an unreadable pointer: replacing it is the repair
            previous = None
        write_atomic(self.root / CURRENT, f"{version}\n".encode("ascii"))
        keep = {version, previous}
        if previous == version:  # a reinstall of the same version: nothing to learn about what to drop
            return previous
        for old in self.installed():
            if old not in keep:
                # Renamed out of sight first, so a reader never opens a half-deleted version.
                trash = self.versions_dir / f"{TMP_PREFIX}deleted-{old}-{os.getpid()}"
                os.rename(self.version_dir(old), trash)
                _remove(trash)
        fsync_dir(self.versions_dir)
        return previous


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
