"""A helper process dies with the process that started it: Linux's parent-death signal.

The daemon's helpers (an export process, decoder processes) must not outlive a
daemon that was SIGKILLed: an orphaned export could publish beside the next
daemon, and orphaned decoders would hold their shared memory and keep
multiprocessing's resource tracker from removing it. Under systemd the
cgroup is killed as a whole; elsewhere (a shell, tests) this is what ends them.
"""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, exit_code: int) -> None:
    """SIGKILL this process when ``parent`` dies (exit with ``exit_code`` if it is already gone).

    The signal follows the thread that started this process, not its whole process: start helpers
    from a thread that lives as long as they are needed.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the daemon's stop() and systemd's cgroup kill remain
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(exit_code)
