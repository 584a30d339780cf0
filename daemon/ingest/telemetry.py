"""The telemetry wire format: a device's JSON report in, a :class:`FieldReport` or a :class:`Rejection` out.

Devices opt in and send counters per model version, never a photo or anything about their user
(docs/devices.md, "Reporting how the model does"). One report, over MQTT on
``<prefix>/<model>/telemetry`` or by ``POST /v1/models/<model>/telemetry``::

    {"device": "5f0c...", "seq": 7, "versions": [
        {"version": 12, "loads": 1, "load_failures": 0, "predictions": 40, "confidence_sum": 31.2,
         "confidence_bins": [0, 0, 1, 2, 3, 2, 4, 6, 10, 12], "corrections": 1, "latency_ms_sum": 812.5}]}

The device's id is replaced at once by its SHA-256 (nothing stores or shows the id), from which its
rollout bucket (0-9999) comes too, the same on every server. Unknown fields are ignored, so devices
may send more than this server reads. Anything else wrong rejects the whole report, saying which field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import TypeGuard

from daemon.store.records import CONFIDENCE_BINS, FieldReport, Reason, Rejection, VersionCounts

log = logging.getLogger("sprout.telemetry")

MAX_REPORT_BYTES = 64 * 1024  # some hundred versions' counters: far more than a report holds
MAX_VERSIONS = 32
MAX_ID_CHARS = 128
MAX_COUNT = 10**9  # per report: a device that counted more in one period is broken
MAX_SEQ = 2**53  # what a JavaScript number holds exactly
MAX_JSON_BRACKETS = 4 * MAX_VERSIONS + 8
BUCKETS = 10_000
COUNTS = ("loads", "load_failures", "predictions", "corrections")
SUMS = ("confidence_sum", "latency_ms_sum")


class _Refused(Exception):
    pass


def device_digest(device_id: str) -> str:
    """What is kept of a device's id: its SHA-256, hex.

    >>> device_digest("phone-1")[:16]
    'd02f8871b572ade5'
    """
    return hashlib.sha256(b"sprout-device\0" + device_id.encode("utf-8", "surrogatepass")).hexdigest()


def bucket_of(digest: str) -> int:
    """The device's place among BUCKETS, from its digest: a rollout to p% reaches the buckets below p * 100."""
    return int(digest[:16], 16) % BUCKETS


def parse_report(payload: bytes, received_at: float | None = None) -> FieldReport | Rejection:
    """One report, checked; never raises (it runs on the MQTT network thread and in HTTP handlers)."""
    now = time.time() if received_at is None else received_at
    try:
        return _report(_document(payload), now)
    except _Refused as r:
        return Rejection(Reason.BAD_TELEMETRY, str(r), None, now)
    except Exception as err:
        log.exception("parsing a telemetry report failed (%d bytes); rejected", len(payload))
        return Rejection(
            Reason.UNREADABLE,
            f"the report could not be read ({type(err).__name__}); check it against docs/devices.md",
            None,
            now,
        )


def _document(payload: bytes) -> dict[str, object]:
    if len(payload) > MAX_REPORT_BYTES:
        raise _Refused(f"report of {len(payload)} bytes exceeds {MAX_REPORT_BYTES}: send more often, fewer versions")
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_BRACKETS:
        raise _Refused(f"report nests more than {MAX_JSON_BRACKETS} brackets: one object, as docs/devices.md shows")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise _Refused(f"report is not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise _Refused(f"report is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(doc, dict):
        raise _Refused("report must be a JSON object with 'device', 'seq' and 'versions'")
    return doc


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 20:
        raise ValueError(f"integer of {len(digits)} digits")
    return int(digits)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _report(doc: dict[str, object], now: float) -> FieldReport:
    device = doc.get("device")
    if not isinstance(device, str) or not 0 < len(device) <= MAX_ID_CHARS or not device.isprintable():
        raise _Refused(f"'device' must be the device's opaque id: 1-{MAX_ID_CHARS} printable characters")
    seq = doc.get("seq")
    if not _is_int(seq) or not 1 <= seq <= MAX_SEQ:
        raise _Refused(f"'seq' must be an integer from 1 to 2^53, one more in each new report (got {_shown(seq)})")
    entries = doc.get("versions")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_VERSIONS:
        raise _Refused(f"'versions' must be a list of 1 to {MAX_VERSIONS} objects, one per model version")
    versions = tuple(_version(e, i) for i, e in enumerate(entries))
    if len({v.version for v in versions}) != len(versions):
        raise _Refused("'versions' names a version twice: add its counters up into one entry")
    digest = device_digest(device)
    return FieldReport(digest, bucket_of(digest), seq, versions, now)


def _version(entry: object, i: int) -> VersionCounts:
    where = f"versions[{i}]"
    if not isinstance(entry, dict):
        raise _Refused(f"{where} must be an object")
    version = entry.get("version")
    if not _is_int(version) or not 1 <= version <= MAX_COUNT:
        raise _Refused(f"{where}.version must be the model version the counters are of (got {_shown(version)})")
    counts: dict[str, int] = {}
    for name in COUNTS:
        value = entry.get(name, 0)
        if not _is_int(value) or not 0 <= value <= MAX_COUNT:
            raise _Refused(f"{where}.{name} must be a count from 0 to 10^9 (got {_shown(value)})")
        counts[name] = value
    sums: dict[str, float] = {}
    for name in SUMS:
        value = entry.get(name, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e15:
            raise _Refused(f"{where}.{name} must be a number, 0 or more (got {_shown(value)})")
        sums[name] = float(value)
    bins = entry.get("confidence_bins", [0] * CONFIDENCE_BINS)
    if not (
        isinstance(bins, list)
        and len(bins) == CONFIDENCE_BINS
        and all(_is_int(b) and 0 <= b <= MAX_COUNT for b in bins)
    ):
        raise _Refused(f"{where}.confidence_bins must be {CONFIDENCE_BINS} counts, of top-1 scores by tenths")
    predictions = counts["predictions"]
    if sum(bins) != predictions:
        raise _Refused(f"{where}.confidence_bins add up to {sum(bins)}, not predictions = {predictions}")
    if sums["confidence_sum"] > predictions * (1 + 1e-9) or not math.isfinite(sums["confidence_sum"]):
        raise _Refused(f"{where}.confidence_sum exceeds predictions: each top-1 score is at most 1")
    if counts["corrections"] > predictions:
        raise _Refused(f"{where}.corrections exceed predictions ({counts['corrections']} > {predictions})")
    return VersionCounts(
        version,
        counts["loads"],
        counts["load_failures"],
        predictions,
        sums["confidence_sum"],
        tuple(bins),
        counts["corrections"],
        sums["latency_ms_sum"],
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    return repr(value)[:40]
