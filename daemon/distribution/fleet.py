"""Which model versions the fleet runs and fetches, from the requests devices make: counts, no personal data.

A device may send two headers with its requests to the model API (docs/devices.md, "Telling the
server what you run"): ``Sprout-Device``, an opaque id it made up once (sprout-edge: a random UUID
in its model folder), and ``Sprout-Version``, the version it runs. The daemon keeps, in memory only,
a keyed hash of each id (the key is drawn per process, so nothing stored or shown links back to a
device) with the version it last reported and when; a device not heard from for ``WINDOW_S`` no
longer counts. Downloads of each version's model file, whole (``full``) or as a delta from an
earlier version (``delta``), are counted whether or not a device says who it is. Nothing of this is
written to disk or logged.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

WINDOW_S = 24 * 3600.0  # a device counts for a day after its last request
MAX_DEVICES = 100_000  # memory bound: the least recently heard devices go first
MAX_ID_CHARS = 128
FULL, DELTA = "full", "delta"  # how a version's model file was downloaded: the whole file, or a delta


@dataclass(frozen=True, slots=True)
class FleetView:
    devices_by_version: dict[str, int]  # the version devices report running ("none": nothing installed yet)
    downloads_by_version: dict[int, int]  # downloads of each version's model file since the start, either kind
    downloads_by_kind: dict[tuple[int, str], int]  # the same by (version, full | delta)


class Fleet:
    def __init__(self, window_s: float = WINDOW_S, max_devices: int = MAX_DEVICES):
        self.window_s = window_s
        self.max_devices = max_devices
        self._key = os.urandom(16)
        self._seen: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # id hash -> (version, last seen)
        self._downloads: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def heard(self, device: str | None, version: str | None) -> None:
        """A request carrying the device's headers; ignored without a usable id."""
        if not device or len(device) > MAX_ID_CHARS or not device.isprintable():
            return
        running = version if version is not None and version.isdigit() and len(version) <= 12 else "none"
        digest = hashlib.blake2b(device.encode(), key=self._key, digest_size=16).digest()
        with self._lock:
            self._seen[digest] = (running, time.monotonic())
            self._seen.move_to_end(digest)
            while len(self._seen) > self.max_devices:
                self._seen.popitem(last=False)

    def downloaded(self, version: int, kind: str = FULL) -> None:
        with self._lock:
            self._downloads[version, kind] = self._downloads.get((version, kind), 0) + 1

    def view(self) -> FleetView:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            while self._seen and next(iter(self._seen.values()))[1] < cutoff:
                self._seen.popitem(last=False)  # oldest first: the dict is in order of last request
            devices: dict[str, int] = {}
            for running, _ in self._seen.values():
                devices[running] = devices.get(running, 0) + 1
            by_version: dict[int, int] = {}
            for (version, _), n in self._downloads.items():
                by_version[version] = by_version.get(version, 0) + n
            return FleetView(
                dict(sorted(devices.items())), dict(sorted(by_version.items())), dict(sorted(self._downloads.items()))
            )
