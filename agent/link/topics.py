"""The MQTT topic names of DESIGN §5, built in one place."""

from __future__ import annotations

from dataclasses import dataclass

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
