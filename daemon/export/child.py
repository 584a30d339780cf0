"""Exports in a child process that exits after a conversion: the daemon's side is :class:`ExportChild`, the child's :func:`main`.

Why a process and not a thread of the daemon:

- litert-torch's converter keeps memory after each conversion (~26 MiB per
  int8 conversion of EfficientNet-Lite0 at 64 px, docs/benchmarks.md): a
  daemon converting every few minutes grew by 100-200 MiB per export. A
  child returns everything to the system when it exits.
- torch.export changes process-wide state while it traces
  (``torch.compiler.is_exporting()`` turns true in every thread), so a
  learner step beside an in-process trace raced with it. In its own process
  the trace shares nothing with the learner, which goes on learning.
- A conversion cannot be interrupted from Python; a child can be killed, so
  the daemon stops at once during an export and leaves no C++ thread behind.

Protocol: the child imports what an export needs (Python, torch, and
litert-torch unless its export is already due: ~9 s of CPU on a 2-core host
in all), then waits for its
:class:`~daemon.export.job.ExportJob` (the settings sections an export needs,
as one line of JSON) on its stdin; it runs ``export_once`` and writes its
report (daemon/export/outcome.py: an ``ExportOutcome``, or why nothing was
exported) as one line to its stdout, which is its own, then a line saying
whether it ``stays`` for the next export or ``ends``. The daemon validates
the report: a malformed one is a failed export, like a crash. Its stderr is
a pipe that the daemon reads (``ChildLog``): the child's log records come as
JSON lines and are logged again by the daemon, Sprout's at their level,
other libraries' below ERROR at DEBUG; anything else printed there (the
converter's C++ diagnostics, deprecation notices) is logged at DEBUG and
its last lines are quoted when the child fails. A healthy export is quiet
on the operator's terminal; a failed one says why. The child's temporaries
live in a folder the daemon removes when the child has ended, however it
ended.

With ``export.prewarm_process`` the next export never waits for a process's
imports: a child whose export converted nothing (a new head written into a
kept conversion, conversions.py) stays and serves the next one, up to
``MOST_EXPORTS_PER_PROCESS``; after one that converted, the next export's
child is started as soon as it ends, and waits, imports done, until it is
due. The first export after a start pays the imports. Without it each export
starts its own process, and none is held between exports.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

import daemon
from daemon.common.exits import Exit
from daemon.common.parent_death import die_with_parent
from daemon.export.job import ExportJob
from daemon.export.outcome import DiskFull, ExportOutcome, MalformedReport, NothingExported, read_report, write_report

log = logging.getLogger("sprout.export")

PROJECT_ROOT = Path(daemon.__file__).resolve().parent.parent  # the folder holding daemon/, for PYTHONPATH
TMP_PREFIX = "sprout-export-"  # + the daemon's pid: a child's temporaries, in the system's temporary folder
# A process that only wrote new heads into kept conversions serves the next export too, up to this many: a
# new process cost every export 2 s of imports on 2 cores (docs/benchmarks.md).
MOST_EXPORTS_PER_PROCESS = 100
_DUE_SOON_S = 3.0  # after an export, how long a process waits for the next before importing litert-torch
_STAYS, _ENDS = "stays", "ends"  # the line after each report: whether the process serves the next export


def remove_orphaned_temporaries() -> int:
    """Remove the temporaries of export children whose daemon is gone (killed: it could not clean up)."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        owner = folder.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class ExportFailed(Exception):
    """The child ended without an outcome: it raised (traceback in the log), crashed, or was killed."""


class ExportStopped(Exception):
    """The daemon stopped the child (``ExportChild.stop``): the export is dropped, nothing was half-published."""


class ChildLog(threading.Thread):
    """Reads a child's stderr to its end: log records logged again here, other lines at DEBUG."""

    KEEP_LINES = 30  # the last lines that are not log records, quoted when the child fails

    def __init__(self, stream: Any, pid: int):
        super().__init__(name=f"sprout-export-log-{pid}", daemon=True)
        self.stream, self.pid = stream, pid
        self.tail: deque[str] = deque(maxlen=self.KEEP_LINES)

    def run(self) -> None:
        try:
            for raw in self.stream:
                self.line(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):  # the pipe closed under us (the child was discarded): nothing more to read
            pass

    def line(self, text: str) -> None:
        if not text.strip():
            return
        record = _log_record(text)
        if record is None:
            self.tail.append(text)
            log.debug("export process %d: %s", self.pid, text)
            return
        level = logging.getLevelName(record.get("level", "INFO"))
        level = level if isinstance(level, int) else logging.INFO
        name = str(record.get("logger", "sprout.export"))
        if not name.startswith("sprout") and level < logging.ERROR:
            level = logging.DEBUG  # a library's notice: for whoever debugs an export, not the operator
        message = str(record.get("msg", ""))
        if record.get("exc"):
            message += "\n" + str(record["exc"])
        logging.getLogger(name).log(level, "%s", message)

    def quote(self) -> str:
        return "; ".join(self.tail)[-2000:]


def _log_record(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "level" in doc and "msg" in doc else None


class _Process:
    """One export child, the reader of its stderr, and its temporaries' folder."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        env = {
            **os.environ,
            "TMPDIR": self.tmp,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.export.child", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.tmp,
            )
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.log = ChildLog(self.proc.stderr, self.proc.pid)
        self.log.start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def discard(self) -> None:
        """Kill it if it runs, reap it, remove its temporaries."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.join(5.0)  # the child's last lines (a traceback) are logged before it is judged
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ExportChild:
    """The daemon's handle on export children: runs one at a time, keeps the next one warm if asked, and
    stops both on request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: _Process | None = None
        self._spare: _Process | None = None  # imports done, waiting for the next export
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """The running export's process (not the spare's)."""
        running = self._running
        return running.proc.pid if running is not None and running.alive else None

    @property
    def spare_pid(self) -> int | None:
        spare = self._spare
        return spare.proc.pid if spare is not None and spare.alive else None

    def stop(self) -> bool:
        """Kill the running child and the spare, and any started later; True if an export was running."""
        with self._lock:
            self._stopped = True
            running, spare, self._spare = self._running, self._spare, None
            if spare is not None:
                spare.discard()
            if running is None or not running.alive:
                return False
            # SIGKILL: the converter does not return to Python for tens of seconds, so a handler would
            # not run sooner. Publishing is a rename under the registry's lock; a kill leaves at most a
            # .tmp-* folder, which the registry's next writer removes.
            running.proc.kill()
            return True

    def run(self, job: ExportJob) -> ExportOutcome | NothingExported | DiskFull:
        """``export_once`` in a child (the spare if one waits), given only its :class:`ExportJob`: its report.

        Afterwards, with ``export.prewarm_process``, the child waits for the next export if it converted nothing,
        or the next export's child is started. Raises
        :class:`ExportFailed` when the child ends without a readable report, :class:`ExportStopped` on a stop.
        """
        request = job.model_dump_json().encode() + b"\n"
        with self._lock:
            if self._stopped:
                raise ExportStopped("the daemon is stopping")
            child, self._spare = self._spare, None
            if child is not None and not child.alive:  # killed or crashed while it waited
                log.warning("the waiting export process ended (exit code %s); starting another", child.proc.returncode)
                child.discard()
                child = None
            self._running = child if child is not None else _Process()
        stays = False
        try:
            # Not communicate(): it would read stderr too, racing the ChildLog thread for the child's log
            # lines (each reader got some, and communicate's share was lost).
            proc = self._running.proc
            assert proc.stdin is not None and proc.stdout is not None  # _Process opens both as pipes
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # the child ended already; its exit code says how
            out = proc.stdout.readline()
            stays = proc.stdout.readline().strip().decode("ascii", "replace") == _STAYS
            code = 0 if stays else proc.wait()
        finally:
            with self._lock:
                done, self._running = self._running, None
                if stays and not self._stopped:
                    self._spare = done  # it waits for the next export, its imports done
                else:
                    done.discard()
                    if job.export.prewarm_process and not self._stopped:
                        try:
                            self._spare = _Process()
                        except OSError as err:  # no room for its folder, no process: the next export starts one
                            log.warning("could not start the next export's process ahead of time: %s", err)
        if self._stopped:
            raise ExportStopped("the daemon is stopping")
        if code != 0:
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            printed = done.log.quote()
            raise ExportFailed(
                f"the export process ended without an outcome ({how}; its log lines are above)"
                + (f"; it printed: {printed}" if printed else "")
            )
        try:
            return read_report(out)
        except MalformedReport as err:
            raise ExportFailed(f"{err} (the export process wrote {len(out)} bytes)") from err


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[0]), Exit.SOFTWARE)  # an orphan must not publish beside a new daemon
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # litert-torch and ai-edge-quantizer print to stdout; only the outcome goes there

    # What every export imports (torch); litert-torch (~6 s of CPU) only while no export is due: a full
    # conversion needs it, an export that only writes a new head does not (conversions.py), and such an
    # export is often due before a waiting process has imported everything.
    from daemon.common import logs
    from daemon.export.converter import conversions_run
    from daemon.export.pipeline import NothingToExport, export_once
    from daemon.store.errors import is_disk_full

    served = 0
    while True:
        # Right after an export the next is often due within a poll of the daemon's: wait that long first.
        if not select.select([sys.stdin], [], [], 0 if served == 0 else _DUE_SOON_S)[0]:
            import litert_torch  # noqa: F401 - imported for its cost, used by daemon.export.converter
            from litert_torch.quantize import pt2e_quantizer, quant_config  # noqa: F401 - int8's converter

        document = sys.stdin.buffer.readline()
        if not document.strip():  # the daemon discarded this process without using it (again)
            return 0
        job = ExportJob.model_validate_json(document)
        # JSON lines whatever the daemon's format: the daemon reads them and logs them again (ChildLog).
        logs.configure(job.log_level, "json")
        report: ExportOutcome | NothingExported | DiskFull
        try:
            report = export_once(job)
        except NothingToExport as err:
            report = NothingExported(why=str(err))
        except OSError as err:
            if not is_disk_full(err):
                log.exception("export failed: %s", err)
                return Exit.SOFTWARE
            report = DiskFull.of(err)
        except Exception as err:
            log.exception("export failed: %s", err)
            return Exit.SOFTWARE
        served += 1
        # It serves the next export too unless it converted (litert-torch keeps tens of MiB after each
        # conversion) or has served many (anything else that grows stays bounded).
        stays = job.export.prewarm_process and conversions_run() == 0 and served < MOST_EXPORTS_PER_PROCESS
        result.write(write_report(report) + "\n" + (_STAYS if stays else _ENDS) + "\n")
        result.flush()
        if not stays:
            result.close()
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
