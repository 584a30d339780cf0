"""Sprout's configuration: one TOML file, one validated settings object.

Precedence, highest first: command-line flags, ``SPROUT_<SECTION>__<FIELD>``
environment variables, the TOML file, the defaults below. Each module receives
only its own section. Every field states its unit and its trade-off; the
example file ``sprout.example.toml`` repeats them for operators.

>>> s = Settings.load(None, overrides={"model": {"name": "maize"}})
>>> s.model.name, s.mqtt.examples_topic(s.model.name)
('maize', 'sprout/maize/examples')
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from edge.manifest import Quantization

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Section(BaseModel):
    # A typo in a key must be an error naming the key, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MqttSettings(Section):
    broker: str = Field("mqtt://127.0.0.1:1883", description="Broker URL, mqtt://host:port or mqtts://host:port (TLS).")
    client_id: str = Field(
        "",
        description="Stable MQTT client id; empty = 'sprout-<model>'. It names the broker-side session that "
        "keeps un-acked examples while Sprout is down, so it must not change between restarts.",
    )
    topic_prefix: str = Field(
        "sprout", description="Topics are <prefix>/<model>/examples, .../rejected, .../models/latest."
    )
    share_group: str = Field(
        "",
        description="Shared-subscription group; empty = plain subscription. Set it to run several Sprouts on one feed.",
    )
    session_expiry_s: int = Field(
        86_400, ge=0, description="Seconds the broker keeps the session (and queued examples) while Sprout is down."
    )
    keepalive_s: int = Field(
        30, ge=5, le=65_535, description="Seconds between pings; lower notices a dead link sooner."
    )
    receive_maximum: int = Field(
        1_000,
        ge=1,
        le=65_535,
        description="Un-acked examples the broker may send at once. Higher lets more share one commit (faster); "
        "lower means fewer redeliveries after a crash.",
    )
    reconnect_min_s: float = Field(
        1.0, gt=0, description="First reconnect delay in seconds; doubles up to reconnect_max_s."
    )
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay in seconds.")
    username: str = Field("", description="Broker user; empty = anonymous.")
    password: SecretStr | None = Field(None, description="Broker password; prefer password_file or the environment.")
    password_file: Path | None = Field(None, description="File whose first line is the broker password.")
    tls_ca_file: Path | None = Field(
        None, description="CA bundle to verify the broker with mqtts://; empty = system CAs."
    )
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for brokers that require one.")
    tls_key_file: Path | None = Field(None, description="Key of tls_cert_file (PEM).")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        if parts.username is not None or parts.password is not None:
            # The broker URL is logged and shown by check-config; credentials have their own fields.
            raise ValueError("put the user in mqtt.username and the password in mqtt.password_file, not in the URL")
        try:
            _ = parts.port  # reading it is the check: the property raises for a bad port
        except ValueError as err:
            raise ValueError(f"bad port: {err}") from None
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a non-empty topic path without wildcards or leading/trailing '/'")
        return value

    @field_validator("share_group")
    @classmethod
    def _group(cls, value: str) -> str:
        if value and not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64)")
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> MqttSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        tls_files = {
            name: getattr(self, name)
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file")
            if getattr(self, name)
        }
        if tls_files and not self.tls:
            # Refuse rather than run plaintext: whoever set a CA meant the link to be encrypted and verified.
            raise ValueError(
                f"{', '.join(tls_files)} set but broker is {self.broker} (plaintext): use mqtts://host:port, "
                "Sprout never falls back to plaintext"
            )
        for name, path in {**tls_files, "password_file": self.password_file}.items():
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts"

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().splitlines()[0] if self.password_file.stat().st_size else ""
        return None

    def examples_topic(self, model: str) -> str:
        return f"{self.topic_prefix}/{model}/examples"

    def rejected_topic(self, model: str) -> str:
        return f"{self.topic_prefix}/{model}/rejected"

    def notice_topic(self, model: str) -> str:
        return f"{self.topic_prefix}/{model}/models/latest"

    def subscription(self, model: str) -> str:
        topic = self.examples_topic(model)
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic


class StoreSettings(Section):
    holdout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of examples without a 'split' kept out of training for the export gates.",
    )
    max_image_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest accepted image, in bytes of the encoded file (16 MiB: a 24 MP phone JPEG is 6-12 MB). "
        "Messages are held whole in memory until committed, up to mqtt.receive_maximum at once, and every "
        "accepted byte is stored: lower it to bound both when senders can resize.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=64,
        description="Largest accepted width*height; checked from the header before any decoding (decompression bombs). "
        "JPEGs decode at a reduced scale, so this bounds their file size, not the daemon's memory.",
    )
    max_full_decode_pixels: int = Field(
        16_777_216,
        ge=64,
        description="Largest accepted width*height for PNG, WebP and HEIC, which decode at full size (3 bytes a pixel "
        "while decoding: 16 MP = 48 MB); higher admits larger photos in them, at that much memory per image.",
    )
    max_label_chars: int = Field(128, ge=1, le=4096, description="Longest accepted class name, in characters.")
    commit_max_examples: int = Field(
        512, ge=1, description="Most examples in one transaction; larger amortises the fsync, smaller acks sooner."
    )
    commit_linger_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description="Milliseconds to wait for more examples before a commit; adds that much latency.",
    )
    backlog_max: int = Field(
        20_000,
        ge=1,
        description="Examples received but not yet committed; past it the network thread waits (backpressure).",
    )
    backlog_max_mb: int = Field(
        512,
        ge=1,
        description="Megabytes of received images held in memory until committed; past it the network thread "
        "waits and the broker holds the rest. Bounds the daemon's memory under a burst of phone photos "
        "(mqtt.receive_maximum of them at 10 MB would be 10 GB); lower shares fewer commits among large images.",
    )
    min_free_mb: int = Field(
        256,
        ge=0,
        description="Free space (MB) the state directory keeps: below it plus a commit's size, intake stops committing "
        "and acking (the broker holds the examples) until space returns. Higher leaves more room for checkpoints "
        "and exports, lower uses more of the disk.",
    )
    max_mb: int = Field(
        10_240,
        ge=1,
        description="Largest example store in MB; past it the oldest 'train' examples are deleted (holdout last). "
        "Larger remembers more for replay, costs disk.",
    )


class ModelSettings(Section):
    name: str = Field("plant-disease", description="Model name: part of every topic, path and manifest.")
    backbone: Literal["efficientnet_lite0", "mobilenet_v2", "tiny"] = Field(
        "efficientnet_lite0", description="Pretrained network to fine-tune; 'tiny' is an untrained test network."
    )
    weights_file: Path | None = Field(
        None,
        description="Your own pretrained backbone weights (a torch state_dict); unset = the shipped ImageNet weights.",
    )
    input_size: int = Field(
        128,
        ge=16,
        le=1024,
        description="Square input side in pixels. The CPU's main lever: 224 is the weights' own size and most "
        "accurate, 128 runs ~8x faster per image. Part of the exported model's contract.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-', starting with a letter or digit (at most 64)")
        return value


class TrainingSettings(Section):
    enabled: bool = Field(True, description="Learn from the store; off = ingest and store only (no torch loaded).")
    mode: Literal["auto", "head", "last_blocks", "full"] = Field(
        "auto",
        description="'head': backbone frozen, embeddings computed once per example (fast on CPU); 'last_blocks' / "
        "'full': the backbone fine-tunes too (better, needs a GPU for speed). 'auto' = head on CPU, full on CUDA.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present.")
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, when the backbone trains (last_blocks, full), capture each step as a CUDA graph: "
        "several times the images/s of eager steps at small batches; each new class costs one re-capture "
        "(a few warm-up steps). Off = eager steps, for debugging.",
    )
    compile_backbone: bool = Field(
        False,
        description="On CUDA, with cuda_graphs, run the backbone through torch.compile (Inductor's default mode: "
        "fused element-wise kernels, no autotuning) inside the captured step. The first step waits for the "
        "compilation (once per process; a new class does not compile again). Off until bench/gpu.py has measured "
        "it on a GPU (docs/gpu.md).",
    )
    decode_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Processes decoding images for the learner; 0 decodes in the learner's thread. 'auto' = 0 on "
        "a CPU (the backbone, not decoding, is the limit) and every core but two (at most 16) on CUDA, where one "
        "core's decoding (~600 images/s) would cap the GPU. Each worker is a process of ~60 MB.",
    )
    batch_size: int = Field(
        32, ge=1, le=1024, description="New examples per step; smaller learns sooner, larger is faster."
    )
    replay_ratio: float = Field(
        4.0,
        ge=0.0,
        le=16.0,
        description="Replayed stored examples per new example in a step (class-balanced); 0 = naive fine-tuning, "
        "which forgets old classes.",
    )
    balance_classes: bool = Field(
        True,
        description="Weigh every class in a step equally; against the drift towards the newest classes on "
        "class-incremental streams. Off = plain cross-entropy.",
    )
    learning_rate: float = Field(3e-3, gt=0, le=1.0, description="AdamW learning rate of the head (backbone: a tenth).")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW weight decay.")
    last_blocks: int = Field(
        2, ge=1, le=64, description="Backbone stages trained in 'last_blocks' mode, from the output end."
    )
    cpu_threads: int = Field(
        1, ge=1, le=256, description="torch threads on CPU; leave a core to ingestion on small machines."
    )
    holdout_every_steps: int = Field(
        50, ge=1, description="Steps between holdout evaluations; lower gives fresher curves, costs evaluation time."
    )
    holdout_max_examples: int = Field(
        2000, ge=10, description="Most holdout examples per evaluation (the most recent ones)."
    )
    checkpoint_every_s: float = Field(
        30.0, gt=0, description="Seconds between checkpoints; a crash re-trains at most this much."
    )
    divergence_restore_after_steps: int = Field(
        3,
        ge=1,
        le=1000,
        description="Consecutive steps with a non-finite loss (each one skipped) after which the learner goes back "
        "to the last checkpoint; lower recovers sooner from a diverged model, higher rides out more bad batches "
        "before discarding what was learned since the checkpoint. Non-finite weights restore at once.",
    )
    seed: int = Field(
        0, description="Seed for replay sampling and initialisation; the same seed and stream give the same model."
    )


class ExportSettings(Section):
    enabled: bool = Field(
        True, description="Export and publish models while learning; off = only `sprout export` does."
    )
    every_examples: int = Field(
        2000,
        ge=1,
        description="Newly learned examples that trigger an export; lower is fresher, each export costs CPU.",
    )
    every_seconds: float = Field(
        600.0, gt=0, description="Seconds after which anything newly learned is exported even below every_examples."
    )
    first_model_examples: int = Field(
        200,
        ge=1,
        description="Until this model has a published version, an export is tried every this many newly learned "
        "examples (and after every_seconds), and the gates decide whether it ships: a new daemon publishes its first "
        "model once it knows enough for them to judge one. Lower tries sooner, each refused try costs an export's CPU.",
    )
    max_drop_pts: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Most holdout top-1 points the .tflite may lose against the float model; lower ships only "
        "faithful conversions, higher tolerates lossier quantisation.",
    )
    tolerance_pts: float = Field(
        0.5,
        ge=0.0,
        le=100.0,
        description="Most holdout top-1 points a new version may fall below the published one (holdout noise); "
        "0 ships only improvements.",
    )
    quantization: list[Quantization] = Field(
        [Quantization.INT8, Quantization.FP16],
        min_length=1,
        description="Modes to try, in order; the first whose candidate passes every gate is published. int8: "
        "full-integer, uint8 input, ~30% of float's size, fastest on ai-edge-litert, calibrated on stored "
        "examples; dynamic: int8 weights, float activations, ai-edge-litert only; fp16: half-size float weights, "
        "float accuracy; none: float32. Each failed mode costs one more conversion.",
    )
    skip_lossy_mode_for: int = Field(
        3,
        ge=0,
        le=1000,
        description="Exports to skip a mode for after its candidate lost more than max_drop_pts against float "
        "(quantisation loss persists from one export to the next); never the last mode. 0 tries every mode at "
        "every export; each skip saves that mode's conversion and verification (half of an export when int8 "
        "is refused), at the cost of shipping the next mode a little longer once the lossy one would pass.",
    )
    prewarm_process: bool = Field(
        True,
        description="Start the next export's process as soon as an export ends, so that it has imported torch "
        "and litert-torch (~5 s of CPU on 2 cores) before it is due: each model ships that much sooner, for "
        "~0.5 GB held between exports. False starts it when the export is due.",
    )
    runtimes: list[Literal["ai-edge-litert", "tflite-runtime"]] = Field(
        ["ai-edge-litert", "tflite-runtime"],
        min_length=1,
        description="Interpreters every candidate must load and pass the gates on before it ships: the ones your "
        "devices run. Each adds a verification run to every export.",
    )
    tflite_runtime_python: Path | None = Field(
        None,
        description="Python of the virtualenv holding tflite-runtime 2.14 (it needs numpy<2); empty = "
        "<this venv>-tflite/bin/python, which scripts/setup.sh creates.",
    )
    calibration_examples: int = Field(
        100,
        ge=8,
        le=10_000,
        description="Stored training examples (class-balanced) an int8 export calibrates on; more gives steadier "
        "activation ranges, each costs ~30 ms of export time at 128 px.",
    )
    verify_examples: int = Field(
        400,
        ge=10,
        le=100_000,
        description="Most recent holdout examples each runtime scores a candidate on; more makes the gates less "
        "noisy, each costs up to ~30 ms on tflite-runtime (int8, 128 px).",
    )
    verify_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a runtime may take to verify a candidate before it counts as failed."
    )

    @field_validator("quantization", mode="before")
    @classmethod
    def _one_mode(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # quantization = "int8" means just that mode

    @field_validator("quantization", "runtimes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("name each one once")
        return value


class RegistrySettings(Section):
    keep_versions: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Published versions kept on disk, beyond which the oldest are deleted (never the latest or a "
        "pinned one). More allows rollbacks further back, at one model file of disk each.",
    )


class ServerSettings(Section):
    http: str = Field(
        "127.0.0.1:8080",
        description="HOST:PORT for the HTTP API; 0.0.0.0 serves every interface, port 0 picks a free one.",
    )
    admin_http: str = Field(
        "127.0.0.1:8081",
        description="HOST:PORT for the operator's pages (/ status, /metrics, /healthz) when `http` is not a "
        "loopback address: phones reach the model API on `http` and never see class names, metrics or health. "
        "While `http` is loopback (the default) both are served there and this is unused.",
    )
    enabled: bool = Field(True, description="Serve HTTP at all; off for a pure ingest node.")
    token: SecretStr | None = Field(
        None, description="Bearer token every /v1 download must carry; unset = downloads are open. Prefer token_file."
    )
    token_file: Path | None = Field(None, description="File whose first line is the bearer token.")
    tls_cert_file: Path | None = Field(
        None, description="Certificate chain (PEM) to serve HTTPS with; unset = plain HTTP (put a TLS proxy in front)."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client may take to send a request's head and body before the connection is closed; "
        "lower frees slow-loris connections sooner, higher tolerates slower links.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        return self

    def resolved_token(self) -> str | None:
        if self.token is not None:
            return self.token.get_secret_value() or None
        if self.token_file is not None:
            lines = self.token_file.read_text().splitlines()
            return lines[0].strip() or None if lines else None
        return None

    @field_validator("http", "admin_http")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @property
    def host(self) -> str:
        return self.http.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.http.rpartition(":")[2])

    @property
    def admin_host(self) -> str:
        return self.admin_http.rpartition(":")[0].strip("[]")

    @property
    def admin_port(self) -> int:
        return int(self.admin_http.rpartition(":")[2])

    @property
    def admin_apart(self) -> bool:
        """Whether the operator's pages get their own listener: `http` is reachable from other machines."""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"  # a host name: assume it faces the network


class SigningSettings(Section):
    key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PKCS8 PEM, mode 0600) that signs every manifest; unset = "
        "<state_dir>/signing/signing.key, created on first use. A key outside state_dir survives wiping it; "
        "a new key means every device needs the new public key.",
    )

    def resolved_key_file(self, state_dir: Path) -> Path:
        return self.key_file if self.key_file is not None else Path(state_dir) / "signing" / "signing.key"


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least severe level written.")
    format: Literal["text", "json"] = Field(
        "text",
        description="'text' for terminals and journald (no timestamp of its own under systemd), 'json' lines for collectors.",
    )
    progress_every_s: float = Field(10.0, gt=0, description="Seconds between progress lines; lower is chattier.")


class Settings(BaseSettings):
    """The whole configuration. Build it with :meth:`Settings.load`."""

    model_config = SettingsConfigDict(
        env_prefix="SPROUT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        nested_model_default_partial_update=True,
    )

    state_dir: Path = Field(Path("./var"), description="Examples, checkpoints and the model registry live here.")
    mqtt: MqttSettings = MqttSettings()
    store: StoreSettings = StoreSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    export: ExportSettings = ExportSettings()
    registry: RegistrySettings = RegistrySettings()
    server: ServerSettings = ServerSettings()
    signing: SigningSettings = SigningSettings()
    logging: LoggingSettings = LoggingSettings()

    # Where this object came from (file, CLI overrides), so that a reload (SIGHUP) reads the same.
    _source: tuple[Path | None, dict[str, Any]] = PrivateAttr(default=(None, {}))

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Every path is made absolute once, against the working directory the settings were loaded in:
        # the export process runs in a folder of its own, and a relative ./var there is another folder.
        self.state_dir = _absolute(self.state_dir)
        for name in type(self).model_fields:
            section = getattr(self, name)
            if not isinstance(section, Section):
                continue
            paths = {
                field: _absolute(value)
                for field in type(section).model_fields
                if isinstance(value := getattr(section, field), Path)
            }
            if paths:  # a copy: a section may be the class's shared default
                setattr(self, name, section.model_copy(update=paths))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init kwargs), the environment, the TOML file (see load).
        return init_settings, env_settings, _FileSource(settings_cls)

    @classmethod
    def load(cls, path: Path | str | None, overrides: dict[str, Any] | None = None) -> Settings:
        """Read ``path`` (None = defaults only), apply the environment, then ``overrides`` (CLI flags).

        Raises :class:`ConfigError` naming the file, or the field path, and what is wrong.
        """
        token = _file_data.set(read_toml(Path(path)) if path is not None else {})
        try:
            settings = cls(**(overrides or {}))
            settings._source = (_absolute(Path(path)) if path is not None else None, copy.deepcopy(overrides or {}))
            return settings
        except ValidationError as err:
            raise ConfigError(describe(err, path)) from None
        except SettingsError as err:
            # A list or table field set from the environment must be JSON: say which variable and how.
            raise ConfigError(
                f"{_not_json(cls) or err}: list and table fields take JSON in the environment, "
                f"e.g. SPROUT_EXPORT__RUNTIMES='[\"ai-edge-litert\"]'"
            ) from None
        finally:
            _file_data.reset(token)

    def reread(self) -> Settings:
        """A fresh object from the same file, environment and overrides (the file may have changed).

        Raises :class:`ConfigError` like :meth:`load`.
        """
        path, overrides = self._source
        return type(self).load(path, overrides)

    @property
    def config_file(self) -> Path | None:
        return self._source[0]

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal values, wherever they were read from (pydantic also compares _source).
        if not isinstance(other, Settings):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in type(self).model_fields)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"sprout-{self.model.name}"

    def masked(self) -> dict[str, Any]:
        """The resolved configuration as plain data, secrets shown as '**********'."""
        return _mask(self.model_dump(mode="json"), self)


def _absolute(path: Path) -> Path:
    """``path`` from the current working directory, ``~`` expanded; not resolved, so symlinks stay as named."""
    return Path(os.path.abspath(path.expanduser()))


def _not_json(settings: type[BaseModel]) -> str:
    """The SPROUT_<SECTION>__<FIELD> variables of list or table fields whose value is not JSON."""
    bad = []
    for name, value in os.environ.items():
        section, _, key = name.removeprefix("SPROUT_").lower().partition("__")
        if not name.startswith("SPROUT_") or section not in settings.model_fields:
            continue
        model = settings.model_fields[section].annotation
        field = getattr(model, "model_fields", {}).get(key)
        if field is None or getattr(field.annotation, "__origin__", None) not in (list, dict):
            continue
        try:
            json.loads(value)
        except ValueError:
            bad.append(f"{name} (field {section}.{key}) is not JSON: {value!r}")
    return "; ".join(bad)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field and the problem."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (create it from sprout.example.toml)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None


def describe(err: ValidationError, path: Path | str | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling against sprout.example.toml)"
        # Never echo what may be a secret: a password field, or a URL with credentials in it.
        secret = "password" in field or "token" in field or (isinstance(e["input"], str) and "@" in e["input"])
        shown = "" if secret or e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"{where}{field}: {msg}{shown}")
    return "\n".join(lines)


_file_data: ContextVar[dict[str, Any]] = ContextVar("sprout_config_file")


class _FileSource(PydanticBaseSettingsSource):
    """The parsed TOML file of the current :meth:`Settings.load` call."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_data.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return _file_data.get({})


def _mask(data: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    for name, value in data.items():
        attr = getattr(model, name, None)
        if isinstance(attr, SecretStr):
            data[name] = "**********"
        elif isinstance(attr, BaseModel) and isinstance(value, dict):
            _mask(value, attr)
    return data
