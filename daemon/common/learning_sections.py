"""The settings sections of what comes in and how it is learned: the MQTT feed, the store, the model, training.

Each part receives its own section (daemon/common/settings.py composes them into one object).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_port(parts: SplitResult) -> None:
    try:
        _ = parts.port  # reading it is the check: the property raises for a bad port
    except ValueError as err:
        raise ValueError(f"bad port: {err}") from None


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
        _check_port(parts)
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

    def telemetry_topic(self, model: str) -> str:
        return f"{self.topic_prefix}/{model}/telemetry"

    def field_photos_topic(self, model: str) -> str:
        return f"{self.topic_prefix}/{model}/field-photos"

    def subscription(self, model: str, topic: str | None = None) -> str:
        """The filter to subscribe to ``topic`` (the examples topic by default) with: in mqtt.share_group's
        shared subscription where there is one."""
        topic = topic or self.examples_topic(model)
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic


class StoreSettings(Section):
    url: str = Field(
        "",
        description="Where the examples live: empty = the SQLite file <state_dir>/examples.db (one machine); "
        "postgresql://user@host:port/database = a PostgreSQL database that several intake processes write and "
        "several machines read (docs/scale.md). No password in the URL: store.password_file, or PGPASSWORD / "
        "~/.pgpass.",
    )
    password_file: Path | None = Field(
        None, description="File whose first line is the PostgreSQL password of store.url's user."
    )
    blob_dir: Path | None = Field(
        None,
        description="Folder the photos are written to, one file each, instead of the store's database; empty = in "
        "the database (the default: one place to back up; PostgreSQL holds up to 1 GB a photo, but every byte of "
        "it passes through the server and its backups). A shared folder (NFS, a cluster file system) mounted at "
        "the same path on every machine that reads the store. Costs an fsync per photo at intake. Keep it set "
        "while photos remain there: rows written with it name its files.",
    )
    migrate_on_start: bool = Field(
        True,
        description="Apply the store's pending schema migrations when the daemon starts (PostgreSQL: under a lock, "
        "so nodes may start together). Off = `sprout store migrate` applies them, and a daemon finding one "
        "pending exits 78.",
    )
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
        "Larger remembers more for replay, costs disk. An empty SQLite store takes ~1.3 MB of it (a 64 KiB page "
        "per table and index), and the labelling queue's photos count (field.max_queued_photos).",
    )

    @field_validator("url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise ValueError(
                "must be empty (the SQLite file in state_dir) or look like postgresql://user@host:port/database"
            )
        if parts.password is not None:
            # The URL is logged and shown by check-config; the password has its own field.
            raise ValueError("put the password in store.password_file (or PGPASSWORD, ~/.pgpass), not in the URL")
        _check_port(parts)
        return value

    @field_validator("blob_dir", mode="before")
    @classmethod
    def _blob_dir(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value  # "" (an unset variable): in the rows

    @model_validator(mode="after")
    def _password_file(self) -> StoreSettings:
        if self.password_file is not None:
            if not self.url:
                raise ValueError("password_file is for a PostgreSQL store: set store.url too, or remove it")
            if not self.password_file.is_file():
                raise ValueError(f"password_file {self.password_file} is not a readable file")
        return self


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
