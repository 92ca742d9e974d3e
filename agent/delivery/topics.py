"""Topic names of the delivery protocol (docs/delivery.md), under the configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass

from agent.delivery.manifest import Version


@dataclass(frozen=True)
class Topics:
    prefix: str = "lepton"

    def model(self, name: str, version: Version) -> str:
        return f"{self.prefix}/models/{name}/{version}"

    def manifest(self, name: str, version: Version) -> str:
        return f"{self.model(name, version)}/manifest"

    def chunk(self, name: str, version: Version, index: int) -> str:
        return f"{self.model(name, version)}/chunk/{index}"

    def deploy(self, device: str) -> str:
        return f"{self.prefix}/{device}/deploy"

    def cmd(self, target: str) -> str:
        """`target` is a device id, `group:G` or `all` (DESIGN §5)."""
        if target == "all":
            return f"{self.prefix}/all/cmd"
        if target.startswith("group:"):
            return f"{self.prefix}/group/{target[6:]}/cmd"
        return f"{self.prefix}/{target}/cmd"

    def reply(self, device: str) -> str:
        return f"{self.prefix}/{device}/reply"
