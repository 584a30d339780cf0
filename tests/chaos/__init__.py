"""The chaos harness: seeded SIGKILLs of the real daemon and restarts of a real Mosquitto, under a steady feed.

``pytest tests/chaos`` runs CI's short version; ``make chaos`` the full one (see docs/reliability.md).
"""
