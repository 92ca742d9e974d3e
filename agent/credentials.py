"""Secrets the config names rather than holds: a password from a file (its first line) or an environment variable.

The broker's password (`[mqtt.auth]`) and a network camera's (source options) are read the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import BadInput


def read_secret(path: Path | None, env_name: str | None, where: str, env: dict[str, str] | None = None) -> str | None:
    """The secret from `path` (first line) or the variable `env_name`, or None when neither is given.

    `where` prefixes the keys in error lines (e.g. "mqtt.auth." or "source option "), so BadInput names where
    the secret was looked for."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{where}password_file: {path}: cannot read ({exc.strerror})") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise BadInput(f"{where}password_file: {path}: empty")
        return lines[0]
    if env_name is not None:
        value = (env if env is not None else os.environ).get(env_name)
        if not value:
            raise BadInput(f"{where}password_env: {env_name} is not set")
        return value
    return None
