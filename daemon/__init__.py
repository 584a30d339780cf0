"""Sprout's service: settings, feed (MQTT), store, intake, HTTP server, the Daemon lifecycle and the CLI."""

__version__ = "0.1.0"
