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
import json
import os
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from daemon.common.learning_sections import ModelSettings, MqttSettings, Section, StoreSettings, TrainingSettings
from daemon.common.serving_sections import (
    ExportSettings,
    FieldSettings,
    LoggingSettings,
    RegistrySettings,
    RolloutSettings,
    ServerSettings,
    SigningSettings,
)

__all__ = [
    "ConfigError",
    "ExportSettings",
    "FieldSettings",
    "LoggingSettings",
    "ModelSettings",
    "MqttSettings",
    "RegistrySettings",
    "RolloutSettings",
    "ServerSettings",
    "Settings",
    "SigningSettings",
    "StoreSettings",
    "TrainingSettings",
]


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
    role: Literal["all", "intake", "trainer", "exporter"] = Field(
        "all",
        description="'all': intake, learner, exporter and server in one process (the default). 'intake': only the "
        "feed and intake, committing to the shared store (store.url) as one member of the MQTT shared subscription "
        "mqtt.share_group; add members to take more examples a second. 'trainer': one rank of a data-parallel "
        "trainer group started by torchrun, learning from the store and checkpointing into state_dir (rank 0), "
        "no feed and no exporter. 'exporter': a candidate to export and publish the checkpoint in state_dir, "
        "serving downloads and the MQTT notice; one candidate at a time is elected (docs/scale.md).",
    )
    mqtt: MqttSettings = MqttSettings()
    store: StoreSettings = StoreSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    export: ExportSettings = ExportSettings()
    registry: RegistrySettings = RegistrySettings()
    rollout: RolloutSettings = RolloutSettings()
    server: ServerSettings = ServerSettings()
    signing: SigningSettings = SigningSettings()
    field: FieldSettings = FieldSettings()
    logging: LoggingSettings = LoggingSettings()

    # Where this object came from (file, CLI overrides), so that a reload (SIGHUP) reads the same.
    _source: tuple[Path | None, dict[str, Any]] = PrivateAttr(default=(None, {}))

    @model_validator(mode="after")
    def _intake_member(self) -> Settings:
        if self.role != "intake":
            return self
        if not self.store.url:
            raise ValueError(
                "role = 'intake' commits to a store that the learning node reads: set store.url to a PostgreSQL "
                "database (docs/scale.md)"
            )
        if not self.mqtt.share_group:  # members of one group share the feed; without one each gets all of it
            self.mqtt = self.mqtt.model_copy(update={"share_group": "sprout-intake"})
        # No torch in a member: what a learner, an exporter and their checks would load is left out.
        self.training = self.training.model_copy(update={"enabled": False})
        return self

    @model_validator(mode="after")
    def _one_job(self) -> Settings:
        if self.role == "trainer":  # it learns, and leaves exporting to the exporter
            self.training = self.training.model_copy(update={"enabled": True})
            self.export = self.export.model_copy(update={"enabled": False})
        elif self.role == "exporter":  # it exports what the trainers checkpoint, learning nothing itself
            self.training = self.training.model_copy(update={"enabled": False})
            self.export = self.export.model_copy(update={"enabled": True})
        return self

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
        if self.mqtt.client_id:
            return self.mqtt.client_id
        if self.role == "exporter":  # publishes the notice only; one session per candidate
            return f"sprout-{self.model.name}-exporter-{socket.gethostname()}"
        if self.role == "intake":
            # Stable across this host's restarts (the broker keeps the member's session and its un-acked
            # examples for it) and apart from every other host's member; two members on one host set their own.
            return f"sprout-{self.model.name}-intake-{socket.gethostname()}"
        return f"sprout-{self.model.name}"

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
        # Never echo what may be a secret: a password field, a URL with credentials in it, or a whole section
        # (a check across fields gets the section's table, which may hold its password).
        scalar = isinstance(e["input"], str | int | float | bool)
        secret = "password" in field or "token" in field or (isinstance(e["input"], str) and "@" in e["input"])
        shown = "" if secret or not scalar or e["type"] == "missing" else f" (got {e['input']!r})"
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
