"""One export in a child process that exits after it: the daemon's side is ``run_export``, the child's ``main``.

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

Protocol: the daemon writes its pickled ``Settings`` to the child's stdin
and closes it; the child runs ``export_once`` and writes one JSON document,
the outcome, to its stdout, which is its own (everything the child's
libraries print goes to stderr, the daemon's journal, as its log lines do).
The child's temporaries live in a folder the daemon removes when the child
has ended, however it ended.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import daemon
from daemon.parent_death import die_with_parent
from daemon.settings import Settings

log = logging.getLogger("sprout.export")

PROJECT_ROOT = Path(daemon.__file__).resolve().parent.parent  # the folder holding daemon/, for PYTHONPATH
EX_SOFTWARE = 70  # sysexits.h: the export raised; its traceback is in the log
TMP_PREFIX = "sprout-export-"  # + the daemon's pid: a child's temporaries, in the system's temporary folder


def remove_orphaned_temporaries() -> int:
    """Remove the temporaries of export children whose daemon is gone (killed: it could not clean up)."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        owner = folder.name[len(TMP_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class ExportFailed(Exception):
    """The child ended without an outcome: it raised (traceback in the log), crashed, or was killed."""


class ExportStopped(Exception):
    """The daemon stopped the child (``ExportChild.stop``): the export is dropped, nothing was half-published."""


class ExportChild:
    """The daemon's handle on export children: runs one at a time, stops the running one on request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> bool:
        """Kill the running child, and any started later; True if one was running."""
        with self._lock:
            self._stopped = True
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return False
            # SIGKILL: the converter does not return to Python for tens of seconds, so a handler would
            # not run sooner. Publishing is a rename under the registry's lock; a kill leaves at most a
            # .tmp-* folder, which the registry's next writer removes.
            proc.kill()
            return True

    def run(self, settings: Settings) -> dict[str, Any]:
        """``export_once(settings)`` in a child: its outcome as a JSON document (see ``main``)."""
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        env = {**os.environ, "TMPDIR": tmp,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            with self._lock:
                if self._stopped:
                    raise ExportStopped("the daemon is stopping")
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "daemon.export_child", str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=tmp,
                )
            out, _ = self._proc.communicate(pickle.dumps(settings))
            code = self._proc.returncode
        finally:
            self._proc = None
            shutil.rmtree(tmp, ignore_errors=True)
        if self._stopped:
            raise ExportStopped("the daemon is stopping")
        if code != 0:
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise ExportFailed(f"the export process ended without an outcome ({how}; its log lines are above)")
        try:
            return json.loads(out)
        except ValueError as err:
            raise ExportFailed(f"the export process wrote no readable outcome: {err}") from err


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[0]), EX_SOFTWARE)  # an orphan must not publish beside a new daemon
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # litert-torch and ai-edge-quantizer print to stdout; only the outcome goes there
    settings: Settings = pickle.load(sys.stdin.buffer)

    from daemon import logs
    from daemon.publishing import NothingToExport, export_once
    from daemon.store import is_disk_full

    logs.configure(settings.logging.level, settings.logging.format)
    try:
        outcome = export_once(settings)
    except NothingToExport as err:
        doc: dict[str, Any] = {"nothing": str(err)}
    except OSError as err:
        if not is_disk_full(err):
            log.exception("export failed: %s", err)
            return EX_SOFTWARE
        doc = {"disk_full": {"errno": err.errno, "strerror": err.strerror, "filename": err.filename}}
    except Exception as err:  # noqa: BLE001 - reported to the daemon by the exit code, with the traceback logged
        log.exception("export failed: %s", err)
        return EX_SOFTWARE
    else:
        doc = {"outcome": {
            "published": outcome.published,
            "reasons": [{"text": str(r), "kind": getattr(r, "kind", "other")} for r in outcome.reasons],
            "metrics": outcome.metrics,
            "seconds": outcome.seconds,
            "skipped": outcome.skipped,
        }}
    json.dump(doc, result, default=str)
    result.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
