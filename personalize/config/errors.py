"""The config's one exception and the one-line check every section uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the dotted key and what would be valid."""


def need(ok: bool, key: str, msg: str) -> None:
    """Raise `ConfigError("<key>: <msg>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
