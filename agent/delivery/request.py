"""A deploy command's fields, checked: the one place a deploy request is read from a command's JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.delivery.activation import ShadowSpec
from agent.delivery.signed_manifest import NAME_RE
from agent.errors import BadInput
from agent.version import Version, parse_version, version_key


@dataclass(frozen=True)
class DeployRequest:
    name: str
    version: Version
    shadow: ShadowSpec | None = None
    request: str | None = None

    @classmethod
    def from_command(cls, args: dict[str, Any]) -> DeployRequest:
        """From a deploy command's fields (`model`, `version`, optional `shadow`, `id`); BadInput naming the field."""
        name = args.get("model")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BadInput("model: a model name (letters, digits, . _ -) is required")
        raw = args.get("version")
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise BadInput("version: an integer or a semver string is required")
        try:
            version = parse_version(str(raw)) if isinstance(raw, str) else raw
            version_key(version)
        except ValueError as exc:
            raise BadInput(f"version: {exc}") from None
        shadow = None
        if args.get("shadow") is not None:
            if not isinstance(args["shadow"], dict):
                raise BadInput("shadow: must be an object")
            try:
                shadow = ShadowSpec.from_command(args["shadow"])
            except ValueError as exc:
                raise BadInput(str(exc)) from None
        rid = args.get("id")
        return cls(name, version, shadow, rid if isinstance(rid, str) and rid else None)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.name, "version": self.version, "id": self.request}
        if self.shadow is not None:
            d["shadow"] = {k: v for k, v in self.shadow.__dict__.items() if v is not None}
        return d


__all__ = ["DeployRequest"]
