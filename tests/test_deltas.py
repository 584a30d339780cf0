"""Delta downloads on real parts: real .tflite versions whose head changed (as head mode publishes them), a real
registry writing zstd deltas, the daemon's download API behind tests/faulty_link.py, and the device's sync.

A device that holds a version the manifest lists a delta from downloads the delta and patches its file; on any
failure of the delta it says why and downloads the whole file. The zstd command line applies the same delta."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from faulty_link import FaultyLink
from learning_helpers import learn_all, make_learner, stream

from daemon.registry.deltas import DELTA_FILE
from daemon.registry.versions import Registry
from daemon.service.metrics import _fleet
from daemon.service.status_page import _fleet as fleet_section
from edge.delta import DeltaError, apply, make
from edge.manifest import delta_from
from edge.modeldir import ModelDir
from edge.sync import sync

MODEL = "leaves"  # the registry fixture's (conftest.py)
SIZE = 32


@dataclass(frozen=True)
class Versions:
    files: list[bytes]  # three exports of one model, its head moved a little each time
    labels: list[str]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Versions:
    """The tiny network trained on three colours, exported by the daemon's converter; then its head changed (the
    backbone frozen, as in head mode) and exported again, twice."""
    import torch

    from daemon.export.converter import convert, snapshot

    learner, reader = make_learner(tmp_path_factory.mktemp("delta-learner"), stream([0, 1, 2], 20, seed=21))
    learn_all(learner, reader)
    files = []
    for _ in range(3):
        files.append(convert(snapshot(learner.backbone, learner.head, learner.spec.preprocessing), "none", SIZE))
        with torch.no_grad():
            for p in learner.head.parameters():
                p.add_(0.01)
    assert len(set(files)) == 3
    return Versions(files, list(learner.labels))


def fields(versions: Versions) -> dict:
    return {
        "base": "tiny",
        "labels": versions.labels,
        "input": {"shape": [1, SIZE, SIZE, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
        "quantization": "none",
        "metrics": {},
        "runtimes_verified": [{"name": "ai-edge-litert", "version": "2.3.0"}],
    }


def requested(link: FaultyLink) -> list[str]:
    """The file names of the model and delta downloads the link saw, in order."""
    return [
        r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1]
        for r in link.requests
        if "/versions/" in r["path"] and not r["path"].endswith((".json", ".sig"))
    ]


def deltas(manifest: dict) -> dict:
    return manifest["files"]["model.tflite"].get("deltas", {})


# -- The registry ----------------------------------------------------------------------------------------------


def test_publish_writes_a_delta_from_each_recent_version_and_the_manifest_lists_it(registry, versions):
    registry.delta_from_versions = 2
    for data in versions.files:
        registry.publish(data, fields(versions))
    third = registry.manifest(3)
    assert sorted(deltas(registry.manifest(1))) == [] and sorted(deltas(registry.manifest(2))) == ["1"]
    assert sorted(deltas(third)) == ["1", "2"]
    folder = registry.folder / "3"
    assert sorted(p.name for p in folder.iterdir() if DELTA_FILE.match(p.name)) == ["from-1.zst", "from-2.zst"]
    for base, entry in deltas(third).items():
        data = (folder / f"from-{base}.zst").read_bytes()
        assert entry == {
            "path": f"versions/3/from-{base}.zst",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "format": "zstd-patch",
        }
        assert len(data) < len(versions.files[2]) // 10  # only the head changed
        assert apply(versions.files[int(base) - 1], data, len(versions.files[2])) == versions.files[2]
    # Logged with the publish, and the manifest (signed, with its deltas) is the one latest serves.
    assert registry.events()[-1]["deltas"] == {b: e["size"] for b, e in deltas(third).items()}
    assert (registry.folder / "latest").read_bytes() == registry.document(3)


def test_a_registry_set_to_no_deltas_writes_none(registry, versions):
    registry.delta_from_versions = 0
    for data in versions.files[:2]:
        registry.publish(data, fields(versions))
    assert "deltas" not in registry.manifest(2)["files"]["model.tflite"]
    assert not [p for p in (registry.folder / "2").iterdir() if p.suffix == ".zst"]


def test_the_zstd_command_line_applies_a_delta(registry, versions, tmp_path):
    """Interoperability: Debian's zstd (the C library iOS apps link, and zstd-jni wraps) decodes our delta."""
    zstd = shutil.which("zstd")
    assert zstd is not None, "the zstd command is missing: scripts/test-tools.sh installs it"
    for data in versions.files[:2]:
        registry.publish(data, fields(versions))
    old = tmp_path / "old.tflite"
    old.write_bytes(versions.files[0])
    out = tmp_path / "new.tflite"
    subprocess.run(
        [zstd, "-d", "-q", f"--patch-from={old}", str(registry.folder / "2" / "from-1.zst"), "-o", str(out)],
        check=True,
        timeout=60,
    )
    assert out.read_bytes() == versions.files[1]


def test_applying_a_delta_to_other_bytes_or_cut_short_is_refused(versions):
    old, new = versions.files[0], versions.files[1]
    patch = make(old, new)
    with pytest.raises(DeltaError, match="zstd could not apply"):
        apply(old, patch[:-20], len(new))
    with pytest.raises(DeltaError, match="the manifest says"):
        apply(old, patch, len(new) + 1)
    with pytest.raises(DeltaError, match="not a zstd frame"):
        apply(old, b"not zstd at all", len(new))


# -- The device ------------------------------------------------------------------------------------------------


def test_a_device_one_version_behind_downloads_the_delta_and_ends_with_the_exact_file(
    registry, versions, link, public_key, device
):
    registry.publish(versions.files[0], fields(versions))
    first = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (first.status, first.kind, first.downloaded) == ("installed", "full", len(versions.files[0]))
    delta = deltas(registry.publish(versions.files[1], fields(versions)))["1"]
    events = []
    result = sync(link.url, MODEL, device, public_key, on_event=events.append)  # loads and runs it, too
    assert (result.status, result.current, result.kind) == ("installed", 2, "delta")
    assert result.downloaded == delta["size"] < len(versions.files[1]) // 10
    assert (device / "versions" / "2" / "model.tflite").read_bytes() == versions.files[1]
    assert requested(link) == ["1/model.tflite", "2/from-1.zst"]
    assert (events[0].kind, events[0].transfer, events[0].total) == ("started", "delta", delta["size"])
    assert (events[-1].kind, events[-1].transfer, events[-1].downloaded) == ("completed", "delta", delta["size"])
    assert not [p.name for p in device.iterdir() if p.name.startswith(".partial-")]
    # The server counts downloads by kind, in its view and in /metrics.
    view = link.api.fleet.view()
    assert view.downloads_by_kind == {(1, "full"): 1, (2, "delta"): 1}
    assert view.downloads_by_version == {1: 1, 2: 1}
    lines = {(m.name, tuple(sorted(s.labels.items())), s.value) for m in _fleet(view) for s in m.samples}
    assert ("sprout_model_downloads", (("kind", "delta"), ("version", "2")), 1) in lines
    assert ("sprout_model_downloads", (("kind", "full"), ("version", "1")), 1) in lines
    page = fleet_section(view)
    assert "<td>1 (1 as delta)</td>" in page and "<td>1</td></tr>" in page


def test_a_device_two_versions_behind_takes_the_delta_from_its_version(registry, versions, link, public_key, device):
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    registry.publish(versions.files[1], fields(versions))
    registry.publish(versions.files[2], fields(versions))
    result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.current, result.kind) == (3, "delta")
    assert requested(link)[-1] == "3/from-1.zst"
    assert (device / "versions" / "3" / "model.tflite").read_bytes() == versions.files[2]


def test_a_device_behind_the_deltas_kept_downloads_the_full_file(registry, versions, link, public_key, device):
    registry.delta_from_versions = 1  # version 3 carries a delta from 2 only
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    registry.publish(versions.files[1], fields(versions))
    registry.publish(versions.files[2], fields(versions))
    assert sorted(deltas(registry.manifest(3))) == ["2"]
    result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.current, result.kind, result.downloaded) == (3, "full", len(versions.files[2]))
    assert requested(link)[-1] == "3/model.tflite"


def tamper_with_the_delta(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the digest tells
    path.write_bytes(bytes(data))
    return "sha256 is not the one the signed manifest lists"


def truncate_the_delta(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:-10])
    return "the manifest says"


def remove_the_delta(path: Path) -> str:
    path.unlink()
    return "404"


@pytest.mark.parametrize("fault", [tamper_with_the_delta, truncate_the_delta, remove_the_delta])
def test_a_bad_delta_is_refused_and_the_full_file_is_downloaded(
    registry, versions, link, public_key, device, caplog, fault
):
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    registry.publish(versions.files[1], fields(versions))
    why = fault(registry.folder / "2" / "from-1.zst")
    with caplog.at_level(logging.WARNING, logger="sprout.edge.sync"):
        result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.status, result.current, result.kind) == ("installed", 2, "full"), result
    assert (device / "versions" / "2" / "model.tflite").read_bytes() == versions.files[1]
    assert requested(link)[-2:] == ["2/from-1.zst", "2/model.tflite"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the delta from version 1 to 2 failed" in w and why in w for w in warnings), warnings
    assert not [p.name for p in device.iterdir() if p.name.startswith(".partial-")]


def test_a_delta_that_patches_another_file_is_refused_by_the_result_check(
    registry, versions, link, public_key, device, caplog
):
    """The delta is the signed one, but the device's installed file is not the base it was made from: the patch
    gives other bytes, which the manifest's sha256 of the model file refuses."""
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    registry.publish(versions.files[1], fields(versions))
    # A damaged installed file is caught before the delta is fetched; here the check of the result is what
    # must catch it, so the device's own manifest is made to vouch for other bytes of the same size.
    installed = device / "versions" / "1" / "model.tflite"
    other = bytearray(installed.read_bytes())
    other[len(other) // 3] ^= 0xFF
    installed.write_bytes(bytes(other))
    manifest = json.loads((device / "versions" / "1" / "manifest.json").read_bytes())
    manifest["files"]["model.tflite"]["sha256"] = hashlib.sha256(bytes(other)).hexdigest()
    (device / "versions" / "1" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="sprout.edge.sync"):
        result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.status, result.kind) == ("installed", "full")
    assert (device / "versions" / "2" / "model.tflite").read_bytes() == versions.files[1]
    assert any(
        "patched file's sha256" in r.getMessage() or "zstd could not apply" in r.getMessage() for r in caplog.records
    )


def test_an_installed_file_that_no_longer_matches_takes_the_full_file(registry, versions, link, public_key, device):
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    registry.publish(versions.files[1], fields(versions))
    installed = device / "versions" / "1" / "model.tflite"
    installed.write_bytes(installed.read_bytes()[:-1])  # a disk error: the base is not what the delta needs
    result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.status, result.kind) == ("installed", "full")
    assert requested(link)[-1] == "2/model.tflite" and "2/from-1.zst" not in requested(link)


def resign(registry: Registry, version: int, manifest: dict) -> None:
    """Publish ``manifest`` as ``version``'s, signed by the registry's key: what a publisher with a bug would serve."""
    assert registry.signer is not None
    document = (json.dumps(manifest, indent=2) + "\n").encode()
    signature = registry.signer.sign(document)
    for name, data in (("manifest.json", document), ("manifest.json.sig", signature)):
        (registry.folder / str(version) / name).write_bytes(data)
    (registry.folder / "latest").write_bytes(document)
    (registry.folder / "latest.sig").write_bytes(signature)


@pytest.mark.parametrize(
    "malformed",
    [
        "not an object",
        {"1": "not an object"},
        {"1": {"path": "versions/1/model.tflite", "size": 10, "sha256": "ab" * 32, "format": "zstd-patch"}},
        {"1": {"path": "versions/2/from-1.zst", "size": -1, "sha256": "ab" * 32, "format": "zstd-patch"}},
        {"1": {"path": "versions/2/from-1.zst", "size": 10, "sha256": "AB", "format": "zstd-patch"}},
        {"1": {"path": "versions/2/from-1.zst", "size": 10, "sha256": "ab" * 32, "format": "bsdiff4"}},
    ],
)
def test_a_malformed_deltas_entry_is_ignored_and_the_full_file_is_used(
    registry, versions, link, public_key, device, caplog, malformed
):
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    manifest = registry.publish(versions.files[1], fields(versions))
    manifest["files"]["model.tflite"]["deltas"] = malformed
    resign(registry, 2, manifest)
    with caplog.at_level(logging.WARNING, logger="sprout.edge.manifest"):
        assert delta_from(manifest, 1) is None
        result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.status, result.current, result.kind) == ("installed", 2, "full"), result
    assert requested(link)[-1] == "2/model.tflite"
    assert any("ignored, full download" in r.getMessage() for r in caplog.records)


def test_a_stopped_delta_download_resumes_at_the_next_sync(registry, versions, link, public_key, device):
    registry.publish(versions.files[0], fields(versions))
    sync(link.url, MODEL, device, public_key, runtime=None)
    delta = deltas(registry.publish(versions.files[1], fields(versions)))["1"]
    stopped = sync(link.url, MODEL, device, public_key, runtime=None, should_stop=lambda: True)
    assert stopped.status == "stopped"
    assert ModelDir(device).delta_partial(2, 1).exists()
    result = sync(link.url, MODEL, device, public_key, runtime=None)
    assert (result.status, result.kind, result.downloaded) == ("installed", "delta", delta["size"])
    assert (device / "versions" / "2" / "model.tflite").read_bytes() == versions.files[1]


def test_the_download_api_serves_a_delta_like_the_model_file(registry, versions, link):
    import httpx

    registry.publish(versions.files[0], fields(versions))
    entry = deltas(registry.publish(versions.files[1], fields(versions)))["1"]
    url = f"{link.url}/v1/models/{MODEL}/versions/2/from-1.zst"
    with httpx.Client(timeout=10) as client:
        whole = client.get(url)
        assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == entry["sha256"]
        assert whole.headers["etag"] == f'"{entry["sha256"]}"'
        assert whole.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert client.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
        rest = client.get(url, headers={"Range": "bytes=10-"})
        assert rest.status_code == 206 and rest.content == whole.content[10:]
        assert client.get(f"{link.url}/v1/models/{MODEL}/versions/2/from-7.zst").status_code == 404
        assert client.get(f"{link.url}/v1/models/{MODEL}/versions/2/from-x.zst").status_code == 404
    # The Range request resumed a download: counted once.
    assert link.api.fleet.view().downloads_by_kind == {(2, "delta"): 1}
    guarded = FaultyLink(registry.root, token="s3cret").start()
    try:
        path = f"{guarded.url}/v1/models/{MODEL}/versions/2/from-1.zst"
        assert httpx.get(path, timeout=10).status_code == 401
        assert httpx.get(path, headers={"Authorization": "Bearer s3cret"}, timeout=10).content == whole.content
    finally:
        guarded.stop()


def test_the_delta_module_example_runs():
    import doctest

    import edge.delta

    assert doctest.testmod(edge.delta).attempted > 0 and doctest.testmod(edge.delta).failed == 0
