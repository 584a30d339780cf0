"""The settings sections of what goes out and how the service runs: export, registry, server, signing, logging.

Each part receives its own section (daemon/common/settings.py composes them into one object).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from daemon.common.learning_sections import Section
from edge.manifest import Quantization


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
    refusal_significance: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="A candidate past max_drop_pts or tolerance_pts is refused only when McNemar's exact test on "
        "the holdout images where it and the other model disagree gives at most this p-value: at most this share "
        "of candidates no worse than the other are refused for holdout noise (docs/quantization.md). Lower "
        "refuses fewer candidates for a few images' difference and lets more small real drops through on a small "
        "holdout; 1 refuses on the point figure alone.",
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
    full_conversion_every: int = Field(
        10,
        ge=1,
        le=1000,
        description="Every this many exports of a mode convert the whole network; the others, while the backbone "
        "is unchanged (head mode), write the new head into the last full conversion: well under a second instead "
        "of 15-60 s, the same numbers. A full conversion recalibrates int8's activation ranges on today's stored "
        "examples; 1 converts fully at every export.",
    )
    full_conversion_min_interval_s: float = Field(
        600.0,
        ge=0.0,
        le=604_800.0,
        description="Seconds a mode's full conversion serves patched exports at least, even past "
        "full_conversion_every: with exports seconds apart, a full conversion every 10 of them (35-40 s of "
        "EfficientNet-Lite0 int8 on 2 cores, no model published meanwhile) was 40% of the time. Lower recalibrates "
        "and cross-checks sooner; 0 counts exports alone.",
    )
    int8_bias_correction: bool = Field(
        True,
        description="Fit an int8 file's classifier to its int8 backbone: its bias corrected for the mean error "
        "that backbone makes on the embedding (~2-3 s per full conversion), then distilled on "
        "int8_distillation_examples (docs/quantization.md): int8 within 0.5-0.7 points of float instead of 1.4-3.8 "
        "in the benchmarks. false ships the classifier as converted.",
    )
    int8_distillation_examples: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Stored training examples an int8 file's classifier is distilled on: refitted to give, on "
        "the int8 backbone's embeddings, the float head's outputs (docs/quantization.md). More follow the float "
        "model more closely; each costs decoding and both backbones once per full conversion (~23 ms at 128 px "
        "on 2 cores; at every export in last_blocks and full modes), patched exports reuse them. Below 300 examples only the bias is corrected; 0: no "
        "distillation.",
    )
    prewarm_process: bool = Field(
        True,
        description="Keep an export process waiting between exports, its imports of torch and litert-torch "
        "(~5 s of CPU on 2 cores) done: the one that only wrote a new head stays for the next export, one that "
        "converted is replaced as soon as it ends. Each model ships that much sooner, for 0.5-1.0 GB held between "
        "exports (a fresh process; one that stayed, with its model). False starts a process when an export is due.",
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
    delta_from_versions: int = Field(
        3,
        ge=0,
        le=100,
        description="Earlier versions (the newest still on disk) each publish writes a download delta from, so a "
        "device holding one fetches kilobytes instead of the model; 0 = none. Each costs ~0.1 s of publish (a 4-7 "
        "MB model) and a file of ~1% of the model per version; devices further behind download the whole file.",
    )


class FieldSettings(Section):
    telemetry: bool = Field(
        True,
        description="Take devices' reports of how each model version does (counters only, opt-in on the device: "
        "docs/devices.md), on MQTT <prefix>/<model>/telemetry and POST /v1/models/<model>/telemetry. Off: the "
        "topic is not subscribed and the POST answers 404. Each report is a few hundred bytes in the store.",
    )
    low_confidence_below: float = Field(
        0.5,
        ge=0.1,
        le=1.0,
        description="Top-1 score under which a device's prediction counts as unsure, in the metrics and on the "
        "status page; a multiple of 0.1, as devices report scores by tenths. Higher flags more predictions.",
    )

    photos: bool = Field(
        True,
        description="Take photos devices send back for labelling (opt-in on the device: docs/devices.md): those the "
        "model was unsure of and those users corrected, on MQTT <prefix>/<model>/field-photos and POST "
        "/v1/models/<model>/field-photos. They wait in the labelling queue (`sprout label`, the status site's "
        "/label page) and are learned once someone labels them. Off: neither is taken.",
    )
    photos_per_device_per_day: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Photos one device may send back a UTC day; more are refused (photo_cap) and the device keeps "
        "them for the next day. Higher gathers more from few devices, and lets one device fill the queue.",
    )
    max_queued_photos: int = Field(
        2000,
        ge=1,
        description="Photos the labelling queue keeps waiting for an answer; past it the oldest are dropped. Each "
        "is up to max_photo_bytes in the store.",
    )
    max_photo_bytes: int = Field(
        1_000_000,
        ge=10_000,
        le=20_000_000,
        description="Largest photo a device may send back, in bytes; a device sends it at 640 pixels on the long "
        "side (about 100 kB), the learner needs no more than the model's input.",
    )

    drift_every_s: float = Field(
        300.0,
        gt=0,
        description="Seconds between two drift tests: the backbone's embeddings of the photos devices sent as "
        "random samples (kind 'sample') against stored training photos (daemon/learning/drift.py). Each costs "
        "a few hundred embeddings on the learner's thread (cached in head mode) and ~0.5 s of CPU.",
    )
    drift_window_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Only sample photos received this many seconds back count as the field now (at most the "
        "newest 256). Shorter follows a change sooner, on fewer photos.",
    )
    drift_min_photos: int = Field(
        30,
        ge=5,
        le=256,
        description="Sample photos in the window before drift is tested at all; fewer give tests too weak to read.",
    )
    drift_significance: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="p-value under which the field counts as drifted (status page, sprout_field_drifted). Lower "
        "flags only stronger evidence; at 0.01 about one test in a hundred flags an unchanged field.",
    )

    @field_validator("low_confidence_below")
    @classmethod
    def _tenths(cls, value: float) -> float:
        if abs(value * 10 - round(value * 10)) > 1e-6:
            raise ValueError("must be a multiple of 0.1: devices report top-1 scores by tenths")
        return round(value, 1)


class RolloutSettings(Section):
    stages: list[float] = Field(
        [],
        description="Staged rollout: the shares of devices (percent, ascending, the last 100) a new version reaches "
        "in turn, e.g. [5, 25, 100]; each device's place is a hash of its Sprout-Device id, so a device stays in its "
        "cohort. Empty (the default): every version goes to every device at once. The first version always goes "
        "to all. Devices without the header, and static mirrors, get the version every device has reached.",
    )

    auto: bool = Field(
        True,
        description="Judge each stage from the devices' reports (field.telemetry) and move on, or halt, by itself; "
        "off: only `sprout models rollout promote|halt` do.",
    )
    min_devices: int = Field(
        20,
        ge=1,
        description="Devices that reported on the new version before a stage is judged; more is surer, slower.",
    )
    min_predictions: int = Field(
        500,
        ge=1,
        description="Predictions devices reported with the new version (and with the one it replaces) before its "
        "scores and corrections are compared; load failures are judged from min_devices loads on.",
    )
    min_stage_s: float = Field(
        3600.0,
        ge=0.0,
        description="Seconds a version stays at a stage before it moves on, however good its figures: time for "
        "the slower devices and the rarer cases to show. Halting never waits.",
    )
    max_load_failure_share: float = Field(
        0.02, ge=0.0, le=1.0, description="Share of the new version's loads on devices that may fail (0.02 = 2%)."
    )
    max_confidence_drop: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="How far the new version's mean top-1 score on devices may fall below the replaced version's "
        "(0.05 = 5 points). Lower halts sooner, and more often for noise.",
    )
    max_correction_rise: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="How far the share of predictions users correct may rise above the replaced version's "
        "(0.02 = 2 points).",
    )
    check_every_s: float = Field(30.0, gt=0.0, description="Seconds between two looks at the figures.")

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[float]) -> list[float]:
        if not value:
            return value
        if any(not 0 < p <= 100 for p in value) or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("must be percentages above 0, ascending, e.g. [5, 25, 100]")
        if value[-1] != 100:
            raise ValueError("must end at 100: the last stage reaches every device")
        return value


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
