"""Devices' reports in the store: each counted once, added up per model version (daemon/ingest/telemetry.py).

Counters are kept for ``FIELD_KEEP_S`` after their last report: a version no device has used for that long
leaves the figures (intake forgets them, at most hourly).

A report whose seq is not above the last one its device sent is a resend (a QoS 1 redelivery, an
HTTP retry after a lost answer) and is counted as a duplicate, adding nothing. Written in the
intake's transaction with the examples, so a report is acked only once it is counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.store import labelling
from daemon.store.database import Database
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader
from daemon.store.records import CONFIDENCE_BINS, FieldReport

log = logging.getLogger(__name__)
FIELD_KEEP_S = 90 * 24 * 3600.0
SHOWN_VERSIONS = 10  # the newest versions reported on, in the metrics and on the status page

BINS = [f"conf_{i}" for i in range(CONFIDENCE_BINS)]
_COLUMNS = [
    "loads",
    "load_failures",
    "predictions",
    "confidence_sum",
    "corrections",
    "latency_ms_sum",
    *BINS,
]
_ADD = (
    f"INSERT INTO field_counts (version, device, first_seen, last_seen, {', '.join(_COLUMNS)}) "
    f"VALUES (?, ?, ?, ?, {', '.join('?' * len(_COLUMNS))}) ON CONFLICT (version, device) DO UPDATE SET "
    + ", ".join(f"{c} = field_counts.{c} + excluded.{c}" for c in _COLUMNS)
    + ", last_seen = excluded.last_seen"
)


def add_reports(db: Database, reports: Iterable[FieldReport]) -> tuple[int, int]:
    """Count each report not counted before, inside the caller's write transaction; returns (counted, resent)."""
    counted = resent = 0
    for r in reports:
        last = db.scalar("SELECT last_seq FROM field_devices WHERE device = ?", (r.device,))
        if last is not None and r.seq <= int(last):
            resent += 1
            continue
        db.run(
            "INSERT INTO field_devices (device, bucket, last_seq, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device) DO UPDATE SET last_seq = excluded.last_seq, last_seen = excluded.last_seen",
            (r.device, r.bucket, r.seq, r.received_at),
        )
        db.run_many(
            _ADD,
            [
                (
                    v.version,
                    r.device,
                    r.received_at,
                    r.received_at,
                    v.loads,
                    v.load_failures,
                    v.predictions,
                    v.confidence_sum,
                    v.corrections,
                    v.latency_ms_sum,
                    *v.confidence_bins,
                )
                for v in r.versions
            ],
        )
        counted += 1
    return counted, resent


def forget_reports(db: Database, older_than: float) -> int:
    """Delete the counters of (version, device) pairs last reported on before ``older_than``, and the devices not
    heard from since then (a device heard again later starts afresh); inside the caller's write transaction."""
    n = db.run("DELETE FROM field_counts WHERE last_seen < ?", (older_than,))
    db.run("DELETE FROM field_devices WHERE last_seen < ?", (older_than,))
    return n


@dataclass(frozen=True, slots=True)
class VersionInField:
    """One model version as the reporting devices saw it, all reports added up."""

    version: int
    devices: int  # that reported on it
    loads: int
    load_failures: int
    predictions: int
    confidence_sum: float
    corrections: int
    latency_ms_sum: float
    confidence_bins: tuple[int, ...]
    last_seen: float

    @property
    def load_failure_share(self) -> float | None:
        tries = self.loads + self.load_failures
        return self.load_failures / tries if tries else None

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.predictions if self.predictions else None

    @property
    def correction_share(self) -> float | None:
        return self.corrections / self.predictions if self.predictions else None

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_ms_sum / self.predictions if self.predictions else None

    def share_below(self, confidence: float) -> float | None:
        """Share of predictions whose top-1 score fell below ``confidence`` (rounded down to a tenth)."""
        if not self.predictions:
            return None
        return sum(self.confidence_bins[: int(round(confidence * CONFIDENCE_BINS, 6))]) / self.predictions


def versions_in_field(
    db: Database, since: float = 0.0, limit: int = 1000, only: Sequence[int] | None = None
) -> list[VersionInField]:
    """The newest ``limit`` versions devices reported on (counters last added to after ``since``; of the
    versions ``only`` names, where given), newest first."""
    sums = ", ".join(f"SUM({c})" for c in _COLUMNS)
    among = f" AND version IN ({', '.join('?' * len(only))})" if only else ""
    rows = db.query(
        f"SELECT version, COUNT(*), {sums}, MAX(last_seen) FROM field_counts WHERE last_seen >= ?{among} "
        "GROUP BY version ORDER BY version DESC LIMIT ?",
        (since, *(only or ()), limit),
    )
    out = []
    for row in rows:
        version, devices, loads, failures, predictions, conf, corrections, latency, *rest = row
        bins, last_seen = rest[:CONFIDENCE_BINS], rest[CONFIDENCE_BINS]
        out.append(
            VersionInField(
                int(version),
                int(devices),
                int(loads),
                int(failures),
                int(predictions),
                float(conf),
                int(corrections),
                float(latency),
                tuple(int(b) for b in bins),
                float(last_seen),
            )
        )
    return out


class FieldFigures:
    """What the metrics and the status page show of the field: :func:`versions_in_field`, and the labelling queue's
    states where devices' photos are taken (``photos``), on a reader connection of its own, on a thread of its own. It adds up a row per device and version, so it is read again only when
    ``counted()`` (this process's reports counted so far) has moved, at most every ``min_s``, or every
    ``refresh_s`` for what other processes (intake members) counted. A status read never waits for it: the
    daemon's main loop, which reads the status, must stay free to take a SIGTERM however long a query takes."""

    def __init__(
        self,
        location: StoreLocation | Path,
        counted: Callable[[], int],
        min_s: float = 10.0,
        refresh_s: float = 60.0,
        photos: bool = False,
    ):
        self.location = location
        self.counted = counted
        self.min_s, self.refresh_s = min_s, refresh_s
        self.photos = photos
        self._db: Database | None = None
        self._figures: list[VersionInField] = []
        self._labelling: dict[str, int] = dict.fromkeys(labelling.STATES, 0) if photos else {}
        self._read_at = -refresh_s
        self._read_counted = -1
        self._lock = threading.Lock()  # held by the reading thread while it reads
        self._closed = False

    def current(self) -> list[VersionInField]:
        """The newest versions' figures as last read; starts a read in the background when they are stale."""
        age, counted = time.monotonic() - self._read_at, self.counted()
        stale = age >= self.refresh_s or (age >= self.min_s and counted != self._read_counted)
        if stale and not self._closed and self._lock.acquire(blocking=False):
            self._read_at = time.monotonic()  # one read at a time, and none again before min_s
            threading.Thread(target=self._read, args=(counted,), name="sprout-field", daemon=True).start()
        return self._figures

    def labelling(self) -> dict[str, int]:
        """Photos in the labelling queue by state, as last read (empty where photos are not taken)."""
        self.current()
        return self._labelling

    def _read(self, counted: int) -> None:
        try:
            if self._db is None:
                self._db = open_reader(self.location, "sprout-field")
            self._figures = versions_in_field(self._db, limit=SHOWN_VERSIONS)
            if self.photos:
                self._labelling = labelling.states(self._db)
            self._read_counted = counted
        except Exception as err:  # a status read must not fail on it: the figures stay as last read
            log.warning("reading the devices' reports failed: %s; showing them as last read", err)
            if self._db is not None:
                self._db.close()
                self._db = None
        finally:
            self._read_at = time.monotonic()
            if self._closed and self._db is not None:
                self._db.close()
                self._db = None
            self._lock.release()

    def close(self) -> None:
        """Close the connection, now or when a read under way ends (never waits for it)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                if self._db is not None:
                    self._db.close()
                    self._db = None
            finally:
                self._lock.release()
