"""The device side of Sprout: model sync, verification and on-device inference. Never imports torch."""

__version__ = "0.1.0"
