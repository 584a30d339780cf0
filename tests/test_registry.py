"""The model registry and manifest signing: versions, retention, rollback, crash safety, keys, the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import SPROUT, wait_for
from registry_helpers import fields, latest_manifest, public_key_file, registry_signer

from daemon.registry.layout import MANIFEST_KEYS
from daemon.registry.retention import apply_retention
from daemon.registry.signing import SignatureError, Signer, SigningKeyError, generate, verify, verify_file
from daemon.registry.versions import NoRegistryError, Registry, RegistryError, UnknownVersionError
from edge.delta import apply

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
MODEL = "leaves"  # the registry fixture's (conftest.py)


def publish(reg: Registry, n: int = 1, size: int = 2048) -> list[dict[str, Any]]:
    return [reg.publish(os.urandom(size), fields()) for _ in range(n)]


# A tiny JSON Schema walker (jsonschema is not a dependency): the keywords docs/manifest.schema.json uses.
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value: Any, schema: dict[str, Any], at: str = "$") -> list[str]:
    errors: list[str] = []
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = kind is None or isinstance(value, _TYPES[kind])
    if not ok:
        return [f"{at}: expected {kind}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: not one of {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{at}: does not match {schema['pattern']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(f"{at}: too short")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{at}: below {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{at}.{k}: missing" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{at}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{at}.{k}")
            else:
                # Clients ignore fields they do not know (the schema allows them), but the registry
                # writes only fields the schema documents: an undocumented one is this test's failure.
                errors.append(f"{at}.{k}: not documented in the schema")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{at}: wrong number of items")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{at}: items not unique")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{at}[{i}]")
    return errors


def test_publish_twice_gives_versions_1_and_2_with_consistent_files(registry: Registry):
    first, second = publish(registry, 2, size=5000)
    assert (first["version"], second["version"]) == (1, 2)
    assert registry.versions() == [1, 2]
    assert registry.latest() == second
    folder = registry.folder
    for m in (first, second):
        v = m["version"]
        data = registry.model_path(v).read_bytes()
        entry = dict(m["files"]["model.tflite"])
        deltas = entry.pop("deltas", None)
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": 5000, "path": f"versions/{v}/model.tflite"}
        # Random bytes share nothing, so no delta is smaller than the file and none is kept (tests/test_deltas.py).
        assert deltas is None
        assert json.loads((folder / str(v) / "manifest.json").read_bytes()) == m == registry.manifest(v)
        assert (folder / str(v) / "labels.txt").read_text().splitlines() == m["labels"]
        assert list(m) == list(MANIFEST_KEYS)
        assert m["schema"] == 2 and m["model"] == MODEL
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", m["created_at"])
    # latest is a byte copy of the version's manifest, so a static mirror serves the same document.
    assert (folder / "latest").read_bytes() == (folder / "2" / "manifest.json").read_bytes()
    assert json.loads((folder / "versions").read_text()) == [
        {"version": 2, "created_at": second["created_at"], "quantization": "int8", "pinned": False},
        {"version": 1, "created_at": first["created_at"], "quantization": "int8", "pinned": False},
    ]
    assert [e["event"] for e in registry.events()] == ["published", "published"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_signature_covers_the_served_bytes_and_any_change_fails(registry: Registry, signer: Signer, tmp_path: Path):
    (m,) = publish(registry)
    public = public_key_file(signer)
    document, signature = registry.document(1), registry.signature(1)
    assert len(signature) == 64 and json.loads(document) == m
    verify(document, signature, public)
    verify(document, signature, public.read_bytes())
    verify(document, signature, registry_signer(registry).public_key)
    # latest and latest.sig are byte copies of the version's pair: what a device checks is what was signed.
    folder = registry.folder
    assert (folder / "latest").read_bytes() == document and (folder / "latest.sig").read_bytes() == signature
    data = registry.model_path(1).read_bytes()
    verify_file(m, data)
    key_id = registry_signer(registry).key_id
    assert m["signing_key_id"] == key_id and re.fullmatch(r"[0-9a-f]{16}", key_id)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(SignatureError, match="sha256"):
        verify_file(m, bytes(flipped))
    with pytest.raises(SignatureError, match="bytes"):
        verify_file(m, data[:-1])

    # Any change of the bytes fails, even one that a JSON parser would not see (no canonical form).
    for altered in (
        document.replace(b'"rust"', b'"Rust"'),
        document.replace(b'"version": 1', b'"version": 2'),
        document.replace(m["files"]["model.tflite"]["sha256"].encode(), hashlib.sha256(b"other").hexdigest().encode()),
        document.replace(b"\n", b"\r\n"),
        document + b" ",
    ):
        assert altered != document
        with pytest.raises(SignatureError, match="does not match"):
            verify(altered, signature, public)
    with pytest.raises(SignatureError, match="64"):
        verify(document, signature[:-1], public)
    with pytest.raises(SignatureError, match="64"):
        verify(document, b"", public)

    other_private, other_public = generate(tmp_path / "other")
    with pytest.raises(SignatureError, match="names signing key"):
        verify(document, signature, other_public)
    forged = Signer.load(other_private).sign(document)  # a valid signature, but by a key the device does not trust
    with pytest.raises(SignatureError, match="does not match"):
        verify(document, forged, public)


def test_a_registry_from_before_detached_signatures_is_signed_as_it_is(
    registry: Registry, signer: Signer, tmp_path: Path
):
    """Schema-1 manifests carried their signature inside; opening such a registry signs each version's bytes."""
    publish(registry, 2)
    folder = registry.folder
    old_documents = {}
    for v in (1, 2):
        old = json.loads(registry.document(v))
        old.update(schema=1, signature={"alg": "ed25519", "key_id": signer.key_id, "value": "c2lnbmF0dXJl"})
        del old["signing_key_id"]
        old_documents[v] = json.dumps(old, indent=2).encode()
        (folder / str(v) / "manifest.json").write_bytes(old_documents[v])
        (folder / str(v) / "manifest.json.sig").unlink()
    (folder / "latest").write_bytes(old_documents[2])
    (folder / "latest.sig").unlink()

    reader = Registry.open_readonly(registry.root, registry.model)
    assert latest_manifest(reader)["schema"] == 1  # reading changes nothing
    assert not (folder / "latest.sig").exists()
    reopened = Registry(registry.root, registry.model, signer)
    for v in (1, 2):
        assert reopened.document(v) == old_documents[v]  # the bytes as they were: devices may hold them
        verify(old_documents[v], reopened.signature(v), signer.public_key)
    assert (folder / "latest").read_bytes() == old_documents[2]
    assert (folder / "latest.sig").read_bytes() == reopened.signature(2)
    assert [e["version"] for e in reopened.events() if e["event"] == "signed"] == [1, 2]


def test_a_stale_or_missing_latest_signature_is_repaired_to_the_same_version(registry: Registry, signer: Signer):
    publish(registry, 3)
    registry.rollback(2)
    folder = registry.folder
    (folder / "latest.sig").write_bytes(registry.signature(3))  # a copy cut between the two renames
    Registry(registry.root, registry.model, signer)
    assert (folder / "latest.sig").read_bytes() == registry.signature(2) and latest_manifest(registry)["version"] == 2
    (folder / "latest.sig").unlink()
    Registry(registry.root, registry.model, signer)
    assert (folder / "latest.sig").read_bytes() == registry.signature(2) and latest_manifest(registry)["version"] == 2
    assert [e.get("reason") for e in registry.events() if e["event"] == "repaired"] == [
        "latest.sig is not version 2's signature",
        "latest.sig is missing",
    ]


def test_manifests_conform_to_the_schema(registry: Registry):
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["required"] == list(MANIFEST_KEYS)
    publish(registry, 2)
    for m in (registry.manifest(1), registry.latest()):
        assert schema_errors(m, SCHEMA) == []
    # The walker can fail: a missing field, a wrong type, an unknown quantization, an extra field.
    m = latest_manifest(registry)
    assert schema_errors({k: v for k, v in m.items() if k != "labels"}, SCHEMA) == ["$.labels: missing"]
    assert schema_errors({**m, "version": "2"}, SCHEMA) == ["$.version: expected integer, got str"]
    assert schema_errors({**m, "quantization": "int4"}, SCHEMA)
    assert schema_errors({**m, "extra": 1}, SCHEMA) == ["$.extra: not documented in the schema"]


def test_publish_refuses_bad_fields_and_keeps_nothing(registry: Registry):
    publish(registry)
    bad = [
        ({k: v for k, v in fields().items() if k != "labels"}, "missing \\['labels'\\]"),
        ({**fields(), "version": 7}, "unexpected \\['version'\\]"),
        (fields(quantization="int4"), "quantization"),
        (fields(labels=["a", "a"]), "unique"),
        (fields(labels=["a\nb"]), "line breaks"),
        (fields(input={"shape": [1, 96, 96], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]}), "input.shape"),
        (fields(metrics={"holdout_top1_float": float("nan")}), "NaN"),
        (fields(runtimes_verified=[]), "runtimes_verified"),
    ]
    for candidate, message in bad:
        with pytest.raises(RegistryError, match=message):
            registry.publish(os.urandom(100), candidate)
    with pytest.raises(RegistryError, match="non-empty bytes"):
        registry.publish(b"", fields())
    assert registry.versions() == [1]

    registry.record_rejection(fields(metrics={"holdout_top1": float("nan")}), ["NaN in output", "drop 0.09 > 0.05"])
    event = registry.events()[-1]
    assert event["event"] == "rejected" and event["reasons"] == ["NaN in output", "drop 0.09 > 0.05"]
    assert event["candidate"]["metrics"] == {"holdout_top1": "nan"}  # the log stays strict JSON
    assert registry.versions() == [1] and latest_manifest(registry)["version"] == 1
    assert publish(registry)[0]["version"] == 2  # a rejection uses up no version


def test_retention_keeps_the_newest_and_the_pinned_and_versions_only_go_up(registry: Registry):
    publish(registry, 1)
    assert registry.pin(1) is True and registry.pin(1) is False
    publish(registry, 4)
    assert registry.versions() == [1, 3, 4, 5]  # keep_versions=3 newest, plus pinned 1
    deleted = [e["version"] for e in registry.events() if e["event"] == "deleted"]
    assert deleted == [2]
    assert json.loads((registry.folder / "pins").read_text()) == [1]
    assert [(r["version"], r["pinned"]) for r in json.loads((registry.folder / "versions").read_text())] == [
        (5, False),
        (4, False),
        (3, False),
        (1, True),
    ]

    # latest is kept even when it is not among the newest (after a rollback).
    registry.rollback(3)
    small = Registry(registry.root, MODEL, registry.signer, keep_versions=1)
    with small._locked():
        apply_retention(small)  # what the next publish would do, without making a new latest
    assert small.versions() == [1, 3, 5]

    assert registry.unpin(1) is True and registry.unpin(1) is False
    assert publish(registry)[0]["version"] == 6
    assert registry.versions() == [3, 5, 6]

    # Even with every folder gone, the log keeps numbers from coming back.
    for v in registry.versions():
        shutil.rmtree(registry.folder / str(v))
    (registry.folder / "latest").unlink()
    again = Registry(registry.root, MODEL, registry.signer, keep_versions=3)
    assert again.latest() is None
    assert publish(again)[0]["version"] == 7


def test_rollback_moves_latest_is_logged_and_numbering_continues(registry: Registry, signer: Signer):
    publish(registry, 3)
    before = (registry.folder / "1" / "manifest.json").read_bytes()
    m = registry.rollback(1)
    assert m["version"] == 1 and latest_manifest(registry)["version"] == 1
    assert (registry.folder / "latest").read_bytes() == before  # unchanged, still validly signed
    verify(before, (registry.folder / "latest.sig").read_bytes(), public_key_file(signer))
    event = registry.events()[-1]
    assert (event["event"], event["version"], event["from"]) == ("rollback", 1, 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", event["time"])
    assert publish(registry)[0]["version"] == 4
    with pytest.raises(UnknownVersionError, match="no version 9"):
        registry.rollback(9)


def test_rollback_refuses_a_damaged_version(registry: Registry):
    publish(registry, 2)
    path = registry.model_path(1)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(RegistryError, match="version 1 cannot become latest"):
        registry.rollback(1)
    assert latest_manifest(registry)["version"] == 2


def test_construction_removes_leftovers_and_repairs_latest(registry: Registry, signer: Signer):
    publish(registry, 3)
    folder = registry.folder
    leftover = folder / f".tmp-4-{os.getpid() + 1}"
    leftover.mkdir()
    (leftover / "model.tflite").write_bytes(b"half a model")
    (folder / ".tmp-latest-123").write_text("{")
    (folder / "latest").unlink()

    reopened = Registry(registry.root, MODEL, signer, keep_versions=3)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert latest_manifest(reopened)["version"] == 3
    assert [e["event"] for e in reopened.events()][-2:] == ["cleaned", "repaired"]

    # latest naming a version whose folder is gone, then a latest cut short: both repaired.
    shutil.rmtree(folder / "3")
    reopened = Registry(registry.root, MODEL, signer, keep_versions=3)
    assert latest_manifest(reopened)["version"] == 2
    assert [r["version"] for r in json.loads((folder / "versions").read_text())] == [2, 1]
    (folder / "latest").write_bytes((folder / "latest").read_bytes()[:40])
    assert latest_manifest(Registry(registry.root, MODEL, signer))["version"] == 2
    assert publish(reopened)[0]["version"] == 4


def test_readers_write_nothing(tmp_path: Path, registry: Registry):
    with pytest.raises(NoRegistryError, match="nothing has been published"):
        Registry.open_readonly(tmp_path / "elsewhere", MODEL)
    assert not (tmp_path / "elsewhere").exists()
    publish(registry, 2)
    reader = Registry.open_readonly(registry.root, MODEL)
    assert reader.versions() == [1, 2] and reader.latest() == registry.latest()
    with pytest.raises(RegistryError, match="read-only"):
        reader.publish(os.urandom(10), fields())
    with pytest.raises(RegistryError, match="read-only"):
        reader.pin(1)
    with pytest.raises(UnknownVersionError, match="no version 5 \\(on disk: 1, 2\\)"):
        reader.manifest(5)


_PUBLISHER = """
import json, os, random, sys
from pathlib import Path
from daemon.registry.versions import Registry
from daemon.registry.signing import Signer
reg = Registry(Path(sys.argv[1]), sys.argv[2], Signer.load(Path(sys.argv[3])), keep_versions=3)
fields = json.loads(sys.argv[4])
# The same starting bytes in every round's process: a version differs from those before it, whichever
# process published them, by a few heads, so deltas are written even when a round publishes only one.
model = bytearray(random.Random(1).randbytes(4 << 20))
while True:
    # Each version differs from the last in a few KB (a new head): the registry writes deltas from earlier ones.
    at = int.from_bytes(os.urandom(3)) % (len(model) - 4096)
    model[at : at + 4096] = os.urandom(4096)
    reg.publish(bytes(model), fields)
"""


def _published(registry: Registry) -> int:
    return sum(e.get("event") == "published" for e in registry.events())


def test_sigkill_during_publish_leaves_a_valid_latest(registry: Registry, signer: Signer):
    """A publisher killed at random moments: every restart finds a complete, signed latest."""
    public = public_key_file(signer)
    rng = random.Random()
    last_seen = deltas_seen = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, str(registry.root), MODEL, str(signer.path), json.dumps(fields())],
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        try:
            # At least one publish per round, however slowly a loaded machine starts the process; then a
            # kill at a random instant of the publishes that follow.
            before = _published(registry)
            wait_for(lambda b=before: _published(registry) > b, 60, f"a version published in round {round_}")
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()

        # What a reader (the HTTP server, a static mirror) sees before any writer tidies up.
        reader = Registry.open_readonly(registry.root, MODEL)
        seen = latest_manifest(reader)
        document = (reader.folder / "latest").read_bytes()
        assert document == reader.document(seen["version"])
        verify(document, reader.signature(seen["version"]), public)
        verify_file(seen, registry.model_path(seen["version"]).read_bytes())

        reg = Registry(registry.root, MODEL, registry.signer, keep_versions=3)
        assert not [p.name for p in reg.folder.iterdir() if p.name.startswith(".tmp-")]
        latest = json.loads((reg.folder / "latest").read_bytes())
        v = latest["version"]
        verify((reg.folder / "latest").read_bytes(), (reg.folder / "latest.sig").read_bytes(), public)
        verify_file(latest, reg.model_path(v).read_bytes())
        assert (reg.folder / "latest").read_bytes() == (reg.folder / str(v) / "manifest.json").read_bytes()
        for version in reg.versions():  # every version on disk is whole, not only the latest
            m = reg.manifest(version)
            verify(reg.document(version), reg.signature(version), public)
            verify_file(m, reg.model_path(version).read_bytes())
            for base, entry in m["files"]["model.tflite"].get("deltas", {}).items():  # and so are its deltas
                delta = (reg.folder / str(version) / f"from-{base}.zst").read_bytes()
                assert (len(delta), hashlib.sha256(delta).hexdigest()) == (entry["size"], entry["sha256"])
                deltas_seen += 1
                if int(base) in reg.versions():
                    old = reg.model_path(int(base)).read_bytes()
                    assert apply(old, delta, m["files"]["model.tflite"]["size"]) == reg.model_path(version).read_bytes()
        assert v >= last_seen
        last_seen = v
    # A kill between latest.sig's rename and latest's leaves the pair apart until a writer opens the
    # registry again (devices refuse the pair meanwhile, and keep their model); nothing else may need repair.
    repairs = [e["reason"] for e in registry.events() if e["event"] == "repaired"]
    assert [r for r in repairs if not r.startswith("latest.sig is not")] == [], "a kill left latest broken"
    published = [e["version"] for e in registry.events() if e["event"] == "published"]
    assert published == sorted(set(published)), "a version number was handed out twice"
    assert len(published) >= 6  # one a round at least
    assert deltas_seen > 0, "no version carried a delta: the kills tested nothing of them"


def test_key_is_created_0600_and_a_readable_key_is_refused(tmp_path: Path):
    path = tmp_path / "state" / "signing" / "signing.key"
    signer = Signer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.with_suffix(".pub").read_bytes() == signer.public_pem()
    assert Signer.load_or_create(path).key_id == signer.key_id  # loaded, not replaced

    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match=f"mode 0644.*chmod 600 {re.escape(str(path))}"):
        Signer.load(path)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="already exists"):
        generate(path.parent)
    with pytest.raises(SigningKeyError, match="sprout keygen"):
        Signer.load(tmp_path / "missing.key")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPROUT, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_keygen_cli(tmp_path: Path):
    out = run_cli("keygen", "--out", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    private = tmp_path / "keys" / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert f"key id:      {Signer.load(private).key_id}" in out.stdout
    assert str(private) in out.stdout
    # The raw key an app ships: it checks what this key signed (PyNaCl, independent of the daemon's library).
    import nacl.signing

    found = re.search(r"raw public key \(base64, for apps\): (\S+)", out.stdout)
    assert found, out.stdout
    raw = base64.b64decode(found.group(1))
    nacl.signing.VerifyKey(raw).verify(b"manifest", Signer.load(private).sign(b"manifest"))
    again = run_cli("keygen", "--out", str(tmp_path / "keys"))
    assert again.returncode == 73 and "already exists" in again.stderr


def test_models_cli(tmp_path: Path):
    state = tmp_path / "state"
    empty = run_cli("models", "list", "--state", str(state))
    assert empty.returncode == 66 and "nothing has been published" in empty.stderr
    assert not state.exists()  # a reader creates no folder and no key

    signer = Signer.load_or_create(state / "signing" / "signing.key")  # where the daemon keeps it by default
    reg = Registry(state / "registry", "plant-disease", signer, keep_versions=10)
    publish(reg, 3)

    listed = run_cli("models", "list", "--state", str(state), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["version"], r["latest"], r["pinned"]) for r in rows] == [
        (3, True, False),
        (2, False, False),
        (1, False, False),
    ]
    assert rows[0]["quantization"] == "int8" and rows[0]["created_at"] == reg.manifest(3)["created_at"]

    shown = run_cli("models", "show", "2", "--state", str(state))
    assert shown.returncode == 0 and json.loads(shown.stdout) == reg.manifest(2)

    rolled = run_cli("models", "rollback", "2", "--state", str(state))
    assert rolled.returncode == 0, rolled.stderr
    assert "latest is now version 2 (was 3)" in rolled.stdout
    assert latest_manifest(reg)["version"] == 2
    assert run_cli("models", "pin", "1", "--state", str(state)).returncode == 0
    assert reg.pins() == [1]
    table = run_cli("models", "list", "--state", str(state)).stdout.splitlines()
    assert table[0].split() == ["VERSION", "CREATED_AT", "QUANTIZATION", "PINNED", "LATEST"]
    assert table[2].split()[0] == "2" and table[2].split()[-1] == "*"
    assert table[3].split()[0] == "1" and table[3].split()[-1] == "yes"
    assert run_cli("models", "unpin", "1", "--state", str(state)).returncode == 0
    assert reg.pins() == []
    assert [e["event"] for e in reg.events()][-3:] == ["rollback", "pin", "unpin"]

    missing = run_cli("models", "show", "99", "--state", str(state))
    assert missing.returncode == 65 and "no version 99 (on disk: 1, 2, 3)" in missing.stderr
    assert run_cli("models", "rollback", "99", "--state", str(state)).returncode == 65
    assert run_cli("models", "pin", "zero", "--state", str(state)).returncode == 2  # argparse usage error
    assert sorted(p.name for p in state.iterdir()) == ["registry", "signing"]
