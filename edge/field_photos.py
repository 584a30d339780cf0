"""Photos for labelling, on the device: an outbox in the model folder that ``classify --send-unsure``,
``classify --send-samples`` and ``sprout-edge correct`` fill and ``sync --send-photos`` empties (opt-in;
docs/devices.md, "Photos for labelling").

Layout of ``<model dir>/outbox/``::

    <photo_id>.photo.json  one photo as the server takes it, less ``device`` (added when it is sent): its kind,
                           the model version and its guesses, a correction's label, the JPEG in base64.
                           ``photo_id`` starts with the UTC time it was added, so names sort oldest first
    .state.json            {"day", "added", "wait_until"}: photos added this UTC day (the device's own cap), and
                           the time before which nothing is sent: a 429's or a 503's Retry-After, or an hour
                           after another refusal (404: photos not taken there; 401: the token)
    .lock                  held while the outbox changes (flock: the kernel frees it if the holder dies)
    .tmp-*                 a write cut short; the next add removes it

A photo file is written whole (edge/atomic.py), so it is there complete or not at all. It is deleted once the
server has stored it (202, or 200: stored before) or refused it as it is (400, 413); a kill between the
answer and the delete leaves it to be sent again, and the server stores it once (by its photo_id). Nothing
is sent under the lock: an upload on a slow link must not hold up a classification adding a photo.

What leaves the phone is the photo turned upright, downscaled to 640 pixels on the long side and encoded
again as JPEG, which leaves its EXIF behind (no place, no time, no phone), and the model's guesses.

>>> outbox = Outbox("/var/lib/sprout-edge/maize")  # doctest: +SKIP
>>> outbox.add("leaf.jpg", "unsure", version=7, guesses=[("rust", 0.41), ("blight", 0.33)])  # doctest: +SKIP
True
>>> outbox.send(ModelServer("http://10.0.0.5:8080", "maize"), device_id="0b6f...")  # doctest: +SKIP
SentPhotos(queued=1, resent=0, refused=0, kept=0, wait_until=None, detail='')
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from edge import preprocess  # noqa: F401  (registers pillow-heif with Pillow where installed: HEIC opens)
from edge.atomic import TMP_PREFIX, write_atomic
from edge.fetch import FetchError, ModelServer

log = logging.getLogger("sprout_edge.field_photos")

OUTBOX, PHOTO_SUFFIX, STATE_FILE, LOCK_FILE = "outbox", ".photo.json", ".state.json", ".lock"
KINDS = ("unsure", "correction", "sample")
LONG_SIDE = 640  # pixels: what a labeller needs to see a lesion, and ~100 kB over a field's weak link
JPEG_QUALITY = 85
MAX_GUESSES = 5  # the server takes 1 to 5
MAX_LABEL_CHARS = 128  # the server's default store.max_label_chars
PER_DAY = 20  # the server's default field.photos_per_device_per_day: more would be refused there
KEEP = 100  # photos waiting at most (five days at the daily cap); a device offline longer drops the oldest
DAY_S = 86400
# After a 429 without Retry-After, or a refusal of every photo (404: not taken there, 401, 403): each try sends
# a photo's ~100 kB before the answer, and a watch syncs every minute.
WAIT_S = 3600.0
# The longest wait kept: the server's are at most a day (429: the next UTC day). One further off means the
# phone's clock was set back since, and would stop sending for as long.
MAX_WAIT_S = 2 * DAY_S


class PhotoError(ValueError):
    """A photo that cannot be queued (unreadable, or not an image); the message says which and why."""


@dataclass(frozen=True)
class SentPhotos:
    queued: int = 0  # new in the server's labelling queue
    resent: int = 0  # stored there before (a send whose answer was lost): gone from the outbox all the same
    refused: int = 0  # refused as they are (400, 413), or unreadable: dropped, with a warning saying why
    kept: int = 0  # still in the outbox, for a later send
    wait_until: float | None = None  # epoch seconds before which nothing is sent (Retry-After; an hour after a 4xx)
    detail: str = ""  # why sending stopped short, when it did


def upright_jpeg(data: bytes, long_side: int = LONG_SIDE, quality: int = JPEG_QUALITY) -> bytes:
    """The photo as it is sent: upright (its EXIF orientation applied), RGB, at most ``long_side`` pixels on
    the long side (never enlarged), JPEG without EXIF. Raises :class:`PhotoError` when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale while both sides stay at least long_side: a 12 MP photo
            # never sits whole in a phone's memory. Not HEIF: its draft is the embedded thumbnail.
            if img.format != "HEIF":
                img.draft("RGB", (long_side, long_side))
            ImageOps.exif_transpose(img, in_place=True)
            rgb = img if img.mode == "RGB" else img.convert("RGB")  # alpha dropped, greyscale expanded
            rgb.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            # Saved without exif=: Pillow writes only the metadata it is given, so place, time and phone stay.
            rgb.save(out, format="JPEG", quality=quality, optimize=True)
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "not a photo to send"
        raise PhotoError(f"not an image Pillow can decode ({type(err).__name__}: {err})") from None
    return out.getvalue()


class Outbox:
    """The photos one model folder keeps for labelling; see the module docstring for the layout.

    ``per_day``: photos added a UTC day at most (the server refuses more, so a phone should not spend
    bandwidth on them); ``keep``: photos waiting at most; ``clock``: epoch seconds (tests turn it forward).
    """

    def __init__(
        self, folder: Path | str, per_day: int = PER_DAY, keep: int = KEEP, clock: Callable[[], float] = time.time
    ):
        if per_day < 1 or keep < 1:
            raise ValueError(f"per_day ({per_day}) and keep ({keep}) must be at least 1")
        self.folder = Path(folder) / OUTBOX
        self.per_day = per_day
        self.keep = keep
        self.clock = clock

    @contextlib.contextmanager
    def _holding(self) -> Iterator[dict[str, Any]]:
        """The outbox locked, and its state to change; written back when the block ends without an error."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._state()
            before = dict(state)
            yield state
            if state != before:
                write_atomic(self.folder / STATE_FILE, json.dumps(state).encode())

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.folder / STATE_FILE).read_bytes())
        except FileNotFoundError:
            state = None
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s): starting the day's count afresh", self.folder / STATE_FILE, err)
            state = None
        fresh: dict[str, Any] = {"day": None, "added": 0, "wait_until": None}
        if not isinstance(state, dict):
            return fresh
        # Each field checked on its own: a damaged one is forgotten, rather than failing every add and send.
        return {
            "day": state.get("day") if isinstance(state.get("day"), int) else None,
            "added": state.get("added") if isinstance(state.get("added"), int) else 0,
            "wait_until": state.get("wait_until") if isinstance(state.get("wait_until"), (int, float)) else None,
        }

    def photos(self) -> list[Path]:
        """The photos waiting, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return [self.folder / n for n in sorted(names) if n.endswith(PHOTO_SUFFIX) and not n.startswith(".")]

    def add(
        self,
        image: bytes | str | Path,
        kind: str,
        version: int,
        guesses: Sequence[tuple[str, float]],
        label: str | None = None,
    ) -> bool:
        """Queue ``image`` (its bytes or its path) with the model's ``guesses`` (best first; the first 5 are
        kept) of ``version``; ``label`` is the user's, for a correction. False when this UTC day's ``per_day``
        photos were added already: nothing is kept. Raises ValueError for a bad kind, guess or label, and
        :class:`PhotoError` for an image that cannot be read."""
        document = _document(kind, version, guesses, label)
        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as err:
                raise PhotoError(f"{image}: cannot read it ({err.strerror})") from None
        else:
            data = bytes(image)
        with self._holding() as state:
            now = self.clock()
            day = int(now // DAY_S)
            if state.get("day") != day:
                state.update(day=day, added=0)
            if state["added"] >= self.per_day:
                log.info("%d photos were queued today (the daily cap): this one is not", state["added"])
                return False
            try:
                jpeg = upright_jpeg(data)
            except PhotoError as err:
                raise PhotoError(f"{image if isinstance(image, (str, Path)) else 'the photo'}: {err}") from None
            photo_id = _photo_id(now)
            document = {"photo_id": photo_id, **document}
            document.update(content_type="image/jpeg", image=base64.b64encode(jpeg).decode("ascii"))
            for name in os.listdir(self.folder):  # under the lock, a temporary is a killed write's leftover
                if name.startswith(TMP_PREFIX):
                    (self.folder / name).unlink(missing_ok=True)
            write_atomic(self.folder / f"{photo_id}{PHOTO_SUFFIX}", json.dumps(document).encode())
            state["added"] += 1
            waiting = self.photos()
            for oldest in waiting[: max(0, len(waiting) - self.keep)]:
                log.warning("the outbox holds %d photos at most: %s, the oldest, is dropped", self.keep, oldest.name)
                oldest.unlink(missing_ok=True)
        return True

    def send(self, server: ModelServer, device_id: str, limit: int | None = None) -> SentPhotos:
        """Send the photos waiting, oldest first (at most ``limit``), as ``device_id``; see :class:`SentPhotos`.

        Stops at the first photo the server cannot take now (429, 503, 404, no answer) and keeps it and the
        rest; after a Retry-After (or a 4xx refusal: an hour), later calls send nothing until that time. Raises
        only for the folder."""
        with self._holding() as state:
            wait_until, now = state["wait_until"], self.clock()
            if wait_until is not None and now < wait_until <= now + MAX_WAIT_S:
                return SentPhotos(kept=len(self.photos()), wait_until=wait_until)
            state["wait_until"] = None
            waiting = self.photos()[:limit]
        queued = resent = refused = 0
        wait_until, detail = None, ""
        for path in waiting:
            try:
                document = json.loads(path.read_bytes())
                if not isinstance(document, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                continue  # dropped for a newer photo, or sent by another process meanwhile
            except ValueError as err:  # no server would take it: it cannot wait for one
                log.warning("%s is unreadable (%s): dropped", path, err)
                path.unlink(missing_ok=True)
                refused += 1
                continue
            try:
                status, answer = server.send_photo(json.dumps({"device": device_id, **document}).encode())
            except FetchError as err:
                if err.status in (400, 413):  # refused as it is: sent again, it would be refused again
                    log.warning("the server refused photo %s: %s; it is dropped", path.name, err)
                    path.unlink(missing_ok=True)
                    refused += 1
                    continue
                detail = str(err)
                # No answer, or a 5xx without Retry-After: tried again at the next sync.
                if err.retry_after is not None or (err.status is not None and 400 <= err.status < 500):
                    wait_until = self.clock() + (err.retry_after if err.retry_after is not None else WAIT_S)
                    with self._holding() as state:
                        state["wait_until"] = wait_until
                break  # the server cannot take photos now (or cannot be reached): every one waits
            if status == 202 or answer.get("queued") is True:
                queued += 1
            else:
                resent += 1
            path.unlink(missing_ok=True)
        return SentPhotos(queued, resent, refused, len(self.photos()), wait_until, detail)


def user_label(text: str) -> str:
    """The label a user gave, as the server takes it (surrounding spaces dropped); ValueError when it cannot be."""
    given = text.strip()
    if not 0 < len(given) <= MAX_LABEL_CHARS or not given.isprintable():
        raise ValueError(f"a label is 1-{MAX_LABEL_CHARS} printable characters on one line, not {text!r}")
    return given


def _photo_id(now: float) -> str:
    """The UTC time to the microsecond, so that names sort oldest first, and random hex, so that two apps
    adding at one instant never collide."""
    micros = int(now * 1_000_000) % 1_000_000
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{micros:06d}Z-{secrets.token_hex(4)}"


def _document(kind: str, version: int, guesses: Sequence[tuple[str, float]], label: str | None) -> dict[str, Any]:
    """A photo's fields but the image, checked as the server checks them, so a bad one fails here and now."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be the model version that made the guesses, not {version!r}")
    if not guesses:
        raise ValueError("a photo needs the model's guesses: at least the top-1 label and its score")
    listed = []
    for name, score in guesses[:MAX_GUESSES]:
        if not math.isfinite(score):
            raise ValueError(f"the model's score for {name!r} is {score}: no guess to send")
        # Clamped: a float32 softmax can come out a hair above 1, which the server refuses.
        listed.append({"label": name, "score": round(min(max(float(score), 0.0), 1.0), 6)})
    document: dict[str, Any] = {"kind": kind, "version": version, "guesses": listed}
    if kind == "correction":
        document["label"] = user_label(label or "")
    elif label is not None:
        raise ValueError(f"only a correction carries the user's label ({kind!r} does not)")
    return document


def send_photos(url: str, model: str, folder: Path | str, token: str | None = None) -> SentPhotos:
    """Send this device's outbox to the server at ``url`` (what ``sprout-edge sync --send-photos`` does after
    each sync); logs what became of the photos. Never raises for a server or a network that fails: they wait."""
    from edge.modeldir import ModelDir

    installed = ModelDir(folder)
    server = ModelServer(url, model, token)
    outbox = Outbox(folder)
    try:
        server.identify(installed.device_id(), installed.current())
        sent = outbox.send(server, installed.device_id())
    except (OSError, ValueError) as err:  # the folder, not the server: said, and the photos wait
        log.warning("model %s: cannot send photos (%s); they wait for the next sync", model, err)
        return SentPhotos(kept=len(outbox.photos()), detail=str(err))
    if sent.queued or sent.resent:
        log.info("model %s: %d photos queued for labelling (%d stored before)", model, sent.queued, sent.resent)
    if sent.kept:
        at = sent.wait_until
        when = "" if at is None else f", not before {time.strftime('%Y-%m-%d %H:%M', time.gmtime(at))} UTC"
        why = f": {sent.detail}" if sent.detail else ""
        log.info("model %s: %d photos kept for a later sync%s%s", model, sent.kept, when, why)
    return sent
