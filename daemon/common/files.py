"""Files that are whole or absent: written beside their place and renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A new file whose contents take ``path``'s place in one rename when the block ends without error; on an
    error (or a crash) ``path`` keeps what it held and the partial file is removed (or left as ``.tmp-*``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_replacing(path: Path, data: bytes) -> None:
    with replacing(path) as f:
        f.write(data)
