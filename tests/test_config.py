"""Configuration: file, environment and flags in that order; errors name the field; exit 78."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import SPROUT

from daemon.common.settings import ConfigError, Settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sprout.toml"
    path.write_text(text)
    return path


def test_defaults_serve_without_a_file():
    s = Settings.load(None)
    assert s.mqtt.broker == "mqtt://127.0.0.1:1883"
    assert s.model.name == "plant-disease"
    assert s.state_dir == Path.cwd() / "var"  # made absolute once, so no child process sees another folder
    assert s.client_id == "sprout-plant-disease"


def test_the_example_config_is_valid_and_equals_the_defaults():
    assert Settings.load(REPO / "sprout.example.toml") == Settings.load(None)


def test_precedence_file_then_environment_then_flags(tmp_path: Path, monkeypatch):
    path = write(tmp_path, '[model]\nname = "from-file"\n[store]\nholdout_fraction = 0.3\n[mqtt]\nkeepalive_s = 40\n')
    monkeypatch.setenv("SPROUT_MODEL__NAME", "from-env")
    monkeypatch.setenv("SPROUT_MQTT__KEEPALIVE_S", "50")
    s = Settings.load(path, {"model": {"name": "from-flag"}})
    assert s.model.name == "from-flag"
    assert s.mqtt.keepalive_s == 50
    assert s.store.holdout_fraction == 0.3


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[store]\nholdout_fraction = 1.5\n", "store.holdout_fraction"),
        ('[mqtt]\nbroker = "http://x"\n', "mqtt.broker"),
        ('[mqtt]\nbrokr = "mqtt://x:1"\n', "mqtt.brokr"),
        ('[model]\nname = "a/b"\n', "model.name"),
        ('[server]\nhttp = "localhost"\n', "server.http"),
        ('[mqtt]\ntls_cert_file = "/x.pem"\n', "mqtt"),
        ('[logging]\nlevel = "LOUD"\n', "logging.level"),
    ],
)
def test_bad_values_name_their_field(tmp_path: Path, text: str, field: str):
    with pytest.raises(ConfigError) as err:
        Settings.load(write(tmp_path, text))
    assert f"sprout.toml: {field}:" in str(err.value)


def test_check_config_masks_secrets(tmp_path: Path):
    path = write(tmp_path, '[mqtt]\nusername = "agronomist"\npassword = "hunter2-secret"\n')
    out = subprocess.run([*SPROUT, "check-config", str(path)], capture_output=True, text=True, check=True)
    resolved = json.loads(out.stdout)
    assert resolved["mqtt"]["username"] == "agronomist"
    assert resolved["mqtt"]["password"] == "**********"
    assert "hunter2" not in out.stdout + out.stderr


def test_bad_password_is_never_echoed(tmp_path: Path):
    path = write(tmp_path, '[mqtt]\npassword = ["hunter2-secret"]\n')
    out = subprocess.run([*SPROUT, "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 78
    assert "mqtt.password" in out.stderr
    assert "hunter2" not in out.stderr


def test_a_check_across_fields_never_echoes_the_section_and_its_password(tmp_path: Path):
    # The check gets the whole [mqtt] table: echoing it as "(got {...})" would print the password.
    secret = tmp_path / "secret"
    secret.write_text("other\n")
    path = write(tmp_path, f'[mqtt]\npassword = "hunter2-secret"\npassword_file = "{secret}"\n')
    out = subprocess.run([*SPROUT, "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 78
    assert "mqtt: set password or password_file, not both" in out.stderr
    assert "hunter2" not in out.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[store]\ncommit_max_examples = 0\n", "store.commit_max_examples"),
        ("[store\n", "not valid TOML"),
    ],
)
def test_run_exits_78_naming_the_problem(tmp_path: Path, text: str, needle: str):
    path = write(tmp_path, text)
    out = subprocess.run(
        [*SPROUT, "run", "--config", str(path), "--state", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78, out
    assert needle in out.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything


def test_bad_flag_and_bad_environment_also_exit_78(tmp_path: Path):
    out = subprocess.run([*SPROUT, "run", "--broker", "tcp://nowhere"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "mqtt.broker" in out.stderr
    env = {"SPROUT_STORE__MAX_IMAGE_BYTES": "ten", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*SPROUT, "run"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 78 and "store.max_image_bytes" in out.stderr


def test_missing_config_file_exits_78(tmp_path: Path):
    out = subprocess.run(
        [*SPROUT, "run", "--config", str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 78
    assert "no such config file" in out.stderr


def test_weights_that_do_not_fit_the_backbone_exit_78(tmp_path: Path):
    import torch

    weights = tmp_path / "mine.pt"
    torch.save({"backbone": "mobilenet_v2", "state_dict": {}}, weights)
    out = subprocess.run(
        [*SPROUT, "run", "--state", str(tmp_path / "state"), "--broker", "mqtt://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "SPROUT_MODEL__BACKBONE": "tiny", "SPROUT_MODEL__WEIGHTS_FILE": str(weights)},
    )
    assert out.returncode == 78, out.stderr[-1500:]
    assert "model / training" in out.stderr


def test_an_ingest_only_node_never_imports_torch():
    code = "import sys, daemon.cli, daemon.service.daemon, daemon.ingest.feed, daemon.ingest.intake; print('torch' in sys.modules)"
    out = subprocess.run([*SPROUT[:1], "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_a_target_runtime_that_is_not_installed_exits_78(tmp_path: Path):
    out = subprocess.run(
        [*SPROUT, "run", "--state", str(tmp_path / "state"), "--broker", "mqtt://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "SPROUT_MODEL__BACKBONE": "tiny",
            "SPROUT_EXPORT__TFLITE_RUNTIME_PYTHON": str(tmp_path / "no-venv" / "bin" / "python"),
        },
    )
    assert out.returncode == 78, out.stderr[-1500:]
    assert "export.runtimes: tflite-runtime needs" in out.stderr and "scripts/setup.sh" in out.stderr


def test_a_list_from_the_environment_that_is_not_json_exits_78_naming_it():
    env = {"SPROUT_EXPORT__RUNTIMES": "ai-edge-litert", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [*SPROUT, "check-config", str(REPO / "sprout.example.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 78, out.stderr
    assert "SPROUT_EXPORT__RUNTIMES (field export.runtimes) is not JSON: 'ai-edge-litert'" in out.stderr
    assert "take JSON" in out.stderr


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ({"SPROUT_SERVER__TOKEN_FILE": "{tmp}/no-token"}, "server.token_file: cannot read"),
        (
            {"SPROUT_SERVER__TLS_CERT_FILE": "{tmp}/no-cert.pem", "SPROUT_SERVER__TLS_KEY_FILE": "{tmp}/no-key.pem"},
            "server.tls_cert_file: cannot read",
        ),
        ({"SPROUT_MODEL__WEIGHTS_FILE": "{tmp}/no-weights.pt"}, "model.weights_file: cannot read"),
        ({"SPROUT_SIGNING__KEY_FILE": "{tmp}/open.key"}, "signing.key_file:"),
        ({"SPROUT_EXPORT__TFLITE_RUNTIME_PYTHON": "{tmp}/no-venv/bin/python"}, "export.runtimes: tflite-runtime needs"),
    ],
)
def test_check_config_refuses_what_run_refuses(tmp_path: Path, setting: dict[str, str], needle: str):
    from daemon.registry.signing import generate

    generate(tmp_path)
    (tmp_path / "signing.key").rename(tmp_path / "open.key")
    (tmp_path / "open.key").chmod(0o644)  # a signing key others can read
    env = {
        "PATH": "/usr/bin:/bin",
        "SPROUT_MODEL__BACKBONE": "tiny",
        **{k: v.format(tmp=tmp_path) for k, v in setting.items()},
    }
    checked = subprocess.run(
        [*SPROUT, "check-config", str(REPO / "sprout.example.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    ran = subprocess.run(
        [*SPROUT, "run", "--state", str(tmp_path / "state"), "--broker", "mqtt://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (checked.returncode, ran.returncode) == (78, 78), (checked.stderr[-800:], ran.stderr[-800:])
    assert needle in checked.stderr and needle in ran.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything
