"""The flags that every command reading a model's state shares, and the settings they give."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon.common.settings import Settings

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def config_flags(sp: argparse.ArgumentParser, long_running: bool = False) -> None:
    # Every command that reads a model's state takes the same three, and reads the same settings as `run`.
    sp.add_argument(
        "--config", type=Path, help="TOML config file (see sprout.example.toml); default: built-in defaults"
    )
    sp.add_argument("--state", type=Path, help="state directory (overrides state_dir; default ./var)")
    sp.add_argument(
        "--model",
        help="model name (overrides model.name; default plant-disease); a state folder "
        "that holds another model is refused",
    )
    if long_running:
        sp.add_argument("--log-level", choices=LOG_LEVELS, help="overrides logging.level (default INFO)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags give, nested as in the config file."""
    out: dict[str, Any] = {}
    if getattr(args, "broker", None):
        out.setdefault("mqtt", {})["broker"] = args.broker
    if getattr(args, "model", None):
        out.setdefault("model", {})["name"] = args.model
    if getattr(args, "state", None):
        out["state_dir"] = args.state
    if getattr(args, "http", None):
        out.setdefault("server", {})["http"] = args.http
    if getattr(args, "role", None):
        out["role"] = args.role
    if getattr(args, "log_level", None):
        out.setdefault("logging", {})["level"] = args.log_level
    return out


def load_settings(args: argparse.Namespace) -> Settings:
    """The settings, from defaults, the --config file, SPROUT_* variables and the flags (later wins); a
    state folder that belongs to another model is refused, naming both (daemon/common/state_owner.py)."""
    from daemon.common import state_owner

    settings = Settings.load(getattr(args, "config", None), overrides(args))
    state_owner.check(settings.state_dir, settings.model.name)
    return settings
