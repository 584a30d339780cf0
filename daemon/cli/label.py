"""``sprout label``: answer the labelling queue in a terminal, the photos devices sent back (daemon/store/labelling.py).

``sprout label`` goes through the queue, most useful first: each photo shown in the terminal (24-bit
colour half blocks, which work over ssh) or saved with ``--save DIR``, the model's guesses numbered; a
number or a label's name answers it, ``s`` skips it (not a leaf, not learnable), ``q`` stops. Each answer
is committed at once and becomes a training example, learned in the learner's next steps.
``sprout label list`` prints the queue; ``sprout label answer ID LABEL`` and ``sprout label skip ID`` answer
one photo from a script.
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from daemon.cli.flags import config_flags, load_settings
from daemon.common.exits import Exit
from daemon.common.settings import Settings

if TYPE_CHECKING:
    from daemon.store.examples import Store
    from daemon.store.labelling import QueuedPhoto

PREVIEW_COLUMNS = 48


def add_parser(sub: argparse._SubParsersAction) -> None:
    label = sub.add_parser(
        "label",
        help="answer the labelling queue: the photos devices sent back, most useful first",
        description="Go through the labelling queue in the terminal: each photo with the model's guesses; answer "
        "with a number or a label's name, s to skip, q to stop. Each answer becomes a training example at once.",
    )
    config_flags(label)
    label.add_argument("--save", type=Path, metavar="DIR", help="also write each photo shown into DIR, for a viewer")
    label.add_argument("--no-preview", action="store_true", help="do not draw the photo in the terminal")
    label_sub = label.add_subparsers(dest="label_command", metavar="SUBCOMMAND")
    ls = label_sub.add_parser("list", help="the queue, most useful first, and how many photos are in each state")
    config_flags(ls)
    ls.add_argument("--limit", type=int, default=20, help="photos listed (default 20)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    answer = label_sub.add_parser("answer", help="label one photo: it becomes a training example")
    answer.add_argument("id", type=int, help="the photo's id, as `sprout label list` shows it")
    answer.add_argument("label", help="its label")
    config_flags(answer)
    skip = label_sub.add_parser("skip", help="take one photo out of the queue unlabelled (not learnable)")
    skip.add_argument("id", type=int, help="the photo's id")
    config_flags(skip)
    label.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    from daemon.store.errors import StoreError
    from daemon.store.examples import Store
    from daemon.store.labelling import AnswerError
    from daemon.store.location import StoreLocation

    settings = load_settings(args)
    command = args.label_command or "session"
    what = "sprout label" + ("" if command == "session" else f" {command}")
    try:
        known = _known_labels(settings)
        # A writer of the store, as `sprout labels` is: every answer is a commit, whether the daemon runs or not.
        store = Store(StoreLocation.of_settings(settings), settings.store.migrate_on_start, "sprout-label")
    except StoreError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.NOINPUT
    try:
        if command == "list":
            return _list(store, args.limit, args.json)
        if command in ("answer", "skip"):
            label = args.label if command == "answer" else None
            answered = store.answer_photo(args.id, label, _who(), settings.store.max_label_chars)
            print(_answered(answered.photo_id, label, label is not None and label not in known))
            return 0
        return _session(store, settings, known, args, sys.stdin, sys.stdout)
    except AnswerError as err:
        print(f"{what}: {err}", file=sys.stderr)
        return Exit.DATAERR
    finally:
        store.close()


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "sprout label"


def _known_labels(settings: Settings) -> list[str]:
    """The classes to offer: the learner's outputs, then every label stored (as named now)."""
    from daemon.cli.labels import _learner_outputs
    from daemon.store.labels import LabelMap
    from daemon.store.location import StoreLocation
    from daemon.store.reader import StoreReader

    reader = StoreReader(StoreLocation.of_settings(settings))
    try:
        reader.labels = LabelMap.replay(reader.label_changes())
        outputs = _learner_outputs(settings, reader) or []
        stored = [label for label in reader.label_counts() if label not in reader.labels.retired]
    finally:
        reader.close()
    return outputs + sorted(set(stored) - set(outputs))


def _answered(photo_id: int, label: str | None, new: bool) -> str:
    if label is None:
        return f"photo {photo_id} skipped: out of the queue, not learned"
    added = " (a new class: the learner adds an output for it)" if new else ""
    return f"photo {photo_id} labelled {label!r}{added}: a training example now, learned in the next steps"


def _age(at: float) -> str:
    s = max(time.time() - at, 0.0)
    return f"{s / 60:.0f} min ago" if s < 3600 else f"{s / 3600:.1f} h ago" if s < 172800 else f"{s / 86400:.0f} d ago"


def _list(store: Store, limit: int, as_json: bool) -> int:
    photos, counts = store.labelling_queue(limit)
    if as_json:
        rows = [
            {
                "id": p.id,
                "kind": p.kind.value,
                "version": p.version,
                "guesses": [{"label": g.label, "score": g.score} for g in p.guesses],
                "user_label": p.user_label,
                "received_at": p.received_at,
                "uncertainty": p.uncertainty,
                "novelty": p.novelty,
                "priority": p.priority,
            }
            for p in photos
        ]
        print(json.dumps({"states": counts, "queue": rows}, indent=2, ensure_ascii=False))
        return 0
    print(", ".join(f"{n} {state}" for state, n in counts.items()))
    if not photos:
        print("the queue is empty: devices send photos back when their model is unsure (docs/devices.md)")
        return 0
    print(f"{'ID':>6}  {'KIND':<10}  {'VERSION':>7}  {'PRIORITY':>8}  {'RECEIVED':>11}  GUESSES")
    for p in photos:
        guesses = ", ".join(f"{g.label} {g.score:.2f}" for g in p.guesses[:3])
        said = f"; user says {p.user_label!r}" if p.user_label else ""
        print(
            f"{p.id:>6}  {p.kind.value:<10}  {p.version:>7}  {p.priority:>8.2f}  {_age(p.received_at):>11}  {guesses}{said}"
        )
    return 0


def _session(
    store: Store, settings: Settings, known: list[str], args: argparse.Namespace, tty_in: TextIO, out: TextIO
) -> int:
    """Answer photos one by one until the queue is empty, or q (or the end of input)."""
    seen: set[int] = set()  # skipped for now in this session ("n"): not offered again
    answered = 0
    while True:
        photos, counts = store.labelling_queue(len(seen) + 1)
        photo = next((p for p in photos if p.id not in seen), None)
        if photo is None:
            print(f"the queue is empty ({answered} answered here)", file=out)
            return 0
        image = store.labelling_image(photo.id)
        if image is None:  # answered from elsewhere since the queue was read
            seen.add(photo.id)
            continue
        _show(photo, image, counts["queued"], args, out)
        choice = _ask(photo, known, tty_in, out)
        if choice == "quit":
            print(f"stopped ({answered} answered here, {counts['queued']} still queued)", file=out)
            return 0
        if choice == "later":
            seen.add(photo.id)
            continue
        from daemon.store.labelling import AnswerError

        label = None if choice == "skip" else choice
        try:
            done = store.answer_photo(photo.id, label, _who(), settings.store.max_label_chars)
        except AnswerError as err:
            print(f"not taken: {err}", file=out)
            seen.add(photo.id)
            continue
        answered += 1
        new = label is not None and label not in known
        print(_answered(done.photo_id, label, new), file=out)
        if new:
            known.append(str(label))


def _show(photo: QueuedPhoto, image: tuple[str, bytes], queued: int, args: argparse.Namespace, out: TextIO) -> None:
    content_type, data = image
    said = f", the user says {photo.user_label!r}" if photo.user_label else ""
    print(
        f"\nphoto {photo.id} ({queued} queued): {photo.kind.value}{said}, model version {photo.version}, "
        f"{_age(photo.received_at)}, priority {photo.priority:.2f}",
        file=out,
    )
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        path = args.save / f"photo-{photo.id}.{content_type.split('/')[1]}"
        path.write_bytes(data)
        print(f"  saved as {path}", file=out)
    if not args.no_preview and out.isatty():
        print(preview(data, PREVIEW_COLUMNS), file=out)


def _ask(photo: QueuedPhoto, known: list[str], tty_in: TextIO, out: TextIO) -> str:
    """A label, or "skip", "later", "quit": from a number, a name, s, n or q (the end of input is q)."""
    offered = photo.suggestions()
    for i, name in enumerate(offered, 1):
        score = next((f"{g.score:.2f}" for g in photo.guesses if g.label == name), "user's")
        print(f"  {i}  {name}  ({score})", file=out)
    others = [k for k in known if k not in offered]
    if others:
        print(f"  other classes: {', '.join(others)}", file=out)
    while True:
        print(f"label [1-{len(offered)}, a class's name, s skip, n next, q quit]: ", end="", file=out, flush=True)
        line = tty_in.readline()
        if not line:
            return "quit"
        text = line.strip()
        if text in ("q", "quit"):
            return "quit"
        if text in ("s", "skip"):
            return "skip"
        if text in ("n", "next"):
            return "later"
        if text.isdigit() and 1 <= int(text) <= len(offered):
            return offered[int(text) - 1]
        if not text:
            continue
        if text in known or text in offered:
            return text
        print(f"  {text!r} is no class yet: type it again to add it as a new class", file=out)
        again = tty_in.readline()
        if again.strip() == text:
            return text


def preview(data: bytes, columns: int) -> str:
    """The photo as lines of '▀' in 24-bit colour: each character is two pixels, the upper one its foreground."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        upright = ImageOps.exif_transpose(opened).convert("RGB")
    rows = max(2, round(upright.height / upright.width * columns / 2) * 2)
    small = upright.resize((columns, rows))
    px = [small.getpixel((x, y)) for y in range(rows) for x in range(columns)]
    lines = []
    for y in range(0, rows, 2):
        cells = []
        for x in range(columns):
            (r1, g1, b1), (r2, g2, b2) = px[y * columns + x], px[(y + 1) * columns + x]  # type: ignore[misc]
            cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
        lines.append("  " + "".join(cells) + "\x1b[0m")
    return "\n".join(lines)
