"""The download API over real HTTP (uvicorn on a free port) and the retained MQTT notice from a real daemon."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from helpers import SPROUT, wait_for
from registry_helpers import fields, public_key_file, registry_signer

from daemon.distribution.http import DownloadApi, HttpServer
from daemon.registry.signing import Signer, verify
from daemon.registry.versions import Registry, registry_root

MODEL = "leaves"  # the registry fixture's (conftest.py)


def serve(root: Path, token: str | None = None, **options) -> tuple[HttpServer, str]:
    server = HttpServer("127.0.0.1", 0, lambda: {"feed": True}, DownloadApi(root, token), **options)
    server.start()
    return server, f"{server.scheme}://{server.address}"


@pytest.fixture
def api(registry: Registry):
    server, base = serve(registry.root)
    with httpx.Client(base_url=f"{base}/v1/models/{MODEL}", timeout=10) as client:
        yield client
    server.stop(time.monotonic() + 5)


def test_latest_and_versions_with_etags_and_304(api: httpx.Client, registry: Registry):
    assert api.get("/latest").status_code == 404
    registry.publish(os.urandom(4096), fields())
    registry.publish(os.urandom(4096), fields())
    r = api.get("/latest")
    assert r.status_code == 200 and r.json()["version"] == 2
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert r.content == (registry.folder / "latest").read_bytes()  # the registry's bytes, as signed
    again = api.get("/latest", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert [v["version"] for v in api.get("/versions").json()] == [2, 1]
    registry.rollback(1)
    moved = api.get("/latest", headers={"If-None-Match": r.headers["etag"]})
    assert moved.status_code == 200 and moved.json()["version"] == 1  # the old ETag no longer matches


def test_the_detached_signatures_are_served_and_verify_the_bytes_served(api: httpx.Client, registry: Registry):
    assert api.get("/latest.sig").json() == {"error": "nothing published yet"}
    registry.publish(os.urandom(4096), fields())
    registry.publish(os.urandom(4096), fields())
    document, signature = api.get("/latest"), api.get("/latest.sig")
    assert signature.status_code == 200 and len(signature.content) == 64
    assert signature.headers["content-type"] == "application/octet-stream"
    assert signature.headers["cache-control"] == "no-cache"
    public_key = registry_signer(registry).public_key
    verify(document.content, signature.content, public_key)
    assert api.get("/latest.sig", headers={"If-None-Match": signature.headers["etag"]}).status_code == 304
    for v in (1, 2):
        pair = api.get(f"/versions/{v}/manifest.json"), api.get(f"/versions/{v}/manifest.json.sig")
        assert pair[1].headers["cache-control"] == "public, max-age=31536000, immutable"
        verify(pair[0].content, pair[1].content, public_key)
    assert api.get("/versions/2/manifest.json").content == document.content
    registry.rollback(1)
    verify(api.get("/latest").content, api.get("/latest.sig").content, public_key)
    assert api.get("/latest.sig").content == api.get("/versions/1/manifest.json.sig").content


def test_model_file_etag_304_range_and_resume_after_a_cut(api: httpx.Client, registry: Registry):
    data = os.urandom(300_000)
    manifest = registry.publish(data, fields())
    url = manifest["files"]["model.tflite"]["path"]
    assert url == "versions/1/model.tflite"
    r = api.get(f"/{url}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert "immutable" in r.headers["cache-control"] and r.headers["accept-ranges"] == "bytes"
    assert api.get(f"/{url}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    # A download cut off part-way, as on a weak link: keep what arrived, ask for the rest.
    got = bytearray()
    with api.stream("GET", f"/{url}") as partial:
        for chunk in partial.iter_bytes(16_384):
            got += chunk
            if len(got) >= 100_000:
                break
    rest = api.get(f"/{url}", headers={"Range": f"bytes={len(got)}-", "If-Range": r.headers["etag"]})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {len(got)}-{len(data) - 1}/{len(data)}"
    assert bytes(got) + rest.content == data
    assert api.get(f"/{url}", headers={"Range": "bytes=400000-"}).status_code == 416
    m = api.get("/versions/1/manifest.json")
    assert m.status_code == 200 and m.json() == manifest and "immutable" in m.headers["cache-control"]
    assert api.get("/versions/1/labels.txt").text == "healthy\nrust\nblight\n"


@pytest.mark.parametrize(
    "path, status",
    [
        ("/versions/01/model.tflite", 400),
        ("/versions/x/model.tflite", 400),
        ("/versions/-1/model.tflite", 400),
        ("/versions/1.0/model.tflite", 400),
        ("/versions/1%00/model.tflite", 400),
        ("/versions/99999999999999999999999/model.tflite", 400),
        ("/versions/%2e%2e/model.tflite", 400),
        ("/versions/1/%2e%2e%2f%2e%2e%2fkeys%2fsigning.key", 404),
        ("/versions/7/model.tflite", 404),
        ("/versions/1/signing.key", 404),
        ("/versions/1/..%2F..%2Fkeys%2Fsigning.key", 404),
    ],
)
def test_paths_outside_what_the_registry_holds_are_refused(api: httpx.Client, registry: Registry, path, status):
    registry.publish(os.urandom(1024), fields())
    r = api.get(path)
    assert r.status_code == status and "error" in r.json()


def test_model_names_are_checked_before_any_path_is_built(api: httpx.Client, registry: Registry):
    base = str(api.base_url).rstrip("/").rsplit("/", 1)[0]
    assert api.get(f"{base}/..%2Fkeys/latest").status_code == 404  # decoded, it is no route at all
    assert api.get(f"{base}/.hidden/latest").status_code == 400
    assert api.get(f"{base}/..%2E/latest").status_code == 400
    assert api.get(f"{base}/a%20b/latest").status_code == 400
    assert api.get(f"{base}/maize/latest").json() == {"error": "no model 'maize' is published here"}


def test_a_configured_token_guards_downloads_but_not_health(registry: Registry):
    registry.publish(os.urandom(1024), fields())
    server, base = serve(registry.root, token="s3cret-token")
    try:
        url = f"{base}/v1/models/{MODEL}/latest"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        server.stop(time.monotonic() + 5)


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}/latest/", "/healthz/"])
def test_a_trailing_slash_gets_the_json_404_not_a_redirect_built_from_the_host_header(registry: Registry, path):
    registry.publish(os.urandom(1024), fields())
    server, base = serve(registry.root, token="s3cret-token")
    try:
        r = httpx.get(f"{base}{path}", headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers
        assert r.json() == {"error": f"no such path: {path} (the API is in docs/devices.md)"}
    finally:
        server.stop(time.monotonic() + 5)


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """True once the server closes ``sock`` (whatever it answered first), False if it is still open at ``deadline``."""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.05))  # past the deadline, what has already happened
            if not sock.recv(65_536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def status_of(sock: socket.socket) -> int:
    """Read one whole response (its body by Content-Length) from ``sock``; returns its status."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += (more := sock.recv(65_536))
        assert more, "the server closed the connection"
    head, _, body = got.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert found, head
    length = int(found[1])
    while len(body) < length:
        body += (more := sock.recv(65_536))
        assert more, "the server closed the connection"
    return int(head.split()[1])


def test_a_request_not_sent_in_time_is_cut_off_but_keep_alive_and_downloads_are_not(registry: Registry):
    data = os.urandom(32 << 20)  # more than the socket buffers hold, so the server is still sending when we pause
    registry.publish(data, fields())
    server, base = serve(registry.root, request_timeout_s=0.5)
    address = base.removeprefix("http://").rsplit(":", 1)
    slow = [
        b"",
        b"GET /hea",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"0" * 10,
    ]
    sockets = [socket.create_connection((address[0], int(address[1])), timeout=5) for _ in slow]
    try:
        for sock, part in zip(sockets, slow, strict=True):
            sock.sendall(part)
        # Well within uvicorn's 5 s keep-alive, which would otherwise be the first to close the answered POST.
        deadline = time.monotonic() + 2.5
        assert [closed_by_server(sock, deadline) for sock in sockets] == [True] * len(slow)
        with socket.create_connection((address[0], int(address[1])), timeout=5) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(kept) == 200
            time.sleep(1.0)  # idle longer than request_timeout_s, shorter than keep-alive: the connection stays
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(kept) == 200
        # A download the device reads slowly is a response being sent, not a request: never cut off.
        got = bytearray()
        with httpx.stream("GET", f"{base}/v1/models/{MODEL}/versions/1/model.tflite", timeout=10) as r:
            for chunk in r.iter_bytes(1 << 20):
                if not got:
                    time.sleep(1.0)
                got += chunk
        assert bytes(got) == data
    finally:
        for sock in sockets:
            sock.close()
        server.stop(time.monotonic() + 5)


def test_https_with_the_configured_certificate(registry: Registry, tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    registry.publish(os.urandom(1024), fields())
    server, base = serve(registry.root, tls_cert_file=cert_file, tls_key_file=key_file)
    try:
        assert base.startswith("https://")
        r = httpx.get(f"{base}/v1/models/{MODEL}/latest", verify=ssl.create_default_context(cafile=str(cert_file)))
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        server.stop(time.monotonic() + 5)


class NoticeListener:
    """A device's view of the notice topic: every retained or live manifest received, in order."""

    def __init__(self, broker_url: str, topic: str):
        self.versions: list[int] = []
        self.retained: list[bool] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.versions.append(json.loads(message.payload)["version"])
            self.retained.append(bool(message.retain))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_every_publish_and_rollback_is_announced_retained(broker, daemon_factory, tmp_path: Path):
    state = tmp_path / "state"
    daemon = daemon_factory(broker.url, state=state).start()
    registry = Registry(registry_root(state), MODEL, Signer.load_or_create(state / "signing" / "signing.key"), 5)
    topic = f"sprout/{MODEL}/models/latest"
    device = NoticeListener(broker.url, topic)
    try:
        registry.publish(os.urandom(2048), fields())
        wait_for(lambda: device.versions == [1], 30, "the notice of version 1")
        registry.publish(os.urandom(2048), fields())
        wait_for(lambda: device.versions == [1, 2], 30, "the notice of version 2")
        # A rollback from the CLI, another process: announced all the same.
        out = subprocess.run(
            [*SPROUT, "models", "rollback", "1", "--state", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SPROUT_MODEL__NAME": MODEL},
        )
        assert out.returncode == 0, out.stderr
        wait_for(lambda: device.versions == [1, 2, 1], 30, "the notice of the rollback")
        with httpx.Client() as http:
            latest = http.get(f"http://127.0.0.1:{daemon.http_port}/v1/models/{MODEL}/latest").json()
        assert latest["version"] == 1
    finally:
        device.close()
    late = NoticeListener(broker.url, topic)  # a device that connects later gets the latest at once
    try:
        wait_for(lambda: late.versions == [1] and late.retained == [True], 30, "the retained notice")
    finally:
        late.close()
    assert daemon.stop() == 0


def test_a_network_facing_bind_serves_phones_the_api_only_and_the_operator_pages_stay_on_loopback(broker, tmp_path):
    """server.http on 0.0.0.0 (so phones reach it): /, /metrics and /healthz move to server.admin_http."""
    import urllib.error
    import urllib.request

    from daemon.tools.broker import free_port

    phone_port, admin_port = free_port(), free_port()

    def get(port: int, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    env = {**os.environ, "SPROUT_TRAINING__ENABLED": "false", "SPROUT_SERVER__ADMIN_HTTP": f"127.0.0.1:{admin_port}"}
    proc = subprocess.Popen(
        [
            *SPROUT,
            "run",
            "--broker",
            broker.url,
            "--state",
            str(tmp_path / "state"),
            "--model",
            "leaves",
            "--http",
            f"0.0.0.0:{phone_port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: get(admin_port, "/healthz")[0] == 200, 30, "the operator's address to answer")
        for path in ("/", "/metrics", "/healthz"):
            status, body = get(phone_port, path)
            assert status == 404, (path, status)
            assert b"sprout_" not in body and b"<html" not in body.lower()
        status, body = get(phone_port, "/v1/models/leaves/latest")
        assert status == 404 and b"is published here" in body  # the phones' API answers there
        status, body = get(admin_port, "/metrics")
        assert status == 200 and b"sprout_examples_stored" in body
        assert get(admin_port, "/")[0] == 200
        assert b"no such path" in get(admin_port, "/v1/models/leaves/latest")[1]  # and no model API there
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_the_fleet_view_counts_versions_run_and_downloads_without_keeping_a_device_id(registry: Registry, tmp_path):
    """sprout-edge tells the server its opaque id and running version; the server keeps counts only."""
    from edge.modeldir import ModelDir
    from edge.sync import sync

    registry.publish(os.urandom(8192), fields())
    server, base = serve(registry.root)
    try:
        key = public_key_file(registry_signer(registry))
        phone_a, phone_b = tmp_path / "phone-a", tmp_path / "phone-b"
        assert sync(base, MODEL, phone_a, public_key=key, runtime=None).status == "installed"  # runs none yet
        assert sync(base, MODEL, phone_a, public_key=key, runtime=None).status == "unchanged"  # now runs 1
        assert sync(base, MODEL, phone_b, public_key=key, runtime=None).status == "installed"
        assert server.api is not None
        fleet = server.api.fleet
        view = fleet.view()
        assert view.devices_by_version == {"1": 1, "none": 1}  # a, last heard running 1; b, before its install
        assert view.downloads_by_version == {1: 2}
        device_id = ModelDir(phone_a).device_id()
        assert ModelDir(phone_a).device_id() == device_id  # made once, kept
        assert device_id.encode() not in repr(fleet._seen).encode()  # only keyed hashes are held
        with httpx.Client(base_url=base, timeout=10) as client:
            # A request without the headers, or with a junk id, counts no device.
            client.get(f"/v1/models/{MODEL}/latest", headers={"Sprout-Device": "x" * 500, "Sprout-Version": "1"})
            client.get(f"/v1/models/{MODEL}/latest")
        assert fleet.view().devices_by_version == {"1": 1, "none": 1}
    finally:
        server.stop(time.monotonic() + 5)


def test_a_device_not_heard_from_for_a_day_no_longer_counts_and_memory_is_bounded():
    from daemon.distribution.fleet import Fleet

    fleet = Fleet(window_s=0.2, max_devices=3)
    for i in range(5):
        fleet.heard(f"device-{i}", "2")
    assert fleet.view().devices_by_version == {"2": 3}  # the least recently heard went first
    time.sleep(0.3)
    fleet.heard("device-9", None)
    assert fleet.view().devices_by_version == {"none": 1}
