"""What is checked once the chaos is over, on the state directory the daemon left behind.

Each check returns the problems it found as sentences; an empty list is a pass.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from daemon.learning import checkpoint
from daemon.registry.layout import LABELS_FILE, MODEL_FILE
from daemon.registry.versions import Registry, RegistryError, registry_root
from edge.atomic import TMP_PREFIX
from edge.model import EdgeModel, ModelError
from edge.trust import SignatureError, verify_document, verify_file

# Reasons in the registry's log that mean an interpreter could not load or run a candidate, or gave NaN,
# as opposed to an accuracy gate doing its job (accuracy_drop, regression): daemon/export/gates.py.
RUNTIME_FAILURE_WORDS = ("could not load or run", "NaN or infinite", "no runtime verified")


@dataclass
class Examples:
    published: int  # ids the broker acknowledged to the feeder
    stored: int  # distinct ids in the store
    lost: list[str]  # published, not stored
    duplicated: list[str]  # stored more than once
    unexpected: list[str]  # stored, never published


def examples(state: Path, published: set[str]) -> Examples:
    db = sqlite3.connect(f"file:{state / 'examples.db'}?mode=ro", uri=True)
    try:
        rows = [r[0] for r in db.execute("SELECT example_id FROM examples")]
    finally:
        db.close()
    counts = Counter(rows)
    return Examples(
        published=len(published),
        stored=len(counts),
        lost=sorted(published - counts.keys()),
        duplicated=sorted(i for i, n in counts.items() if n > 1),
        unexpected=sorted(counts.keys() - published),
    )


def store_high_water_mark(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / 'examples.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM examples").fetchone()[0]
    finally:
        db.close()


def learner(state: Path) -> list[str]:
    """The checkpoint loads, and the learner has learned every stored training example exactly once."""
    try:
        payload = checkpoint.load(state / "checkpoints")
    except checkpoint.CheckpointError as err:
        return [f"checkpoint does not load: {err}"]
    if payload is None:
        return ["no checkpoint was written"]
    db = sqlite3.connect(f"file:{state / 'examples.db'}?mode=ro", uri=True)
    try:
        max_seq = db.execute("SELECT MAX(seq) FROM examples").fetchone()[0]
        train = db.execute("SELECT COUNT(*) FROM examples WHERE split = 'train'").fetchone()[0]
    finally:
        db.close()
    problems = []
    if payload.high_water_mark != max_seq:
        problems.append(f"checkpoint high-water mark {payload.high_water_mark}, store {max_seq}: not caught up")
    if payload.trained != train:
        problems.append(f"checkpoint says {payload.trained} examples trained, the store holds {train} for training")
    return problems


def temporaries(folder: Path) -> list[str]:
    """Leftovers of interrupted writes (edge/atomic.py, which the daemon's checkpoint and registry use, names them ``.tmp-*``)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(f"{TMP_PREFIX}*"))


@dataclass
class Models:
    versions_published: list[int]  # from the registry's log, in order
    recovered: int = 0  # ... of which a restart finished (daemon/registry/versions.py _finish_interrupted_publish)
    refused: int = 0  # candidates the gates refused (logged, never published)
    refused_by_runtime: int = 0  # ... of which because an interpreter failed to load or run them, or gave NaN
    failing: list[str] = field(default_factory=list)  # published versions failing the device-side checks
    problems: list[str] = field(default_factory=list)


def models(state: Path, model: str) -> Models:
    """Every version on disk verifies and runs as a device would load it; versions only ever increase."""
    try:
        registry = Registry.open_readonly(registry_root(state), model)
    except RegistryError as err:
        return Models([], problems=[f"no registry: {err}"])
    events = registry.events()
    out = Models([e["version"] for e in events if e.get("event") == "published"])
    out.recovered = sum(1 for e in events if e.get("event") == "published" and e.get("recovered"))
    for e in events:
        if e.get("event") == "rejected":
            out.refused += 1
            if any(word in reason for reason in e.get("reasons", []) for word in RUNTIME_FAILURE_WORDS):
                out.refused_by_runtime += 1
    if any(b <= a for a, b in zip(out.versions_published, out.versions_published[1:], strict=False)):
        out.problems.append(f"published versions are not strictly increasing: {out.versions_published}")
    on_disk = registry.versions()
    if unlogged := sorted(set(on_disk) - set(out.versions_published)):
        out.problems.append(f"versions {unlogged} are on disk but their publish is not in the log")
    latest = registry.latest()
    if latest is None:
        out.problems.append("nothing published: latest is missing")
    elif on_disk and latest["version"] != max(on_disk):
        out.problems.append(f"latest names version {latest['version']}, but version {max(on_disk)} is on disk")
    public_key = state / "signing" / "signing.pub"
    for version in on_disk:
        try:
            manifest = registry.manifest(version)
            tflite = registry.model_path(version).read_bytes()
            verify_document(registry.document(version), registry.signature(version), public_key)
            verify_file(manifest, tflite)
            if manifest["version"] != version:
                raise ModelError(f"its manifest says version {manifest['version']}")
            labels = (registry.model_path(version).parent / LABELS_FILE).read_text(encoding="utf-8").splitlines()
            if labels != manifest["labels"]:
                raise ModelError(f"{LABELS_FILE} does not list the manifest's labels")
            EdgeModel.from_parts(manifest, tflite, runtime="ai-edge-litert", threads=1).check()
        except (RegistryError, SignatureError, ModelError, OSError, KeyError) as err:
            out.failing.append(f"version {version} ({MODEL_FILE}): {err}")
    return out
