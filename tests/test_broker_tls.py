"""The broker link under TLS: verified against the configured CA, with a password, never in plaintext.

A test CA is made with openssl for each test; Mosquitto gets a TLS listener
with a certificate signed by it, beside its plaintext one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import SPROUT, jpeg, stored_ids, wait_for

from daemon.tools.broker import Mosquitto, free_port
from daemon.tools.feeder import Publisher

PASSWORD = "tls-s3cret-pw"


def ids_and_labels(n: int) -> tuple[list[str], list[str]]:
    return [f"tls-{i:04d}" for i in range(n)], [("rust", "healthy")[i % 2] for i in range(n)]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Path:
    """A self-signed CA; returns its certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    return folder / f"{name}.pem"


def issue_server_cert(ca: Path, folder: Path, alt_names: str) -> tuple[Path, Path]:
    """A server certificate for ``alt_names`` (e.g. 'IP:127.0.0.1,DNS:localhost') signed by ``ca``."""
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=sprout-test-broker",
        cwd=folder,
    )
    ext = folder / "server.ext"
    ext.write_text(f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca.with_suffix(".key")),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
        cwd=folder,
    )
    key.chmod(0o644)  # Mosquitto runs as the invoking user in the tests; it must read it
    return cert, key


class TlsBroker:
    """Mosquitto with its usual plaintext listener plus a TLS one, passwords required on both."""

    def __init__(self, folder: Path, alt_names: str = "IP:127.0.0.1,DNS:localhost"):
        self.ca = make_ca(folder / "pki", "sprout-test-ca")
        cert, key = issue_server_cert(self.ca, folder / "pki", alt_names)
        passwords = folder / "passwd"
        for i, (user, pw) in enumerate((("sprout", PASSWORD), ("phone", "phone-pw"))):
            flags = ["-b", "-c"] if i == 0 else ["-b"]
            subprocess.run(["mosquitto_passwd", *flags, str(passwords), user, pw], check=True, timeout=30)
        passwords.chmod(0o644)
        self.tls_port = free_port()
        self.broker = Mosquitto(
            folder / "broker",
            extra_conf=f"allow_anonymous false\npassword_file {passwords}\n"
            f"listener {self.tls_port} 127.0.0.1\ncafile {self.ca}\ncertfile {cert}\nkeyfile {key}\n"
            "require_certificate false\n",
        )
        conf = self.broker.conf
        conf.write_text(conf.read_text().replace("allow_anonymous true\n", ""))

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def log(self) -> str:
        path = self.broker.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> TlsBroker:
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.kill()


def publish_over_tls(broker: TlsBroker, ids: list[str], labels: list[str]) -> None:
    url = broker.tls_url.replace("mqtts://", "mqtts://phone:phone-pw@")
    with Publisher(url, window=64, ca_file=broker.ca) as pub:
        for i, (example_id, label) in enumerate(zip(ids, labels, strict=True)):
            pub.publish("sprout/leaves/examples", jpeg(i), label, "image/jpeg", example_id)
        assert pub.wait_all_acked(30.0), pub.report


def tls_env(ca: Path, password_file: Path) -> dict[str, str]:
    return {
        "SPROUT_MQTT__USERNAME": "sprout",
        "SPROUT_MQTT__PASSWORD_FILE": str(password_file),
        "SPROUT_MQTT__TLS_CA_FILE": str(ca),
    }


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def test_examples_arrive_over_tls_verified_with_the_configured_ca(tmp_path, daemon_factory, password_file):
    with TlsBroker(tmp_path) as broker:
        d = daemon_factory(broker.tls_url, env=tls_env(broker.ca, password_file)).start()
        ids, labels = ids_and_labels(40)
        publish_over_tls(broker, ids, labels)
        wait_for(lambda: len(stored_ids(d.state)) == 40, 30, "40 examples over TLS")
        assert sorted(stored_ids(d.state)) == sorted(ids)
        assert "as sprout-leaves" in broker.log()  # the broker saw our session, on the TLS port we gave it
        assert d.stop() == 0
        assert PASSWORD not in d.log()

    # The resolved configuration shows where the password lives, never the password.
    config = tmp_path / "sprout.toml"
    config.write_text(
        f'[mqtt]\nbroker = "{broker.tls_url}"\nusername = "sprout"\n'
        f'password_file = "{password_file}"\ntls_ca_file = "{broker.ca}"\n'
    )
    out = subprocess.run([*SPROUT, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mqtt"]["tls_ca_file"] == str(broker.ca)
    assert PASSWORD not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("trouble", "expected"),
    [
        ("another_ca", "does not verify against mqtt.tls_ca_file"),
        ("wrong_host_name", "does not verify against mqtt.tls_ca_file"),
        ("plaintext_port", "during the TLS handshake"),
    ],
)
def test_a_link_that_is_not_verified_tls_is_never_used(tmp_path, daemon_factory, password_file, trouble, expected):
    alt_names = "DNS:broker.elsewhere.example" if trouble == "wrong_host_name" else "IP:127.0.0.1,DNS:localhost"
    with TlsBroker(tmp_path, alt_names) as broker:
        ca = make_ca(tmp_path / "rogue", "rogue-ca") if trouble == "another_ca" else broker.ca
        url = broker.broker.url.replace("mqtt://", "mqtts://") if trouble == "plaintext_port" else broker.tls_url
        d = daemon_factory(url, env=tls_env(ca, password_file)).start(wait_ready=False)
        wait_for(lambda: expected in d.log(), 30, f"'{expected}' in the log")
        assert "never falls back to plaintext" in d.log()
        assert d.health()[0] == 503
        # Publish over the good link: nothing may reach the daemon, and no session of ours was ever opened.
        if trouble != "wrong_host_name":
            ids, labels = ids_and_labels(5)
            publish_over_tls(broker, ids, labels)
        assert d.stop() == 0
        assert stored_ids(d.state) == []
        assert "as sprout-leaves" not in broker.log()
        assert PASSWORD not in d.log()
        # The error is logged once per reason, not on every retry.
        assert d.log().count(expected) == 1


def test_tls_files_with_a_plaintext_broker_are_a_config_error(tmp_path: Path):
    ca = make_ca(tmp_path, "ca")
    config = tmp_path / "sprout.toml"
    config.write_text(f'[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\ntls_ca_file = "{ca}"\n')
    out = subprocess.run([*SPROUT, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "mqtt" in out.stderr and "mqtts://" in out.stderr and "never falls back to plaintext" in out.stderr
    config.write_text('[mqtt]\nbroker = "mqtts://sprout:hunter2-secret@127.0.0.1:8883"\n')
    out = subprocess.run([*SPROUT, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "mqtt.broker" in out.stderr and "mqtt.password_file" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    config.write_text(f'[mqtt]\nbroker = "mqtts://127.0.0.1:8883"\ntls_ca_file = "{tmp_path / "missing.pem"}"\n')
    out = subprocess.run([*SPROUT, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "tls_ca_file" in out.stderr and "missing.pem" in out.stderr


def test_sprout_feed_verifies_the_broker_with_its_ca_file(tmp_path: Path):
    """`sprout feed --ca-file` publishes over TLS; a broker it cannot verify is exit 69 with the reason."""
    with TlsBroker(tmp_path) as broker:
        photos = tmp_path / "photos" / "healthy"
        photos.mkdir(parents=True)
        (photos / "a.jpg").write_bytes(jpeg(1))
        url = broker.tls_url.replace("mqtts://", "mqtts://phone:phone-pw@")
        base = [*SPROUT, "feed", "--broker", url, "--model", "leaves", "--dir", str(photos.parent)]
        ok = subprocess.run([*base, "--ca-file", str(broker.ca)], capture_output=True, text=True, timeout=60)
        # Nothing subscribes here, so the broker answers "no matching subscribers": proof that the
        # publish went through, over TLS, and was answered.
        assert ok.returncode == 1 and "nothing subscribes to sprout/leaves/examples" in ok.stderr, ok.stderr
        rogue = make_ca(tmp_path / "rogue", "rogue-ca")
        bad = subprocess.run([*base, "--ca-file", str(rogue)], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 69, bad.stderr
        assert "certificate verify failed" in bad.stderr.lower()
        assert "phone-pw" not in bad.stderr
