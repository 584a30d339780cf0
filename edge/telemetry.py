"""What a device counts of its model in use, and the reports that carry the counts to the server (opt-in).

The counters of each version since the last report that went through live in ``<dir>/telemetry.json``
(written whole, under ``<dir>/.telemetry.lock``, so a classifying app and a syncing one may both use
it). A report takes them out with the next ``seq`` and stays in the file as in flight until the server
answers; a report that got no answer is sent again with the same ``seq``, which the server counts
once (docs/devices.md, "Reporting how the model does"). Nothing about the images or the user is kept:
counts, sums and the histogram of top-1 scores.

>>> log = FieldLog("/var/lib/sprout-edge/maize")  # doctest: +SKIP
>>> with log.counting() as counts:  # doctest: +SKIP
...     counts.predicted(version=7, top1=0.91, latency_ms=18.0)
>>> log.send(ModelServer("http://10.0.0.5:8080", "maize"), device_id="0b6f...")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.atomic import write_atomic
from edge.fetch import FetchError, ModelServer

log = logging.getLogger("sprout_edge.telemetry")

TELEMETRY_FILE, TELEMETRY_LOCK = "telemetry.json", ".telemetry.lock"
BINS = 10
MAX_VERSIONS = 32  # what the server takes in one report; older versions' counts beyond it are dropped


def _empty() -> dict[str, Any]:
    return {
        "loads": 0,
        "load_failures": 0,
        "predictions": 0,
        "confidence_sum": 0.0,
        "confidence_bins": [0] * BINS,
        "corrections": 0,
        "latency_ms_sum": 0.0,
    }


class Counts:
    """Counts made in memory (a batch of classifications), added to the file in one write when the block ends."""

    def __init__(self) -> None:
        self.by_version: dict[int, dict[str, Any]] = {}

    def _of(self, version: int) -> dict[str, Any]:
        return self.by_version.setdefault(version, _empty())

    def loaded(self, version: int, ok: bool = True) -> None:
        self._of(version)["loads" if ok else "load_failures"] += 1

    def predicted(self, version: int, top1: float, latency_ms: float) -> None:
        if not math.isfinite(top1) or not math.isfinite(latency_ms):
            return  # a NaN score is the model's fault, and a load check catches that; it is no prediction to count
        c = self._of(version)
        top1 = min(max(top1, 0.0), 1.0)
        c["predictions"] += 1
        c["confidence_sum"] += top1
        c["confidence_bins"][min(int(top1 * BINS), BINS - 1)] += 1
        c["latency_ms_sum"] += max(latency_ms, 0.0)

    def corrected(self, version: int) -> None:
        """The user said a prediction of ``version`` was wrong (and gave the right label)."""
        self._of(version)["corrections"] += 1


@dataclass(frozen=True)
class Sent:
    status: str  # "counted", "resent" (counted before), "refused" (dropped: the server said what is wrong),
    # "kept" (no answer, or retry later: sent again next time), "nothing" (no counts to send)
    seq: int | None = None
    detail: str = ""


class FieldLog:
    """The counters of one device's model folder."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / TELEMETRY_FILE

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / TELEMETRY_LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self.read()
            yield doc
            write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode())

    def read(self) -> dict[str, Any]:
        """The file as a document: ``next_seq``, ``pending`` (version -> counts), ``in_flight`` (a report, or None)."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            doc = None
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s): the counts in it are lost, counting afresh", self.path, err)
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("pending"), dict):
            return {"next_seq": 1, "pending": {}, "in_flight": None}
        return doc

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counts]:
        """Count in memory while the block runs; the counts are added to the file when it ends."""
        counts = Counts()
        yield counts
        if counts.by_version:
            with self._editing() as doc:
                for version, add in counts.by_version.items():
                    mine = doc["pending"].setdefault(str(version), _empty())
                    for key, value in add.items():
                        if key == "confidence_bins":
                            mine[key] = [a + b for a, b in zip(mine[key], value, strict=True)]
                        else:
                            mine[key] += value

    def send(self, server: ModelServer, device_id: str) -> Sent:
        """Send the report in flight, or else the counts pending as the next report; returns what became of it."""
        with self._editing() as doc:
            report = doc.get("in_flight")
            if report is None and doc["pending"]:
                newest = sorted(doc["pending"], key=int, reverse=True)[:MAX_VERSIONS]
                versions = [{"version": int(v), **doc["pending"][v]} for v in newest]
                report = doc["in_flight"] = {"device": device_id, "seq": doc["next_seq"], "versions": versions}
                doc["pending"] = {}
                doc["next_seq"] += 1
        if report is None:
            return Sent("nothing")
        try:
            status, answer = server.report(json.dumps(report).encode())
        except FetchError as err:
            if err.status is not None and 400 <= err.status < 500 and err.status not in (404, 408, 429):
                outcome = Sent("refused", report["seq"], str(err))  # it will not be taken as it is: drop it
                log.warning("the server refused report %d: %s; its counts are dropped", report["seq"], err)
            else:
                return Sent("kept", report["seq"], str(err))
        else:
            outcome = Sent("counted" if answer.get("counted") else "resent", report["seq"], str(answer.get("why", "")))
        with self._editing() as doc:
            if doc.get("in_flight", {}) and doc["in_flight"].get("seq") == report["seq"]:
                doc["in_flight"] = None
        return outcome


def send_report(url: str, model: str, folder: Path | str, token: str | None = None) -> Sent:
    """Send this device's pending counts to the server at ``url`` (what ``sprout-edge sync --report`` does after
    each sync); logs what became of them. Never raises for a server or a network that fails: the counts wait."""
    from edge.modeldir import ModelDir

    installed = ModelDir(folder)
    server = ModelServer(url, model, token)
    try:
        server.identify(installed.device_id(), installed.current())
        sent = FieldLog(folder).send(server, installed.device_id())
    except (OSError, ValueError) as err:  # the folder, not the server: said, and the counts wait
        log.warning("model %s: cannot report (%s); the counts wait for the next report", model, err)
        return Sent("kept", None, str(err))
    if sent.status in ("counted", "resent"):
        log.info("model %s: report %d %s", model, sent.seq, "counted" if sent.status == "counted" else "was counted")
    elif sent.status == "kept":
        log.info("model %s: report %s not sent (%s); sent again next time", model, sent.seq, sent.detail)
    return sent
