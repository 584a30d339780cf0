"""Label curation: rename, merge or retire a class while the daemon runs, as changes recorded in the store.

``sprout labels rename|merge|delete`` appends one :class:`LabelChange` to the
store's ``label_changes`` table, in a transaction that first checks it against
the changes before it; no example row is rewritten. Every reader of the store
resolves the label an example was sent with through the changes so far (a
:class:`LabelMap`):

- a renamed or merged label reads as its new name, for the examples stored and
  for those that still arrive under the old one (a sender with the typo keeps
  feeding the right class instead of bringing the typo back as an output);
- a deleted label is retired: its examples stay stored (nothing is lost, and
  ``labels list`` still counts them) but are neither learned nor scored by the
  export gates, and neither are any that arrive with it later.

The learner applies each change between two steps (:func:`outputs_after`: a
renamed output keeps its row of weights, a merged or retired one is removed
from the head) and keeps the id of the last change it applied in its
checkpoint, so a stopped daemon applies the rest when it next starts, and an
export from an older checkpoint applies them to its snapshot.

>>> m = LabelMap()
>>> merge = LabelChange(1, 0.0, Action.MERGE, "leaf rust", "leaf_rust")
>>> m.apply(merge)
>>> m.name("leaf rust"), m.resolve("leaf_rust")
('leaf_rust', 'leaf_rust')
>>> outputs_after(["healthy", "leaf rust", "leaf_rust"], merge)
(['healthy', 'leaf_rust'], 1)
>>> m.apply(LabelChange(2, 0.0, Action.DELETE, "leaf_rust", None))
>>> m.resolve("leaf rust") is None
True
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field


class Action(enum.Enum):
    """What a change does; the value is the ``sprout labels`` subcommand and what the store records."""

    RENAME = "rename"
    MERGE = "merge"
    DELETE = "delete"


# The registry history's event per action (daemon/registry/versions.py).
EVENTS = {Action.RENAME: "label_renamed", Action.MERGE: "label_merged", Action.DELETE: "label_deleted"}


@dataclass(frozen=True, slots=True)
class LabelChange:
    id: int  # the store's, strictly increasing: the learner applies changes in this order
    at: float  # when it was made, Unix time
    action: Action
    label: str
    into: str | None  # the new name (rename) or the class it joins (merge); None for delete

    @property
    def event(self) -> str:
        return EVENTS[self.action]

    def __str__(self) -> str:
        if self.action is Action.RENAME:
            return f"renamed {self.label!r} to {self.into!r}"
        if self.action is Action.MERGE:
            return f"merged {self.label!r} into {self.into!r}"
        return f"retired {self.label!r}"


class LabelError(ValueError):
    """A change that cannot be made as asked; the message says what to do instead."""


@dataclass
class LabelMap:
    """What every label examples were sent with means after the changes applied so far.

    ``aliases`` and ``retired`` are replaced, never changed in place: another thread (the status page)
    may be reading the previous ones while the learner applies a change.
    """

    last: int = 0  # id of the last change applied
    aliases: dict[str, str] = field(default_factory=dict)  # old name -> its name now (itself never an alias)
    retired: frozenset[str] = frozenset()

    @classmethod
    def replay(cls, changes: Iterable[LabelChange]) -> LabelMap:
        m = cls()
        for change in changes:
            m.apply(change)
        return m

    def name(self, label: str) -> str:
        """The class an example sent with ``label`` belongs to now (possibly a retired one)."""
        return self.aliases.get(label, label)

    def resolve(self, label: str) -> str | None:
        """The class an example sent with ``label`` is learned and scored as; None when it is retired."""
        name = self.name(label)
        return None if name in self.retired else name

    def apply(self, change: LabelChange) -> None:
        if change.action is Action.DELETE:
            self.retired = self.retired | {change.label}
        else:
            into = change.into
            assert into is not None
            aliases = {old: into if now == change.label else now for old, now in self.aliases.items()}
            aliases[change.label] = into
            aliases.pop(into, None)  # a rename back: the name is a class again, not an alias
            self.aliases = aliases
        self.last = change.id

    def check(self, action: Action, label: str, into: str | None, known: Iterable[str], max_chars: int) -> None:
        """Raise :class:`LabelError` unless the change makes sense; ``known``: the live classes' names."""
        live = set(known) - self.retired
        self._check_source(action, label, live)
        if action is Action.DELETE:
            if into is not None:
                raise LabelError("delete takes one label")
            return
        if into is None:
            raise LabelError(f"{action.value} needs a second label: the new name (rename) or the class to merge into")
        if into == label:
            raise LabelError(f"{label!r} is already called that")
        if into in self.retired:
            raise LabelError(f"{into!r} is a retired label: pick another name")
        if into in self.aliases and self.aliases[into] != label:
            # Examples sent as `into` read as another class: a class of that name would take them over.
            now = self.aliases[into]
            raise LabelError(
                f"{into!r} was renamed or merged into {now!r} and its examples read as that: "
                + ("pick another name" if action is Action.RENAME else f"merge into {now!r}")
            )
        if action is Action.RENAME:
            if into in live:
                raise LabelError(
                    f"{into!r} is a label already: to fold {label!r} into it, use "
                    f"`sprout labels merge {shlex.quote(label)} {shlex.quote(into)}`"
                )
            if not (0 < len(into) <= max_chars and into.isprintable() and into == into.strip()):
                raise LabelError(
                    f"new label {into!r}: use 1-{max_chars} printable characters without surrounding "
                    "spaces (store.max_label_chars)"
                )
        elif into not in live:
            raise LabelError(f"unknown label {into!r} to merge into; known labels: {_listed(live)}")

    def _check_source(self, action: Action, label: str, live: set[str]) -> None:
        if label in live:
            return
        if label in self.retired:
            raise LabelError(
                f"{label!r} is retired already"
                if action is Action.DELETE
                else f"{label!r} is retired: it cannot be renamed or merged"
            )
        if label in self.aliases:
            raise LabelError(
                f"{label!r} was renamed or merged into {self.aliases[label]!r}: "
                f"{action.value} {self.aliases[label]!r} instead"
            )
        raise LabelError(f"unknown label {label!r}; known labels: {_listed(live)}")


def outputs_after(outputs: list[str], change: LabelChange) -> tuple[list[str], int | None]:
    """The learner's outputs after ``change``, and the index of the output it removes (None when none).

    A rename, or a merge into a class that has no output yet, keeps the output and its weights under the
    new name; a merge into an existing output or a retirement removes the label's output.
    """
    if change.label not in outputs:
        return list(outputs), None
    index = outputs.index(change.label)
    if change.action is Action.DELETE or change.into in outputs:
        return outputs[:index] + outputs[index + 1 :], index
    into = change.into if change.into is not None else change.label  # a rename or a merge always names it
    return [into if label == change.label else label for label in outputs], None


def _listed(labels: set[str]) -> str:
    return ", ".join(repr(label) for label in sorted(labels)) or "none yet"
