"""Loading the agent's configuration: read with tomllib, validate against `agent.config`, apply the
environment's per-device overrides (`LEPTON_DEVICE_ID`, `LEPTON_BROKER`, `LEPTON_STATE_DIR`) and
merge over the board's profile.

An error names the key as written in the file and, where the key can be found in the text, its line.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import AgentConfig, Effective, KeyFile
from agent.errors import BadInput
from agent.profiles import Profile, detect, detect_profile, load_profile
from agent.tomlpos import find_line, toml_key

DEFAULT_CONFIG = Path("/etc/lepton/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/lepton")

ENV_OVERRIDES = {
    # environment variable: (section, key)
    "LEPTON_DEVICE_ID": ("agent", "device_id"),
    "LEPTON_BROKER": ("mqtt", "broker"),
    "LEPTON_STATE_DIR": ("agent", "state_dir"),
}


def config_path(given: str | Path | None) -> Path:
    return Path(given or os.environ.get("LEPTON_CONFIG") or DEFAULT_CONFIG)


def read_config(path: Path, env: Mapping[str, str] | None = None) -> tuple[AgentConfig, dict[str, str]]:
    """Parse and validate one config file; BadInput names the file, the key and its line."""
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: config is not UTF-8 text") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    applied: dict[str, str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            table = data.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
                applied[var] = value
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"{path}: {describe_error(exc, text, applied)}") from None
    return _resolve_paths(config, path.parent), applied


def describe_error(exc: ValidationError, text: str, env: Mapping[str, str] | None = None) -> str:
    """The first error as `key (line N): problem`, with the key written as in TOML."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = toml_key(loc)
    for var, (section, name) in ENV_OVERRIDES.items():
        if env and var in env and loc[:2] == (section, name):
            key = f"{key} (from {var})"
    line = find_line(text, loc)
    where = f"{key} (line {line})" if line else key
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {msg}{more}"


def _resolve_paths(config: AgentConfig, base: Path) -> AgentConfig:
    """Relative model, labels and key file paths are relative to the config file's folder."""

    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    pipelines = tuple(
        p.model_copy(update={"model": rel(p.model), "labels": rel(p.labels)}) for p in config.pipelines
    )
    keys = {kid: KeyFile(file=base / key.file) if isinstance(key, KeyFile) and not key.file.is_absolute() else key
            for kid, key in config.trusted_keys.items()}
    return config.model_copy(update={"pipelines": pipelines, "trusted_keys": keys})


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "lepton-device"


def effective(config: AgentConfig, path: Path | None, env: dict[str, str] | None = None) -> Effective:
    """Merge the config over its profile; BadInput when the profile cannot be loaded."""
    if config.agent.profile == "auto":
        name, reason = detect_profile(config.telemetry.root)
    else:
        name, reason = config.agent.profile, "set in the config"
    profile = load_profile(name)
    overrides = config.profile.model_dump(exclude_none=True)
    if overrides:
        try:
            profile = Profile.model_validate({**profile.model_dump(), **overrides})
        except ValidationError as exc:
            where = f"{path}: " if path else ""
            raise BadInput(f"{where}profile: {exc.errors()[0]['msg']}") from None
        reason += f"; overridden by the config: {', '.join(sorted(overrides))}"
    device_id = config.agent.device_id or _default_device_id()
    state = config.agent.state_dir
    return Effective(
        config=config,
        path=path,
        device_id=device_id,
        profile=profile,
        profile_reason=reason,
        spool_path=config.spool.path or state / "spool.sqlite3",
        spool_cap_bytes=config.spool.cap_bytes or profile.spool_cap_bytes,
        client_id=config.mqtt.client_id or f"lepton-{device_id}",
        env=env or {},
    )


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Effective:
    """Read, validate and merge the config at `path` (or `LEPTON_CONFIG`, or the default)."""
    file = config_path(path)
    config, applied = read_config(file, env)
    return effective(config, file, applied)


def profile_report(config: str | Path | None = None, root: Path | None = None) -> dict[str, Any]:
    """What `lepton-agent profile` prints: the profile in force, why, what was read, and every value.
    With `config`, the config's choice (`agent.profile`) and its `[profile]` overrides apply."""
    if config is not None:
        cfg, applied = read_config(Path(config))
        if root is not None:
            cfg = cfg.model_copy(update={"telemetry": cfg.telemetry.model_copy(update={"root": root})})
        eff = effective(cfg, Path(config), applied)
        profile, reason = eff.profile, eff.profile_reason
        evidence = detect(cfg.telemetry.root).evidence
    else:
        found = detect(root or Path("/"))
        profile, reason, evidence = load_profile(found.name), found.reason, found.evidence
    return {"profile": profile.name, "reason": reason, "evidence": evidence,
            **profile.model_dump(mode="json", exclude={"name"})}
