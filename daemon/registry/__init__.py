"""Numbered, signed, never-changing model versions on disk."""
