"""The device side on real parts: a registry of real tiny .tflite models, served over real HTTP by a link that
keeps the daemon's contract (and can misbehave like a bad network), synced, verified, swapped, and run on both
interpreters: ai-edge-litert in-process, tflite-runtime through `sprout-edge` in its own torch-free virtualenv."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import paho.mqtt.publish as mqtt_publish
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faulty_link import FaultyLink
from helpers import REPO, TFLITE_VENV, Watching, colour_jpeg, sprout_edge, wait_for
from learning_helpers import learn_all, make_learner, stream

from daemon.registry.signing import Signer
from daemon.registry.versions import Registry
from edge.model import EdgeModel
from edge.modeldir import ModelDir
from edge.preprocess import load_rgb
from edge.runtime import classify
from edge.sync import sync
from edge.trust import SignatureError, key_id, load_public_key, verify_document, verify_file

MODEL = "leaves"  # the registry fixture's (conftest.py)
SIZE = 32


# -- A link of the registry folder that keeps the daemon's HTTP contract -------------------------------------


# -- Real models, a real registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModels:
    first: bytes  # float32 weights (quantization "none")
    second: bytes  # float16 weights: another real file
    labels: list[str]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    """The tiny network trained on three colours, exported twice by the daemon's own converter."""
    from daemon.export.converter import convert, snapshot

    learner, reader = make_learner(tmp_path_factory.mktemp("edge-learner"), stream([0, 1, 2], 20, seed=21, order="iid"))
    learn_all(learner, reader)
    model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
    return TinyModels(convert(model, "none", SIZE), convert(model, "fp16", SIZE), list(learner.labels))


def fields(tiny: TinyModels, quantization: str) -> dict:
    return {
        "base": "tiny",
        "labels": tiny.labels,
        "input": {"shape": [1, SIZE, SIZE, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
        "quantization": quantization,
        "metrics": {},
        "runtimes_verified": [
            {"name": "ai-edge-litert", "version": "2.3.0"},
            {"name": "tflite-runtime", "version": "2.14.0"},
        ],
    }


def publish(registry: Registry, tiny: TinyModels, which: str = "first") -> dict:
    return registry.publish(getattr(tiny, which), fields(tiny, "none" if which == "first" else "fp16"))


def image_files(folder: Path) -> list[Path]:
    """One new photo per class (seeds the model never trained on), as files an app would have."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(3):
        path = folder / f"class-{c}.jpg"
        path.write_bytes(colour_jpeg(c, 900 + c, size=48))  # larger than the input: resized and cropped
        paths.append(path)
    return paths


# -- Sync ---------------------------------------------------------------------------------------------------


def test_sync_installs_a_verified_version_and_a_second_sync_is_a_304(registry, link, tiny, public_key, device):
    manifest = publish(registry, tiny)
    events = []
    result = sync(link.url, MODEL, device, public_key, on_event=events.append)
    assert (result.status, result.current, result.previous, result.downloaded) == (
        "installed",
        1,
        None,
        len(tiny.first),
    )
    installed = device / "versions" / "1"
    assert (installed / "model.tflite").read_bytes() == tiny.first
    assert (installed / "manifest.json").read_bytes() == (registry.folder / "latest").read_bytes()
    assert (installed / "labels.txt").read_text().splitlines() == tiny.labels
    assert (device / "current").read_text() == "1\n"
    assert sorted(os.listdir(device)) == [
        ".lock",
        "current",
        "device-id",
        "etag",
        "versions",
    ]  # no partial or temporary left
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed" and set(kinds[1:-1]) == {"progress"}
    received = [e.received for e in events if e.kind == "progress"]
    assert received == sorted(received) and received[-1] == len(tiny.first) == events[0].total
    assert EdgeModel.load(device).manifest == manifest

    before = len(link.requests)
    again = sync(link.url, MODEL, device, public_key)
    assert (again.status, again.current, again.downloaded) == ("unchanged", 1, 0)
    (latest,) = link.requests[before:]  # one conditional GET, answered 304, and no download
    assert latest["path"].endswith("/latest") and latest["status"] == 304 and latest["if_none_match"]


def test_a_newer_version_replaces_it_keeps_the_previous_and_a_rollback_needs_no_download(
    registry, link, tiny, public_key, device
):
    publish(registry, tiny)
    assert sync(link.url, MODEL, device, public_key).current == 1
    delta = publish(registry, tiny, "second")["files"]["model.tflite"]["deltas"]["1"]
    result = sync(link.url, MODEL, device, public_key)
    # From version 1's file and the registry's delta (tests/test_deltas.py): fewer bytes than the file.
    assert (result.status, result.current, result.previous, result.kind) == ("installed", 2, 1, "delta")
    assert result.downloaded == delta["size"] < len(tiny.second)
    assert ModelDir(device).installed() == [1, 2]
    assert EdgeModel.load(device).manifest["quantization"] == "fp16"

    publish(registry, tiny)
    assert sync(link.url, MODEL, device, public_key).current == 3
    assert ModelDir(device).installed() == [2, 3]  # current and previous only

    registry.rollback(2)  # the publisher takes version 3 back
    downloads = len(link.model_requests())
    result = sync(link.url, MODEL, device, public_key)
    assert (result.status, result.current, result.previous, result.downloaded) == ("installed", 2, 3, 0)
    assert len(link.model_requests()) == downloads
    assert EdgeModel.load(device).version == 2


def tamper_with_the_file(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    path = registry.model_path(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "sha256"


def sign_with_another_key(registry, link, tmp_path, tiny):
    forger = Signer.load_or_create(tmp_path / "forger" / "signing.key")
    Registry(registry.root, MODEL, forger).publish(tiny.second, fields(tiny, "fp16"))
    return f"names signing key {forger.key_id}, but the public key given is {registry.signer.key_id}"


def cut_every_download(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    link.cut_after, link.cuts = 4000, 1000
    return "cut short at 12000 of"


def serve_a_file_that_is_not_the_manifests(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    link.substitute[f"/v1/models/{MODEL}/versions/2/model.tflite"] = tiny.first
    return f"is {len(tiny.first)} bytes on the server, the manifest says {len(tiny.second)}"


def serve_another_models_manifest(registry, link, tmp_path, tiny):
    other = Registry(registry.root, "maize", registry.signer)
    other.publish(tiny.second, fields(tiny, "fp16"))  # signed by the same publisher: only the name tells
    link.substitute[f"/v1/models/{MODEL}/latest"] = other.document(1)
    link.substitute[f"/v1/models/{MODEL}/latest.sig"] = other.signature(1)
    return "is for model 'maize', but 'leaves' was asked for"


def serve_a_manifest_changed_after_signing(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    manifest = json.loads(registry.document(2))
    manifest["metrics"]["holdout_top1_float"] = 0.999  # a link dresses the model up
    link.substitute[f"/v1/models/{MODEL}/latest"] = json.dumps(manifest).encode()
    return "changed after signing"


def serve_the_same_manifest_reformatted(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")  # the same JSON value, other bytes: not what was signed
    link.substitute[f"/v1/models/{MODEL}/latest"] = json.dumps(json.loads(registry.document(2))).encode()
    return "changed after signing"


def serve_a_damaged_signature(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    signature = bytearray(registry.signature(2))
    signature[10] ^= 0x01
    link.substitute[f"/v1/models/{MODEL}/latest.sig"] = bytes(signature)
    return "manifest.json.sig does not match manifest.json"


def serve_a_signature_of_another_size(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    link.substitute[f"/v1/models/{MODEL}/latest.sig"] = registry.signature(2).hex().encode()
    return "manifest.json.sig is 128 bytes, an Ed25519 signature is 64"


def serve_no_signature(registry, link, tmp_path, tiny):
    publish(registry, tiny, "second")
    (registry.folder / "latest.sig").unlink()
    return "cannot check the latest manifest"


@pytest.mark.parametrize(
    "fault",
    [
        tamper_with_the_file,
        sign_with_another_key,
        cut_every_download,
        serve_a_file_that_is_not_the_manifests,
        serve_another_models_manifest,
        serve_a_manifest_changed_after_signing,
        serve_the_same_manifest_reformatted,
        serve_a_damaged_signature,
        serve_a_signature_of_another_size,
        serve_no_signature,
    ],
)
def test_a_bad_update_is_refused_and_the_device_keeps_its_model(
    registry, link, tiny, public_key, device, tmp_path, fault
):
    # These faults are the full file's; a delta's faults, and its fallback to the full file, are tests/test_deltas.py's.
    registry.delta_from_versions = 0
    publish(registry, tiny)
    assert sync(link.url, MODEL, device, public_key).current == 1
    why = fault(registry, link, tmp_path, tiny)
    events = []
    result = sync(link.url, MODEL, device, public_key, on_event=events.append)
    assert (result.status, result.current) == ("failed", 1), result
    assert why in result.reason
    assert events[-1].kind == "failed" and why in events[-1].reason
    assert ModelDir(device).installed() == [1] and (device / "current").read_text() == "1\n"
    model = EdgeModel.load(device)
    assert model.version == 1 and len(model.predict(colour_jpeg(0, 5))) == 3
    partials = sorted(p.name for p in device.iterdir() if p.name.startswith(".partial-"))
    if fault is cut_every_download:
        assert partials == [".partial-2"]  # kept: the next sync resumes it
        link.cuts = 0
        healed = sync(link.url, MODEL, device, public_key)
        assert (healed.status, healed.current, healed.downloaded) == ("installed", 2, len(tiny.second) - 12000)
        assert link.model_requests()[-1]["range"] == "bytes=12000-"
    else:
        assert partials == []  # a file that failed its check is not kept to resume from


def test_a_cut_connection_resumes_with_range_and_downloads_only_the_rest(registry, link, tiny, public_key, device):
    publish(registry, tiny)
    link.cut_after, link.cuts = 10_000, 1
    result = sync(link.url, MODEL, device, public_key)
    assert (result.status, result.downloaded) == ("installed", len(tiny.first))
    requests = [(r["status"], r["range"], r["sent"]) for r in link.model_requests()]
    assert requests == [(200, None, 10_000), (206, "bytes=10000-", len(tiny.first) - 10_000)]
    assert (device / "versions" / "1" / "model.tflite").read_bytes() == tiny.first


def test_a_server_that_ignores_range_is_downloaded_from_the_start_again(registry, link, tiny, public_key, device):
    publish(registry, tiny)
    link.cut_after, link.cuts, link.ignore_range = 10_000, 1, True
    result = sync(link.url, MODEL, device, public_key)
    assert (result.status, result.downloaded) == ("installed", 10_000 + len(tiny.first))
    assert [r["status"] for r in link.model_requests()] == [200, 200]
    assert (device / "versions" / "1" / "model.tflite").read_bytes() == tiny.first


def test_a_bearer_token_is_sent_when_given(registry, tiny, public_key, device):
    publish(registry, tiny)
    link = FaultyLink(registry.root, token="s3cret").start()
    try:
        missing = sync(link.url, MODEL, device, public_key)
        assert (
            missing.status == "failed" and "wants a bearer token" in missing.reason and "--token-file" in missing.reason
        )
        wrong = sync(link.url, MODEL, device, public_key, token="guess")
        assert wrong.status == "failed" and "refused the token" in wrong.reason
        assert sync(link.url, MODEL, device, public_key, token="s3cret").status == "installed"
    finally:
        link.stop()


def test_nothing_published_and_no_server_are_failures_with_a_reason(registry, link, public_key, device):
    empty = sync(link.url, MODEL, device, public_key)
    assert (
        empty.status == "failed"
        and empty.current is None
        and "404" in empty.reason
        and "nothing published" in empty.reason
    )
    link.stop()
    gone = sync(link.url, MODEL, device, public_key, timeout_s=2)
    assert gone.status == "failed" and f"cannot reach {link.url}" in gone.reason


def test_leftovers_of_an_interrupted_install_are_removed(registry, link, tiny, public_key, device):
    publish(registry, tiny)
    (device / "versions" / ".tmp-1-4242").mkdir(parents=True)  # a kill mid-install
    (device / ".partial-7").write_bytes(b"a download of a version no longer wanted")
    assert sync(link.url, MODEL, device, public_key).status == "installed"
    assert sorted(os.listdir(device / "versions")) == ["1"]
    assert not (device / ".partial-7").exists()


def test_a_second_sync_on_the_same_folder_at_once_is_refused(registry, link, tiny, public_key, device):
    publish(registry, tiny)
    with ModelDir(device).lock():  # as a sync in another process holds it
        busy = sync(link.url, MODEL, device, public_key)
    assert busy.status == "failed" and "another sprout-edge sync" in busy.reason
    assert sync(link.url, MODEL, device, public_key).status == "installed"


# -- Classify -----------------------------------------------------------------------------------------------


def test_classify_in_process_on_ai_edge_litert(registry, link, tiny, public_key, device, tmp_path):
    publish(registry, tiny)
    sync(link.url, MODEL, device, public_key)
    model = EdgeModel.load(device, runtime="ai-edge-litert", public_key=public_key)
    assert model.runtime == "ai-edge-litert" and model.input_size == SIZE
    for c, path in enumerate(image_files(tmp_path / "photos")):
        top = model.predict(path, top=3)
        assert top[0][0] == f"class-{c}", top
        assert [label for label, _ in top] != [] and sorted(label for label, _ in top) == sorted(tiny.labels)
        assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
        assert sum(s for _, s in top) == pytest.approx(1.0, abs=1e-4)
        # The same numbers as the exporter's verification path, on the same preprocessing.
        reference = classify(tiny.first, load_rgb(path.read_bytes(), SIZE)[None], "ai-edge-litert").probabilities[0]
        assert np.allclose(model.probabilities(path.read_bytes()), reference, atol=1e-6)
    assert len(model.predict(path, top=1)) == 1


def sprout_edge_tflite() -> Path:
    path = TFLITE_VENV / "bin" / "sprout-edge"
    assert path.exists(), f"{path} is missing: run scripts/setup.sh (it installs ./edge[tflite] there)"
    return path


def test_classify_cli_runs_on_tflite_runtime_without_torch(registry, link, tiny, public_key, device, tmp_path):
    no_torch = subprocess.run([TFLITE_VENV / "bin" / "python", "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    cli = sprout_edge_tflite()
    empty = subprocess.run(
        [cli, "classify", "--dir", device, *image_files(tmp_path / "photos")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert empty.returncode == 66 and "no model installed" in empty.stderr

    publish(registry, tiny)
    synced = subprocess.run(
        [
            cli,
            "sync",
            "--url",
            link.url,
            "--model",
            MODEL,
            "--dir",
            device,
            "--public-key",
            public_key,
            "--runtime",
            "tflite-runtime",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert synced.returncode == 0, synced.stderr  # the whole device side, without torch
    photos = image_files(tmp_path / "photos")
    out = subprocess.run(
        [cli, "classify", "--dir", device, *photos, "--top", "3", "--json", "--runtime", "tflite-runtime"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["model"], doc["version"], doc["runtime"]) == (MODEL, 1, {"name": "tflite-runtime", "version": "2.14.0"})
    in_process = EdgeModel.load(device, runtime="ai-edge-litert")
    for c, (photo, result) in enumerate(zip(photos, doc["results"], strict=True)):
        assert result["image"] == str(photo) and result["top"][0]["label"] == f"class-{c}"
        expected = in_process.predict(photo, top=3)
        assert [e["label"] for e in result["top"]] == [label for label, _ in expected]
        assert np.allclose([e["score"] for e in result["top"]], [s for _, s in expected], atol=1e-5)

    (tmp_path / "notes.txt").write_text("not an image")
    text = subprocess.run(
        [cli, "classify", "--dir", device, photos[0], tmp_path / "notes.txt", "--top", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 1 and "notes.txt: not an image" in text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == str(photos[0]) and lines[1].split()[0] == "class-0" and len(lines) == 3


# -- The sync command, once and watching ----------------------------------------------------------------------


def test_sync_cli_exit_codes(registry, link, tiny, public_key, device, tmp_path):
    publish(registry, tiny)
    ok = subprocess.run(
        sprout_edge("sync", "--url", link.url, "--model", MODEL, "--dir", device, "--public-key", public_key),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{MODEL}: version 1 installed, {len(tiny.first)} bytes downloaded (full)"
    forger = Signer.load_or_create(tmp_path / "forger" / "signing.key")
    refused = subprocess.run(
        sprout_edge(
            "sync",
            "--url",
            link.url,
            "--model",
            MODEL,
            "--dir",
            tmp_path / "other",
            "--public-key",
            forger.path.with_suffix(".pub"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert (
        refused.returncode == 1
        and "names signing key" in refused.stderr
        and "no model is installed yet" in refused.stderr
    )
    usage = subprocess.run(
        sprout_edge("sync", "--url", link.url, "--model", MODEL, "--dir", device, "--mqtt", "mqtt://x"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert usage.returncode == 2 and "--watch" in usage.stderr


def test_watch_polls_and_picks_up_a_newer_version_then_stops_on_sigterm(
    registry, link, tiny, public_key, device, tmp_path
):
    publish(registry, tiny)
    watcher = Watching(
        tmp_path / "watch.log",
        "--url",
        link.url,
        "--model",
        MODEL,
        "--dir",
        device,
        "--public-key",
        public_key,
        "--interval",
        "0.3",
    )
    try:
        wait_for(lambda: ModelDir(device).current() == 1, 30, f"version 1 (log: {watcher.log.read_text()})")
        publish(registry, tiny, "second")
        wait_for(lambda: ModelDir(device).current() == 2, 30, f"version 2 (log: {watcher.log.read_text()})")
        assert watcher.stop() == 0
    finally:
        watcher.kill()
    log = watcher.log.read_text()
    assert "received SIGTERM" in log and "stopped watching model leaves; version 2 is current" in log


def test_watch_follows_a_retained_mqtt_notice(registry, link, tiny, public_key, device, tmp_path, broker):
    publish(registry, tiny)
    # An hour between polls: only the notice can bring version 2 within the test.
    watcher = Watching(
        tmp_path / "watch.log",
        "--url",
        link.url,
        "--model",
        MODEL,
        "--dir",
        device,
        "--public-key",
        public_key,
        "--interval",
        "3600",
        "--mqtt",
        broker.url,
    )
    try:
        wait_for(
            lambda: ModelDir(device).current() == 1 and "listening for model notices" in watcher.log.read_text(),
            30,
            f"version 1 and the subscription (log: {watcher.log.read_text()})",
        )
        manifest = publish(registry, tiny, "second")
        mqtt_publish.single(
            f"sprout/{MODEL}/models/latest",
            json.dumps(manifest),
            qos=1,
            retain=True,
            hostname="127.0.0.1",
            port=broker.port,
            protocol=mqtt.MQTTv5,
        )
        wait_for(lambda: ModelDir(device).current() == 2, 15, f"version 2 (log: {watcher.log.read_text()})")
        assert watcher.stop() == 0
    finally:
        watcher.kill()


# -- One implementation, no torch -----------------------------------------------------------------------------


def test_edge_shares_trust_and_preprocessing_with_the_daemon_and_imports_neither_torch_nor_daemon():
    import daemon.learning.decoding
    import daemon.registry.signing
    import edge.preprocess
    import edge.trust

    assert daemon.registry.signing.SignatureError is edge.trust.SignatureError
    assert daemon.registry.signing.verify is edge.trust.verify_document
    assert daemon.learning.decoding.load_rgb is edge.preprocess.load_rgb
    for path in sorted((REPO / "edge").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        roots = {name.split(".")[0] for name in imported}
        assert not roots & {"torch", "daemon", "models", "litert_torch"}, f"{path.name} imports {roots}"


def test_the_test_vector_in_docs_devices_md_is_right():
    """App developers test their verifiers against it: two independent Ed25519 implementations accept the
    bytes as written in the document, and refuse them once changed."""
    import nacl.exceptions
    import nacl.signing

    text = (REPO / "docs" / "devices.md").read_text(encoding="utf-8")
    blocks = dict(re.findall(r"<!-- test-vector: (\S+) -->\n```[a-z]*\n(.*?)```", text, re.S))
    assert sorted(blocks) == ["manifest.json", "manifest.json.sig", "public-key", "public-key-raw"]
    document = blocks["manifest.json"].encode("utf-8")  # the fenced lines, each with its newline
    signature = base64.b64decode(blocks["manifest.json.sig"].strip(), validate=True)
    raw = base64.b64decode(blocks["public-key-raw"].strip(), validate=True)
    key = load_public_key(blocks["public-key"])
    assert len(signature) == 64 and len(raw) == 32 and raw.hex() in text
    assert f"the {len(document)} bytes between the fences" in text and hashlib.sha256(document).hexdigest() in text

    test_key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # Ed25519 signing is deterministic
    assert test_key.sign(document) == signature
    assert key_id(test_key.public_key()) == key_id(key) == json.loads(document)["signing_key_id"]
    verify_document(document, signature, key)  # cryptography (OpenSSL)
    nacl.signing.VerifyKey(raw).verify(document, signature)  # PyNaCl (libsodium), from the raw key alone
    manifest = json.loads(document)
    verify_file(manifest, b"not a real model, a test vector")
    assert "mildiú".encode() in document and manifest["schema"] == 2

    for changed in (
        document.replace(b"0.9125", b"0.9126"),
        document.replace(b": 7", b":  7"),
        document.replace(b"\n", b"\r\n"),
        document.rstrip(b"\n"),
    ):
        assert changed != document
        with pytest.raises(SignatureError, match="does not match"):
            verify_document(changed, signature, key)
        with pytest.raises(nacl.exceptions.BadSignatureError):
            nacl.signing.VerifyKey(raw).verify(changed, signature)


def test_an_installed_client_ignores_an_added_manifest_field_and_refuses_a_breaking_schema(signer, public_key):
    """A publisher adds informative fields within schema 2; only a breaking change raises the schema."""
    from edge.manifest import SCHEMA, ManifestError, parse

    text = (REPO / "docs" / "devices.md").read_text(encoding="utf-8")
    manifest = json.loads(re.search(r"<!-- test-vector: manifest.json -->\n```json\n(.*?)```", text, re.S).group(1))
    manifest["model"] = MODEL
    added = json.dumps({**manifest, "devices_hint": {"min_ram_mb": 512}}).encode()  # a field this client never heard of
    verify_document(added, signer.sign(added), public_key)
    assert parse(added, MODEL)["devices_hint"] == {"min_ram_mb": 512}
    breaking = json.dumps({**manifest, "schema": SCHEMA + 1}).encode()
    verify_document(breaking, signer.sign(breaking), public_key)
    with pytest.raises(ManifestError, match=f"schema {SCHEMA + 1} is a breaking change .* upgrade sprout-edge"):
        parse(breaking, MODEL)


def test_a_publish_between_the_manifest_and_its_signature_is_read_again_not_refused(
    registry, link, tiny, public_key, device
):
    publish(registry, tiny)
    assert sync(link.url, MODEL, device, public_key).current == 1
    publish(registry, tiny, "second")
    # The device reads latest (version 2); version 3 is published before it asks for latest.sig.
    link.before[f"/v1/models/{MODEL}/latest.sig"] = lambda: publish(registry, tiny)
    result = sync(link.url, MODEL, device, public_key)
    assert (result.status, result.current) == ("installed", 3), result
    asked = [r["path"].rsplit("/", 1)[1] for r in link.requests if "/versions/" not in r["path"]]
    assert asked[-4:] == ["latest", "latest.sig", "latest", "latest.sig"]
    installed = device / "versions" / "3"
    verify_document(
        (installed / "manifest.json").read_bytes(), (installed / "manifest.json.sig").read_bytes(), public_key
    )
    assert EdgeModel.load(device, public_key=public_key).version == 3


def test_sync_refuses_to_install_unchecked_models_unless_told_insecure(registry, link, tiny, device):
    publish(registry, tiny)
    refused = subprocess.run(
        sprout_edge("sync", "--url", link.url, "--model", MODEL, "--dir", device),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert refused.returncode == 2 and "no --public-key" in refused.stderr and "--insecure" in refused.stderr
    assert not (device / "current").exists()
    insecure = subprocess.run(
        sprout_edge("sync", "--url", link.url, "--model", MODEL, "--dir", device, "--insecure"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert insecure.returncode == 0, insecure.stderr
    assert "signatures are NOT checked" in insecure.stderr
