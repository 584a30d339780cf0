"""Log set-up: plain lines for terminals, no duplicate timestamp under journald, JSON lines on request."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _stamped() -> logging.Formatter:
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


class JournalLines(logging.Formatter):
    """Lines for journald: no timestamp (it stamps each line itself), and every line prefixed with the
    record's syslog priority (``<4>`` for a warning, sd-daemon(3)), which journald strips and keeps as the
    entry's priority, so ``journalctl -p warning`` shows warnings and errors, tracebacks included."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in self.PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
        prefix = f"<{self.PRIORITIES[level]}>"
        # journald reads one entry per line: each line of a traceback carries the priority too.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_the_journal() -> bool:
    """True when standard error is the journal stream systemd set up (JOURNAL_STREAM is its device:inode);
    not merely inherited by a child whose stderr was redirected elsewhere (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLines())
    elif stderr_is_the_journal():
        handler.setFormatter(JournalLines())
    else:
        handler.setFormatter(_stamped())
    _install([handler], level)


def configure_to_file(path: Path, level: str = "INFO") -> None:
    """Every record at ``level`` to ``path``; only warnings and errors to the terminal.

    For commands that draw their own progress on the terminal (``sprout demo``): the daemon's
    log lines would scroll it away, yet a real problem must still show where the person looks.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(_stamped())
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _install([to_file, to_terminal], level)


def native_stderr_to(path: Path) -> None:
    """Send what native code writes to file descriptor 2 to ``path``; Python's ``sys.stderr`` stays on the terminal.

    The interpreters and converters print from C++ straight to descriptor 2 (LiteRT's "Created
    TensorFlow Lite XNNPACK delegate", absl's notices), past Python's logging. For a command that owns
    the terminal (``sprout demo``) they belong in its log file; Python's own tracebacks and the log's
    warnings still reach the person through ``sys.stderr``. Processes started later inherit the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def _install(handlers: list[logging.Handler], level: str) -> None:
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    # paho logs every packet at DEBUG; keep it quiet unless asked for.
    logging.getLogger("sprout.paho").setLevel(max(logging.getLevelName(level), logging.INFO))
    # torchao (pulled in by litert-torch's quantizer) warns on import about GPU kernels and Triton that a
    # CPU export never uses: noise in every export's log, so only its errors pass.
    logging.getLogger("torchao").setLevel(max(logging.getLevelName(level), logging.ERROR))
