"""The checks that need the machine, not only the file: run by ``sprout run`` before it starts and by
``sprout check-config``, so that a configuration the checker passes is one the daemon starts with.

The settings' own validation covers values and their combinations; this covers what they point at: files
that must be readable, a signing key that must be private, the interpreters every export is verified on.
Each problem names its field and says what to do.

>>> from daemon.common.settings import Settings
>>> problems(Settings.load(None, {"server": {"token_file": "/nonexistent/token"}}))
['server.token_file: cannot read /nonexistent/token: No such file or directory']
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.common.settings import ConfigError, Settings
from daemon.registry.signing import Signer, SigningKeyError


def problems(s: Settings) -> list[str]:
    """Every problem found, each as 'field: what is wrong'; empty when the daemon can start with ``s``."""
    out: list[str] = []
    if s.server.enabled:
        for field in ("token_file", "tls_cert_file", "tls_key_file"):
            if (why := _unreadable(getattr(s.server, field))) is not None:
                out.append(f"server.{field}: {why}")
    if (why := _unreadable(s.model.weights_file)) is not None:
        out.append(f"model.weights_file: {why}")
    if s.state_dir.exists() and not (s.state_dir.is_dir() and os.access(s.state_dir, os.W_OK | os.X_OK)):
        out.append(f"state_dir: {s.state_dir} is not a folder this user can write to")
    if s.export.enabled and (s.training.enabled or s.role == "exporter"):  # this process will publish
        key = s.signing.resolved_key_file(s.state_dir)
        if key.exists():  # a missing key is created at the first publish
            try:
                Signer.load(key)
            except SigningKeyError as err:
                out.append(f"signing.key_file: {err}")
        from daemon.export.verification import unavailable

        if runtimes := unavailable(s.export.runtimes, s.export.tflite_runtime_python):
            out.append(f"export.runtimes: {'; '.join(runtimes)}")
    return out


def check(s: Settings) -> None:
    """Raise ConfigError (exit 78) naming every problem."""
    if found := problems(s):
        raise ConfigError("\n".join(found))


def _unreadable(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"
    return None
