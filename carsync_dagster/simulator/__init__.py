"""A bundled, deterministic simulator of the source API (see server.py and process.py)."""
