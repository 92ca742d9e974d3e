"""Every MQTT topic name of DESIGN §5 and docs/delivery.md, built in one place: a device's own topics
(`Topics`) and the fleet-wide ones an operator or the delivery protocol addresses (`FleetTopics`)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.version import Version

SCHEMA_VERSION = 1
"""`v` in every payload."""


@dataclass(frozen=True)
class Topics:
    """Topics of one device under one prefix."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def reply(self) -> str:
        return f"{self.base}/reply"

    @property
    def deploy(self) -> str:
        return f"{self.base}/deploy"

    @property
    def cmd(self) -> str:
        return f"{self.base}/cmd"

    @property
    def all_cmd(self) -> str:
        return f"{self.prefix}/all/cmd"

    @property
    def probe(self) -> str:
        """Never subscribed: UNSUBSCRIBE of it is answered by the broker with no other effect (liveness probe)."""
        return f"{self.base}/probe"

    def group_cmd(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/cmd"

    def results(self, pipeline: str) -> str:
        return f"{self.base}/results/{pipeline}"

    def command_topics(self, groups: tuple[str, ...]) -> list[str]:
        return [self.cmd, *(self.group_cmd(g) for g in groups), self.all_cmd]


@dataclass(frozen=True)
class FleetTopics:
    """Topics of any device and of the model store under one prefix (the operator's and delivery's view)."""

    prefix: str = "lepton"

    def model(self, name: str, version: Version) -> str:
        return f"{self.prefix}/models/{name}/{version}"

    def manifest(self, name: str, version: Version) -> str:
        return f"{self.model(name, version)}/manifest"

    def chunk(self, name: str, version: Version, index: int) -> str:
        return f"{self.model(name, version)}/chunk/{index}"

    def device(self, device: str) -> Topics:
        return Topics(self.prefix, device)

    def deploy(self, device: str) -> str:
        return self.device(device).deploy

    def cmd(self, target: str) -> str:
        """`target` is a device id, `group:G` or `all` (DESIGN §5)."""
        if target == "all":
            return f"{self.prefix}/all/cmd"
        if target.startswith("group:"):
            return f"{self.prefix}/group/{target[6:]}/cmd"
        return self.device(target).cmd

    def reply(self, device: str) -> str:
        return self.device(device).reply

    def sync(self, token: str) -> str:
        """An operator tool's own round-trip marker: back after the retained messages it subscribed before."""
        return f"{self.prefix}/fleet/sync/{token}"
