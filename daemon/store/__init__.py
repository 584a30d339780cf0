"""The example store (SQLite) and the label changes every reader resolves through."""
