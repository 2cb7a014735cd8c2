"""Runnable examples from docs/ (each is a handler module: `--handlers examples.<name>`)."""
