"""End to end through a real Mosquitto and the real daemon process: nothing acknowledged is ever lost."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from helpers import SPROUT, jpeg, png, publish_examples, rejection_notices, stored_ids, wait_for
from PIL import Image

from daemon.tools.feeder import Publisher


def ids_and_labels(n: int, prefix: str = "ex", classes: tuple[str, ...] = ("rust", "blight", "healthy")):
    ids = [f"{prefix}-{i:05d}" for i in range(n)]
    return ids, [classes[i % len(classes)] for i in range(n)]


def store_stats(state, model: str = "leaves") -> dict:
    out = subprocess.run(
        [*SPROUT, "store", "stats", "--state", str(state), "--model", model], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_every_published_example_is_stored_once_with_its_label(broker, daemon_factory, tmp_path):
    d = daemon_factory(broker.url).start()
    ids, labels = ids_and_labels(300)
    publish_examples(broker.url, "leaves", ids, labels)
    # The same ids again (a phone resending after a timeout): stored once.
    publish_examples(broker.url, "leaves", ids[:50], labels[:50])
    wait_for(lambda: len(stored_ids(d.state)) == 300, 30, "300 stored examples")
    assert sorted(stored_ids(d.state)) == ids
    stats = store_stats(d.state)
    assert stats["total"] == 300
    assert stats["per_label"] == {"blight": 100, "healthy": 100, "rust": 100}
    assert stats["per_split"]["train"] + stats["per_split"]["holdout"] == 300
    assert 10 <= stats["per_split"]["holdout"] <= 60  # the 10% hash split
    assert stats["rejected_total"] == 0
    assert d.stop() == 0
    assert "stopped in" in d.log()


def test_sigkill_mid_stream_loses_nothing(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    n = 1500
    ids, labels = ids_and_labels(n)
    feeder = threading.Thread(target=publish_examples, args=(broker.url, "leaves", ids, labels, 400.0), daemon=True)
    feeder.start()
    rng = random.Random(7)
    kills = 0
    while feeder.is_alive() and kills < 4:
        time.sleep(rng.uniform(0.4, 0.9))
        d.kill()
        kills += 1
        d.start()
    feeder.join(60)
    assert kills >= 3, "the stream ended before the daemon was killed enough times; slow the feed"
    wait_for(lambda: len(stored_ids(d.state)) == n, 60, f"{n} stored examples after {kills} kills")
    stored = stored_ids(d.state)
    assert len(stored) == len(set(stored)) == n
    assert set(stored) == set(ids)
    assert d.stop() == 0


def test_broker_restart_while_the_daemon_is_down_loses_nothing(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    d.stop()  # the broker now holds Sprout's session
    ids, labels = ids_and_labels(400)
    publish_examples(broker.url, "leaves", ids, labels)
    broker.stop(signal.SIGTERM)  # persistence on: the queued examples are saved to disk
    broker.start()
    d.start()
    wait_for(lambda: len(stored_ids(d.state)) == 400, 30, "400 examples queued across a broker restart")
    assert sorted(stored_ids(d.state)) == ids


def test_broker_restart_while_the_daemon_runs(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    first, labels = ids_and_labels(200, "before")
    publish_examples(broker.url, "leaves", first, labels)
    broker.stop(signal.SIGTERM)
    broker.start()
    wait_for(lambda: d.health()[0] == 200, 30, "the daemon to resubscribe after the broker restart")
    second, labels = ids_and_labels(200, "after")
    publish_examples(broker.url, "leaves", second, labels)
    wait_for(lambda: len(stored_ids(d.state)) == 400, 30, "400 examples across a live broker restart")
    assert set(stored_ids(d.state)) == set(first + second)


def bad_messages() -> list[tuple[str, bytes, mqtt.Properties | None, str]]:
    """(name, payload, properties, expected reason) for each kind of malformed message."""

    def props(label=None, content_type="image/jpeg", **extra):
        p = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        if content_type:
            p.ContentType = content_type
        user = ([("label", label)] if label is not None else []) + list(extra.items())
        if user:
            p.UserProperty = user
        return p

    good = jpeg(1)
    return [
        ("no label", good, props(), "missing_label"),
        ("empty label", good, props(""), "bad_label"),
        # Mosquitto itself drops senders whose strings hold control characters, so these reach us:
        ("invisible label", good, props("\u200b"), "bad_label"),
        ("overlong label", good, props("x" * 129), "bad_label"),
        ("bad split", good, props("rust", split="validation"), "bad_split"),
        ("gif", good, props("rust", "image/gif"), "unsupported_content_type"),
        ("no content type", good, props("rust", None), "unsupported_content_type"),
        ("png declared as jpeg", png(1), props("rust"), "content_type_mismatch"),
        ("garbage", b"\x00\x01\x02" * 100, props("rust"), "not_an_image"),
        ("truncated", good[: len(good) // 2], props("rust", example_id="cut-1"), "truncated_image"),
        ("empty", b"", props("rust"), "empty_image"),
        ("bad json", b"{oops", None, "bad_json"),
        (
            "bad base64",
            json.dumps({"label": "rust", "image": "%%%", "content_type": "image/jpeg"}).encode(),
            None,
            "bad_base64",
        ),
    ]


def test_malformed_messages_are_rejected_counted_and_reported(broker, daemon_factory, tmp_path):
    d = daemon_factory(broker.url, env={"SPROUT_STORE__MAX_IMAGE_PIXELS": "1000000"}).start()
    with rejection_notices(broker.port) as notices:
        cases = bad_messages()
        good_ids, good_labels = ids_and_labels(20, "good")
        with Publisher(broker.url) as pub:
            for i, (_name, payload, props, _) in enumerate(cases):
                pub.publish_raw("sprout/leaves/examples", payload, props)
                pub.publish("sprout/leaves/examples", jpeg(100 + i), good_labels[i], "image/jpeg", good_ids[i])
            # A JSON example from an MQTT 3.1.1 sender, and a pixel bomb (2000 x 2000 > 1 M pixel limit).
            doc = {
                "label": "rust",
                "image": base64.b64encode(jpeg(5)).decode(),
                "content_type": "image/jpeg",
                "example_id": "json-1",
            }
            pub.publish_raw("sprout/leaves/examples", json.dumps(doc).encode())
            buf = io.BytesIO()
            Image.new("L", (2000, 2000)).save(buf, format="PNG")
            pub.publish("sprout/leaves/examples", buf.getvalue(), "rust", "image/png", "bomb-1")
            assert pub.wait_all_acked(10)

        expected: dict[str, int] = {"too_many_pixels": 1}
        for _, _, _, reason in cases:
            expected[reason] = expected.get(reason, 0) + 1
        want_stored = set(good_ids[: len(cases)]) | {"json-1"}
        wait_for(lambda: set(stored_ids(d.state)) == want_stored, 30, "the good examples among the bad")
        wait_for(lambda: len(notices) == sum(expected.values()), 10, "a notice per rejection")
        stats = store_stats(d.state)
        assert stats["rejected"] == dict(sorted(expected.items()))
        assert stats["total"] == len(want_stored)
        assert sorted(n["reason"] for n in notices) == sorted(r for r, k in expected.items() for _ in range(k))
        assert {"example_id": "cut-1", "reason": "truncated_image"}.items() <= next(
            n for n in notices if n["example_id"] == "cut-1"
        ).items()
        assert all("image" not in n for n in notices)
        assert d.health()[0] == 200  # still up and ingesting
        assert d.stop() == 0


def poison_messages() -> list[tuple[str, bytes, mqtt.Properties | None, str]]:
    """What an outside tester sent that once ended the MQTT network thread, and the smaller findings beside it."""

    def props(label="rust", content_type="image/jpeg", **extra):
        p = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        p.ContentType = content_type
        p.UserProperty = [("label", label), *extra.items()]
        return p

    huge_number = b'{"label": "rust", "image": "", "n": ' + b"7" * 4_400 + b"}"  # past Python's int-to-string limit
    cut = jpeg(3, 64)[:200] + b"\xff\xd9"  # a valid header and an end marker around nothing
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(buf, format="PNG")  # ~143 KB; 147 MB if decoded whole
    return [
        ("deep nesting", b"[" * 100_000, None, "bad_json"),
        ("huge integer", huge_number, None, "bad_json"),
        (
            "broken base64 keeps its id",
            json.dumps({"label": "rust", "image": "%%%", "content_type": "image/jpeg", "example_id": "b64-1"}).encode(),
            None,
            "bad_base64",
        ),
        ("body that does not decode", cut, props(label="ghost-class", example_id="cut-200"), "corrupt_image"),
        ("all-zero 7000x7000 png", buf.getvalue(), props(content_type="image/png"), "too_many_pixels"),
    ]


def test_poison_messages_are_rejected_and_the_examples_behind_them_stored(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    with rejection_notices(broker.port) as notices:
        cases = poison_messages()
        with Publisher(broker.url) as pub:
            for i, (_, payload, props, _) in enumerate(cases):
                pub.publish_raw("sprout/leaves/examples", payload, props)
                pub.publish("sprout/leaves/examples", jpeg(200 + i), "rust", "image/jpeg", f"after-{i}")
            assert pub.wait_all_acked(10)
        wait_for(lambda: len(stored_ids(d.state)) == len(cases), 30, "every good example behind a poison one")
        wait_for(lambda: len(notices) == len(cases), 10, "a notice per rejection")
        assert sorted(n["reason"] for n in notices) == sorted(reason for *_, reason in cases)
        assert next(n for n in notices if n["reason"] == "bad_base64")["example_id"] == "b64-1"
        assert next(n for n in notices if n["reason"] == "corrupt_image")["example_id"] == "cut-200"
        assert d.health() == (200, {"feed": True, "intake": True, "disk": True, "notice": True})
        assert "ghost-class" not in store_stats(d.state)["per_label"]
        # Acked with their rejection: a restart receives none of them again, and a new example goes through.
        assert d.stop() == 0
        d.start()
        publish_examples(broker.url, "leaves", ["after-restart"], ["rust"])
        wait_for(lambda: "after-restart" in stored_ids(d.state), 10, "an example after the restart")
        time.sleep(0.5)
        assert store_stats(d.state)["rejected"] == dict(sorted(Counter(reason for *_, reason in cases).items()))
        assert d.stop() == 0


def test_sigterm_commits_what_arrived_and_exits_0(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    ids, labels = ids_and_labels(500)
    feeder = threading.Thread(target=publish_examples, args=(broker.url, "leaves", ids, labels, 1000.0), daemon=True)
    feeder.start()
    time.sleep(0.2)
    assert d.stop(timeout_s=20) == 0
    feeder.join(30)
    # Whatever arrived before the stop is stored; the rest waits in the broker's session.
    d.start()
    wait_for(lambda: len(stored_ids(d.state)) == 500, 30, "all 500 after a graceful stop and restart")
    assert d.stop() == 0


def test_sprout_feed_publishes_fashion_mnist_and_folders(broker, daemon_factory, tmp_path):
    d = daemon_factory(broker.url).start()
    out = subprocess.run(
        [
            *SPROUT,
            "feed",
            "--broker",
            broker.url,
            "--model",
            "leaves",
            "--dataset",
            "fashion-mnist",
            "--limit",
            "60",
            "--order",
            "class-incremental",
            "--classes",
            "Bag,Sandal",
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["acked"] == 60
    wait_for(lambda: len(stored_ids(d.state)) == 60, 30, "60 Fashion-MNIST examples")
    stats = store_stats(d.state)
    assert stats["per_label"] == {"Bag": 60}  # class-incremental: all of the first class first
    tree = tmp_path / "leaves"
    for label, maker in (("Tomato___Late_blight", jpeg), ("Tomato___healthy", png)):
        (tree / label).mkdir(parents=True)
        for i in range(5):
            (tree / label / f"{i}.{'jpg' if maker is jpeg else 'png'}").write_bytes(maker(i + 50))
    out = subprocess.run(
        [*SPROUT, "feed", "--broker", broker.url, "--model", "leaves", "--dir", str(tree)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(stored_ids(d.state)) == 70, 30, "the folder's 10 images")
    assert store_stats(d.state)["per_label"] == {"Bag": 60, "Tomato___Late_blight": 5, "Tomato___healthy": 5}
    assert d.stop() == 0


def test_sprout_feed_warns_when_nothing_subscribes(broker):
    out = subprocess.run(
        [*SPROUT, "feed", "--broker", broker.url, "--model", "nobody", "--dataset", "fashion-mnist", "--limit", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout.strip().splitlines()[-1])["no_subscribers"] == 5
    assert "start 'sprout run' once first" in out.stderr


# The demo serves HTTP on the default 127.0.0.1:8080; a free port here, so a Sprout running beside the
# tests (or another test) cannot make it fail.
ANY_PORT = {"SPROUT_SERVER__HTTP": "127.0.0.1:0"}


@pytest.mark.slow
def test_demo_runs_the_main_job(broker, tmp_path):
    # The real default: EfficientNet-Lite0 with its ImageNet weights, head mode on the CPU.
    # As a user runs it: from a folder of their own, the state in the default ./var (a relative path that
    # the export process, which runs in a temporary folder, once resolved to another folder).
    out = subprocess.run(
        [*SPROUT, "demo", "--limit", "300", "--rate", "0", "--broker", broker.url, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ANY_PORT},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "var" / "device").is_dir() and (
        tmp_path / "var" / "registry" / "plant-disease" / "latest"
    ).is_file()
    summary = json.loads(out.stdout)
    assert json.loads((tmp_path / "var" / "demo-summary.json").read_text()) == summary
    # A clean terminal: the demo's own lines only. The daemon's log, the export process's libraries
    # (absl, oneDNN, torchao, torch's deprecation notices) and LiteRT's C++ notices are in var/demo.log.
    noise = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("demo: ", "device: "))]
    assert not noise, "\n".join(noise[:20])
    assert "Traceback" not in out.stderr
    assert "sprout.export: exporting:" in (tmp_path / "var" / "demo.log").read_text()
    assert summary["feed"]["acked"] == 300
    assert summary["store"]["total"] == 300
    assert len(summary["store"]["per_label"]) == 10
    learner = summary["learner"]
    assert learner["backbone"] == "efficientnet_lite0" and learner["mode"] == "head"
    assert learner["learned"] == summary["store"]["per_split"]["train"]
    assert len(learner["classes"]) == 10
    assert learner["holdout_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert "demo: fed" in out.stderr and "prequential" in out.stderr
    assert summary["export"]["latest_version"] >= 1  # it published a verified, signed model
    # ... and the device holds it, verified, and classifies photos the daemon never saw.
    device = summary["device"]
    assert device["version"] == summary["export"]["latest_version"]
    assert device["test_photos"] == 200 and device["top1_on_device"] > 0.3
    assert "demo: status page at http://" in out.stderr and "demo: published version 1" in out.stderr
    assert "device: installed version" in out.stderr
    # Each line says what came over the network: the whole file, or a delta to the version held.
    installs = re.findall(
        r"device: installed version \d+ \((full file, [\d.]+ MB|a [\d.]+ kB delta for [\d.]+ MB)\)", out.stderr
    )
    assert installs and installs[0].startswith("full file"), out.stderr[-2000:]
    assert re.search(r"demo: published version 1: \w+ \(converted in full( in \d+ s)?\), [\d.]+ MB full, ", out.stderr)
    # A newcomer runs it again in the same folder: everything is stored and learned already, nothing new
    # is published, and the device still ends with the verified model: a success, not "no model".
    again = subprocess.run(
        [*SPROUT, "demo", "--limit", "300", "--rate", "0", "--broker", broker.url, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ANY_PORT},
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    second = json.loads(again.stdout)
    assert second["store"]["total"] == 300 and second["export"]["published"] == 0
    assert second["export"]["latest_version"] == second["device"]["version"] == device["version"]


def test_a_demo_that_publishes_no_model_fails_in_one_line(broker, tmp_path):
    env = {
        **os.environ,
        **ANY_PORT,
        "SPROUT_MODEL__BACKBONE": "tiny",
        "SPROUT_MODEL__INPUT_SIZE": "32",
        "SPROUT_EXPORT__ENABLED": "false",
    }
    out = subprocess.run(
        [*SPROUT, "demo", "--limit", "40", "--rate", "0", "--broker", broker.url, "--max-seconds", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "demo: FAILED: no model can be published: training.enabled and export.enabled must both be true"
    )


@pytest.mark.slow
def test_ctrl_c_during_an_export_of_the_real_model_stops_the_demo_cleanly(broker, tmp_path):
    """litert-torch's converter runs C++ threads that abort the process if Python finalises around them."""
    terminal = tmp_path / "terminal.txt"
    log = tmp_path / "demo" / "demo.log"  # the daemon's log, where the demo sends it
    with open(terminal, "w") as out:
        demo = subprocess.Popen(
            [
                *SPROUT,
                "demo",
                "--limit",
                "1100",
                "--rate",
                "0",
                "--state",
                str(tmp_path / "demo"),
                "--broker",
                broker.url,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **ANY_PORT},
        )
        try:
            wait_for(
                lambda: (log.exists() and "sprout.export: exporting: " in log.read_text()) or demo.poll() is not None,
                300,
                "the first export to start",
            )
            time.sleep(3.0)  # into the conversion proper
            demo.send_signal(signal.SIGINT)
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    text = log.read_text()
    assert code == 0, terminal.read_text()[-2000:] + text[-3000:]
    assert "terminate called" not in text + terminal.read_text() and "stopped in" in text


def test_shared_subscription_spreads_one_feed_over_two_daemons(broker, daemon_factory, tmp_path):
    daemons = [
        daemon_factory(
            broker.url,
            state=tmp_path / f"state-{i}",
            env={"SPROUT_MQTT__SHARE_GROUP": "farm", "SPROUT_MQTT__CLIENT_ID": f"sprout-leaves-{i}"},
        ).start()
        for i in range(2)
    ]
    ids, labels = ids_and_labels(400)
    publish_examples(broker.url, "leaves", ids, labels)
    wait_for(lambda: sum(len(stored_ids(d.state)) for d in daemons) == 400, 30, "400 examples across the group")
    parts = [set(stored_ids(d.state)) for d in daemons]
    assert parts[0] | parts[1] == set(ids)
    assert not parts[0] & parts[1]  # each example went to one member
    assert all(parts)  # and both members got some
    for d in daemons:
        assert d.stop() == 0


def test_broker_password_from_the_environment(tmp_path, daemon_factory):
    from daemon.tools.broker import Mosquitto

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "sprout", "s3cret-pw"], check=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "phone", "phone-pw"], check=True, timeout=30)
    passwords.chmod(0o644)
    # An ACL written before devices' reports existed: the daemon may read the examples, not the telemetry topic.
    acl = tmp_path / "acl"
    acl.write_text(
        "user sprout\ntopic read sprout/leaves/examples\ntopic write sprout/leaves/rejected\n"
        "topic readwrite sprout/leaves/models/#\nuser phone\ntopic write sprout/leaves/examples\n"
    )
    acl.chmod(0o644)
    extra = f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"
    broker = Mosquitto(tmp_path / "broker", extra_conf=extra)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    try:
        wrong = daemon_factory(
            broker.url,
            state=tmp_path / "wrong",
            env={"SPROUT_MQTT__USERNAME": "sprout", "SPROUT_MQTT__PASSWORD": "nope"},
        ).start(wait_ready=False)
        wait_for(lambda: "refused the connection" in wrong.log(), 20, "the refusal to be logged")
        assert wrong.health()[0] == 503
        assert "nope" not in wrong.log()
        wrong.stop()
        d = daemon_factory(
            broker.url,
            state=tmp_path / "right",
            env={"SPROUT_MQTT__USERNAME": "sprout", "SPROUT_MQTT__PASSWORD": "s3cret-pw"},
        ).start()
        ids, labels = ids_and_labels(50)
        publish_examples(broker.url.replace("mqtt://", "mqtt://phone:phone-pw@"), "leaves", ids, labels)
        wait_for(lambda: len(stored_ids(d.state)) == 50, 30, "50 examples through an authenticated broker")
        assert "s3cret-pw" not in d.log()
        assert d.health()[0] == 200  # an ACL without the telemetry topic takes nothing from the examples
        assert d.stop() == 0
    finally:
        broker.kill()
