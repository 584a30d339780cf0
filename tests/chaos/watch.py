"""Kill a process the instant a file appears: Linux inotify, read through ctypes (the standard library has none).

Polling a folder misses a checkpoint write, which lasts a few milliseconds;
inotify tells us of the temporary file as it is created, so a SIGKILL sent
then lands between its creation and its rename: inside the write.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

_libc = ctypes.CDLL(None, use_errno=True)


class Watch:
    """Names created in ``folders`` (not recursive), as they are created."""

    def __init__(self, folders: list[Path]):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for folder in folders:
            if _libc.inotify_add_watch(self.fd, str(folder).encode(), IN_CREATE | IN_MOVED_TO) < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, f"inotify_add_watch {folder}")

    def names(self, timeout_s: float) -> list[str]:
        """Names created since the last call; waits up to ``timeout_s`` for the first."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        out, offset = [], 0
        while offset < len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            out.append(data[start : start + length].rstrip(b"\0").decode(errors="replace"))
            offset = start + length
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (its export process, its decoder processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return found


def kill_when_created(pid: int, folders: list[Path], wanted: Callable[[str], bool], timeout_s: float) -> str | None:
    """SIGKILL ``pid`` as soon as a name that ``wanted`` accepts appears in ``folders``; that name, or None on timeout.

    Its children first: a publish is written by the daemon's export process, which would otherwise
    finish it in the moment between the daemon's death and its own (the parent-death signal). The
    children are listed before each wait, not after the event: reading /proc/<pid>/task/*/children for
    every thread of the daemon takes milliseconds, and a small model's publish reached its rename in
    that time (a regression test failed so once in CI)."""
    deadline = time.monotonic() + timeout_s
    with Watch(folders) as watch:
        while (left := deadline - time.monotonic()) > 0:
            known = children(pid)  # the export process exists for seconds before it publishes
            for name in watch.names(min(left, 0.05)):
                if wanted(name):
                    for child in known:
                        _kill(child)
                    for child in children(pid):  # any started since the last listing
                        _kill(child)
                    os.kill(pid, signal.SIGKILL)
                    return name
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
