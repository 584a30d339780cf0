"""Staged rollouts: the registry's state, latest answered per device cohort, devices following, the notice, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import SPROUT, wait_for
from registry_helpers import fields, public_key_file, registry_signer

from daemon.common.settings import RolloutSettings
from daemon.distribution.http import DownloadApi, HttpServer
from daemon.distribution.notice import Notice
from daemon.distribution.rollout_gates import judge
from daemon.distribution.rollout_watch import RolloutWatch
from daemon.ingest.telemetry import bucket_of, device_digest, parse_report
from daemon.registry.layout import RegistryError
from daemon.registry.signing import verify
from daemon.registry.versions import Registry
from daemon.store.examples import Store
from daemon.store.field import VersionInField
from daemon.store.records import FieldReport
from daemon.tools.feeder import Publisher
from edge.modeldir import DEVICE_ID, ModelDir
from edge.sync import sync

STAGES = [5.0, 25.0, 100.0]


def device_in(low: int, high: int) -> str:
    """A device id whose bucket (0-9999) falls in [low, high)."""
    return next(d for i in itertools.count() if low <= bucket_of(device_digest(d := f"phone-{i}")) < high)


def test_a_version_rolls_out_stage_by_stage_and_becomes_latest_at_the_last(registry: Registry):
    first = registry.publish(os.urandom(4096), fields(), stages=STAGES)
    assert registry.latest() == first and registry.rollout() is None  # a first version goes to every device
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    r = registry.rollout()
    assert r is not None and (r.version, r.replaces, r.percent, r.state) == (2, 1, 5.0, "rolling")
    assert registry.latest()["version"] == 1 and registry.offered() == 2  # type: ignore[index]
    assert registry.advance_rollout("figures hold").percent == 25.0
    with pytest.raises(RegistryError, match="version 2 is rolling out, not 7"):
        registry.advance_rollout("a decision on another version's figures", expect=7)
    done = registry.advance_rollout("figures hold")
    assert done.state == "complete" and registry.latest()["version"] == 2  # type: ignore[index]
    with pytest.raises(RegistryError, match="no version rolling out"):
        registry.advance_rollout("again")
    # A newer version supersedes one still rolling out; both replace the latest, which all others keep.
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    r = registry.rollout()
    assert r is not None and (r.version, r.replaces, r.stage) == (4, 2, 0)
    halted = registry.halt_rollout("confidence fell 9 points", {"devices": 31})
    assert halted.state == "halted" and registry.offered() == 2
    events = [(e["event"], e.get("version")) for e in registry.events() if e["event"].startswith("rollout")]
    assert events == [
        ("rollout_advanced", 2),
        ("rollout_complete", 2),
        ("rollout_superseded", 3),
        ("rollout_halted", 4),
    ]
    assert registry.events()[-1]["figures"] == {"devices": 31}
    # Without stages, a version goes to every device at once, as before.
    registry.publish(os.urandom(4096), fields())
    assert registry.latest()["version"] == 5 and registry.offered() == 5  # type: ignore[index]


def test_retention_keeps_the_version_rolling_out(tmp_path: Path, registry: Registry):
    small = Registry(registry.root, "leaves", registry_signer(registry), keep_versions=1)
    small.publish(os.urandom(4096), fields())
    small.publish(os.urandom(4096), fields(), stages=STAGES)
    small.publish(os.urandom(4096), fields())  # to every device: version 2's rollout is superseded, then deleted
    assert small.versions() == [3]
    small.publish(os.urandom(4096), fields(), stages=STAGES)
    assert small.versions() == [3, 4]  # latest (3) and the one rolling out (4)


@pytest.fixture
def served(registry: Registry):
    server = HttpServer("127.0.0.1", 0, None, DownloadApi(registry.root))
    server.start()
    yield f"http://{server.address}"
    server.stop(time.monotonic() + 5)


def test_latest_is_answered_per_device_cohort_with_its_own_signature_and_etag(registry: Registry, served: str):
    registry.publish(os.urandom(4096), fields())
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    canary, other = device_in(0, 500), device_in(500, 10_000)
    public = registry_signer(registry).public_key
    with httpx.Client(base_url=f"{served}/v1/models/leaves", timeout=10) as api:

        def latest(device: str | None) -> tuple[int, str]:
            headers = {"Sprout-Device": device} if device else {}
            doc, sig = api.get("/latest", headers=headers), api.get("/latest.sig", headers=headers)
            assert doc.status_code == 200 and doc.headers["vary"] == "Sprout-Device"
            verify(doc.content, sig.content, public)  # the signature served with the document is its own
            return doc.json()["version"], doc.headers["etag"]

        (v_canary, etag_canary), (v_other, etag_other) = latest(canary), latest(other)
        assert (v_canary, v_other, latest(None)[0]) == (2, 1, 1)
        assert etag_canary != etag_other
        assert api.get("/latest", headers={"Sprout-Device": canary, "If-None-Match": etag_canary}).status_code == 304
        registry.advance_rollout("figures hold")  # 25%: a device in [500, 2500) is reached now
        assert latest(device_in(500, 2500))[0] == 2 and latest(device_in(2500, 10_000))[0] == 1
        registry.halt_rollout("load failures")
        assert latest(canary)[0] == 1  # halted: the cohort is answered latest again


def test_a_device_in_the_cohort_installs_the_new_version_and_goes_back_when_it_is_halted(
    registry: Registry, served: str, tmp_path: Path
):
    registry.publish(os.urandom(4096), fields())
    key = public_key_file(registry_signer(registry))
    phones = {}
    for name, (low, high) in (("canary", (0, 500)), ("other", (500, 10_000))):
        phones[name] = tmp_path / name
        phones[name].mkdir()
        (phones[name] / DEVICE_ID).write_text(device_in(low, high))
        assert sync(served, "leaves", phones[name], public_key=key, runtime=None).current == 1
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    assert sync(served, "leaves", phones["canary"], public_key=key, runtime=None).current == 2
    assert sync(served, "leaves", phones["other"], public_key=key, runtime=None).status == "unchanged"
    registry.halt_rollout("corrections rose")
    back = sync(served, "leaves", phones["canary"], public_key=key, runtime=None)
    assert (back.status, back.current) == ("installed", 1) and ModelDir(phones["canary"]).current() == 1


def test_the_notice_names_the_version_rolling_out_then_latest_again(registry: Registry):
    registry.publish(os.urandom(4096), fields())
    announced: list[int] = []

    def publish(topic: str, payload: bytes) -> bool:  # the broker's PUBACK, as Feed.publish_retained gives it
        announced.append(json.loads(payload)["version"])
        return True

    notice = Notice(registry.folder / "latest", "sprout/leaves/models/latest", publish, poll_s=0.05)
    notice.start()
    try:
        wait = lambda n: _until(lambda: len(announced) >= n)  # noqa: E731
        wait(1)
        registry.publish(os.urandom(4096), fields(), stages=STAGES)
        wait(2)
        registry.halt_rollout("a test")
        wait(3)
    finally:
        notice.stop(time.monotonic() + 5)
    assert announced == [1, 2, 1]


def _until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sprout_models_rollout_status_promote_and_halt(registry: Registry, tmp_path: Path):
    state = tmp_path / "state"  # where the registry fixture keeps "leaves"
    registry.publish(os.urandom(4096), fields())

    def sprout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SPROUT, "models", "rollout", *args, "--state", str(state), "--model", "leaves"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SPROUT_SIGNING__KEY_FILE": str(registry_signer(registry).path)},
        )

    assert "no staged rollout yet; latest is version 1" in sprout("status").stdout
    refused = sprout("promote")
    assert refused.returncode == 65 and "no version rolling out" in refused.stderr
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    said = sprout("status").stdout
    assert "version 2 reaches 5% of devices (stage 1 of 3: 5%, 25%, 100%); the others keep version 1" in said
    assert sprout("promote", "--reason", "looks good").stdout.strip() == "leaves: version 2 now reaches 25% of devices"
    status = json.loads(sprout("status", "--json").stdout)
    assert status["rollout"]["percent"] == 25.0 and status["latest"] == 1
    assert "its devices go back to version 1" in sprout("halt").stdout
    assert [e.get("reason") for e in registry.events() if e["event"].startswith("rollout")] == [
        "looks good",
        "by hand (sprout models rollout halt)",
    ]


def field_report(device: str, seq: int, version: int, predictions: int, mean: float, corrections: int = 0):
    """A device's report, parsed as the daemon parses it (report_doc below)."""
    report = parse_report(json.dumps(report_doc(device, version, predictions, mean, corrections, seq)).encode())
    assert isinstance(report, FieldReport), report
    return report


def fleet_reports(version: int, replaced: int, devices: int, mean: float, corrections: int, seq: int = 1):
    """Reports of ``devices`` canaries on ``version`` and of as many others on ``replaced`` (scores 0.9)."""
    canaries = [device_in(0, 500) if i == 0 else f"c-{version}-{i}" for i in range(devices)]
    out = [field_report(d, seq, version, 100, mean, corrections) for d in canaries]
    return out + [field_report(f"o-{i}", seq, replaced, 100, 0.9, 1) for i in range(devices)]


@pytest.mark.parametrize(
    ("mean", "corrections", "outcome"),
    [(0.9, 1, "advances"), (0.6, 1, "halts"), (0.9, 8, "halts")],
)
def test_the_watch_advances_a_version_whose_figures_hold_and_halts_one_that_breaches(
    registry: Registry, tmp_path: Path, mean: float, corrections: int, outcome: str
):
    registry.publish(os.urandom(4096), fields())
    registry.publish(os.urandom(4096), fields(), stages=STAGES)
    store = Store(tmp_path / "examples.db")
    cfg = RolloutSettings(stages=STAGES, min_devices=10, min_predictions=300, min_stage_s=0)
    watch = RolloutWatch(lambda: registry, store.location, cfg)
    store.commit([], [], fleet_reports(2, 1, 5, mean, corrections))
    assert watch.check().action == "wait" and "5 devices and 500 predictions reported" in watch.last.reason  # type: ignore[union-attr]
    store.commit([], [], fleet_reports(2, 1, 12, mean, corrections, seq=2))
    verdict = watch.check()
    assert verdict is not None
    r = registry.rollout()
    assert r is not None
    if outcome == "advances":
        assert verdict.action == "advance" and (r.percent, r.state) == (25.0, "rolling")
        assert watch.check().action == "advance" and registry.latest()["version"] == 2  # type: ignore[union-attr,index]
        assert watch.check() is None  # complete: nothing rolls out
    else:
        assert verdict.action == "halt" and r.state == "halted" and registry.offered() == 1
        event = registry.events()[-1]
        assert event["event"] == "rollout_halted" and event["reason"].startswith("automatic: ")
        assert event["figures"]["new"]["devices"] == 12 and event["figures"]["replaced"]["predictions"] == 1700
    store.close()


def test_the_gates_judge_load_failures_early_and_wait_without_a_baseline():
    cfg = RolloutSettings(stages=STAGES, min_devices=10, min_predictions=300, min_stage_s=60)
    bins = (0,) * 10
    failing = VersionInField(2, 12, 9, 3, 0, 0.0, 0, 0.0, bins, 0.0)  # no prediction yet: 3 of 12 loads failed
    assert judge(failing, None, cfg, 0).action == "halt"
    new = VersionInField(2, 12, 12, 0, 400, 360.0, 4, 0.0, bins, 0.0)
    assert "too few reports on the version it replaces" in judge(new, None, cfg, 100).reason
    old = VersionInField(1, 50, 50, 0, 5000, 4500.0, 50, 0.0, bins, 0.0)
    waiting = judge(new, old, cfg, 10)
    assert waiting.action == "wait" and "50 s more at this stage" in waiting.reason
    assert judge(new, old, cfg, 61).action == "advance"


def devices_in(low: int, high: int, n: int) -> list[str]:
    found = (d for i in itertools.count() if low <= bucket_of(device_digest(d := f"dev-{i}")) < high)
    return list(itertools.islice(found, n))


def test_a_daemon_halts_a_bad_canary_from_the_field_reports_alone_and_its_devices_go_back(
    broker, daemon_factory, registry: Registry
):
    registry.publish(os.urandom(4096), fields())
    registry.publish(os.urandom(4096), fields(), stages=STAGES)  # as the exporter would with rollout.stages
    env = {
        "SPROUT_ROLLOUT__STAGES": "[5, 25, 100]",
        "SPROUT_ROLLOUT__MIN_DEVICES": "4",
        "SPROUT_ROLLOUT__MIN_PREDICTIONS": "100",
        "SPROUT_ROLLOUT__MIN_STAGE_S": "0",
        "SPROUT_ROLLOUT__CHECK_EVERY_S": "0.2",
    }
    d = daemon_factory(broker.url, env=env).start()
    assert d.health()[1].get("rollout") is True
    canaries, others = devices_in(0, 500, 4), devices_in(500, 10_000, 4)
    base = f"http://127.0.0.1:{d.http_port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/v1/models/leaves/latest", headers={"Sprout-Device": canaries[0]}).json()["version"] == 2
        with Publisher(broker.url) as pub:
            for device in canaries:  # the canary's scores fell: 0.55 against the fleet's 0.92
                pub.publish_raw("sprout/leaves/telemetry", json.dumps(report_doc(device, 2, 40, 0.55)).encode())
            for device in others:
                pub.publish_raw("sprout/leaves/telemetry", json.dumps(report_doc(device, 1, 40, 0.92)).encode())
            assert pub.wait_all_acked(10)

        def halted() -> bool:
            r = registry.rollout()
            return r is not None and r.state == "halted"

        wait_for(halted, 20, "the daemon to halt the rollout")
        assert client.get("/v1/models/leaves/latest", headers={"Sprout-Device": canaries[0]}).json()["version"] == 1
        event = registry.events()[-1]
        assert event["event"] == "rollout_halted" and "mean top-1 score 0.550 against 0.920" in event["reason"]
        assert 'sprout_rollout_percent{version="2"} 0.0' in client.get("/metrics").text
        assert "halted (automatic: mean top-1 score" in client.get("/").text
    assert d.stop() == 0


def report_doc(device: str, version: int, predictions: int, mean: float, corrections: int = 0, seq: int = 1) -> dict:
    """A report of ``predictions`` top-1 scores all of ``mean``, ``corrections`` of them corrected."""
    bins = [0] * 10
    bins[min(int(mean * 10), 9)] = predictions
    counts = {"version": version, "loads": 1, "predictions": predictions, "confidence_bins": bins}
    counts |= {"confidence_sum": mean * predictions, "corrections": corrections}
    return {"device": device, "seq": seq, "versions": [counts]}
