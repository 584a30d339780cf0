"""Is every part of the daemon making progress? The systemd watchdog is pinged only while it is.

A thread that is alive but stuck (a step that never returns, a commit
blocked on a wedged disk, a conversion that hangs) passes /healthz, which only
asks whether threads are alive. The watchdog asks the harder question. Over
the last ``stall_after_s`` (the watchdog interval, WatchdogSec), each part must
have shown one of these:

- intake: nothing waits for a commit, or a commit finished since examples
  started waiting; and the store has not refused writes for that long.
  A broker that is down is not a stall: intake has nothing to do, and the
  feed reconnects on its own. Nor is a full disk (``disk_full_since``):
  intake waits for space on purpose, and a restart would not make any.
- learner: its loop turned, that is it finished a step, paused for intake
  (a burst), or looked at the store and found nothing new
  (``Training.last_progress``). A learner inside one step, holdout evaluation
  or checkpoint for longer than the bound is stalled, so WatchdogSec must
  exceed the longest of those on the host (see systemd/sprout.service).
  One step may legitimately take minutes: the first one with
  ``training.compile_backbone``, which waits for torch.compile. While the
  learner says it is compiling (``Training.compiling_since``) it has its own
  bound, ``COMPILE_BOUND_S``.
- exporter: it is not in one export for longer than its own bound,
  ``export_stall_after_s``: an export legitimately takes minutes, far longer
  than the watchdog interval, so it has a bound derived from its settings.
- feed: no callback failed and paho's network thread lives; while connected,
  its loop turned (once a second when idle), unless it waits for room in the
  deliveries queue, which is intake's stall to judge.

Observed every main-loop tick (``observe``), judged at ping time (``stalls``).
"""

from __future__ import annotations

import threading
from typing import Protocol

# Longest one conversion (litert-torch, one quantisation mode) may take before it counts as hung. On 2
# CPU cores it takes tens of seconds at 128 px (docs/quantization.md); ten minutes means it is not coming back.
CONVERSION_BOUND_S = 600.0
# Longest the backbone's compilation (training.compile_backbone, the first graphed step) may take. Inductor
# compiles EfficientNet-Lite0's forward and backward in a minute or two on a GPU host; 15 means it hangs.
COMPILE_BOUND_S = 900.0


class _Intake(Protocol):
    commits: int
    failing_since: float | None
    disk_full_since: float | None

    def alive(self) -> bool: ...


class _Feed(Protocol):
    connected: threading.Event
    last_loop: float
    waiting_for_intake: bool

    def problem(self) -> str | None: ...


class _Training(Protocol):
    last_progress: float
    backlog: int
    compiling_since: float | None

    def alive(self) -> bool: ...


class _Exporting(Protocol):
    busy: bool

    def alive(self) -> bool: ...


def export_stall_after_s(quantization_modes: int, verify_timeout_s: float) -> float:
    """How long one export may run: each mode converts (bounded here) and verifies (bounded by its timeout)."""
    return quantization_modes * (CONVERSION_BOUND_S + verify_timeout_s)


class Liveness:
    def __init__(self, stall_after_s: float, export_stall_after_s: float):
        self.stall_after_s = stall_after_s
        self.export_stall_after_s = export_stall_after_s
        self._commits_seen = -1
        self._waiting_since: float | None = None  # examples wait and no commit has finished since
        self._busy_since: float | None = None  # the exporter's current export began (as first observed)

    def observe(self, now: float, intake: _Intake | None, waiting: int, exporting: _Exporting | None) -> None:
        """Note what only shows between pings: examples starting to wait, an export starting.

        ``waiting``: examples received and not yet committed (in the feed's queue or intake's hands).
        """
        if intake is not None:
            if waiting == 0 or intake.commits != self._commits_seen or intake.disk_full_since is not None:
                self._commits_seen = intake.commits
                self._waiting_since = now if waiting else None
            elif self._waiting_since is None:
                self._waiting_since = now
        if exporting is not None:
            if not exporting.busy:
                self._busy_since = None
            elif self._busy_since is None:
                self._busy_since = now

    def stalls(
        self,
        now: float,
        intake: _Intake | None,
        training: _Training | None,
        exporting: _Exporting | None,
        feed: _Feed | None = None,
    ) -> dict[str, str]:
        """What is not making progress: part -> what is wrong; empty when everything is."""
        bound = self.stall_after_s
        out: dict[str, str] = {}
        if feed is not None:
            if (problem := feed.problem()) is not None:
                out["feed"] = problem
            elif feed.connected.is_set() and not feed.waiting_for_intake and now - feed.last_loop > bound:
                out["feed"] = f"the MQTT network loop has not turned for {now - feed.last_loop:.0f}s while connected"
        if intake is not None:
            if not intake.alive():
                out["intake"] = "intake thread is dead"
            elif intake.disk_full_since is not None:
                pass  # paused for disk space, logged as an error and shown on /healthz and /metrics
            elif intake.failing_since is not None and now - intake.failing_since > bound:
                out["intake"] = f"the store has refused intake's writes for {now - intake.failing_since:.0f}s"
            elif self._waiting_since is not None and now - self._waiting_since > bound:
                out["intake"] = f"intake has committed nothing for {now - self._waiting_since:.0f}s while examples wait"
        if training is not None:
            if not training.alive():
                out["learner"] = "learner thread is dead"
            elif training.compiling_since is not None:
                if now - training.compiling_since > COMPILE_BOUND_S:
                    out["learner"] = f"the backbone's compilation has run for {now - training.compiling_since:.0f}s"
            elif now - training.last_progress > bound:
                out["learner"] = (
                    f"the learner has made no progress for {now - training.last_progress:.0f}s "
                    f"(inside one step, evaluation or checkpoint; backlog {training.backlog})"
                )
        if exporting is not None:
            if not exporting.alive():
                out["exporter"] = "export thread is dead"
            elif self._busy_since is not None and now - self._busy_since > self.export_stall_after_s:
                out["exporter"] = f"one export has run for {now - self._busy_since:.0f}s"
        return out
