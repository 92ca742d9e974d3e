"""Every MQTT topic name of DESIGN §5 and docs/delivery.md, built in one place: a device's own topics
(`Topics`) and the fleet-wide ones an operator or the delivery protocol addresses (`FleetTopics`).

Names (device ids, pipelines, groups, model names and versions) go into topics through `segment`: RabbitMQ's
MQTT plugin turns a `.` into `/`, which split `colors@2.0.1` over three levels (and the agent never found its
manifest). A name without a dot stays as it is; one with a dot becomes `agent.names.encode_name` of it, the
same string as its Home Assistant id (`cam.a` → `x--cam-2ea`, version `2.0.1` → `x--2-2e0-2e1`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.names import PREFIX, decode_name, encode_name
from agent.version import Version

SCHEMA_VERSION = 1
"""`v` in every payload."""


def segment(name: str) -> str:
    """`name` as one topic level on every broker: unchanged unless it holds a `.` (or starts with the encoding's
    own `x--`), else `encode_name(name)`. Injective: an unchanged name never starts with `x--`, an encoded one
    always does. Wildcards (`+`, `#`) pass through."""
    if "." not in name and not name.startswith(PREFIX):
        return name
    return encode_name(name)


def unsegment(level: str) -> str:
    """The name `segment` made `level` from (a level it cannot have made is returned as it is)."""
    if not level.startswith(PREFIX):
        return level
    try:
        return decode_name(level)
    except ValueError:
        return level


@dataclass(frozen=True)
class Topics:
    """Topics of one device under one prefix."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{segment(self.device)}"

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
    def presence(self) -> str:
        """The fleet tools' presence query: every device answers with its status and deploy states, published
        again (live), so a view needs no retained message reaching a wildcard subscription (RabbitMQ)."""
        return f"{self.prefix}/all/presence"

    @property
    def probe(self) -> str:
        """Never subscribed: UNSUBSCRIBE of it is answered by the broker with no other effect (liveness probe)."""
        return f"{self.base}/probe"

    def group_cmd(self, group: str) -> str:
        return f"{self.prefix}/group/{segment(group)}/cmd"

    def results(self, pipeline: str) -> str:
        return f"{self.base}/results/{segment(pipeline)}"

    def command_topics(self, groups: tuple[str, ...]) -> list[str]:
        return [self.cmd, *(self.group_cmd(g) for g in groups), self.all_cmd]


@dataclass(frozen=True)
class FleetTopics:
    """Topics of any device and of the model store under one prefix (the operator's and delivery's view)."""

    prefix: str = "lepton"

    def model(self, name: str, version: Version) -> str:
        return f"{self.prefix}/models/{segment(name)}/{segment(str(version))}"

    def manifest(self, name: str, version: Version) -> str:
        return f"{self.model(name, version)}/manifest"

    def chunk(self, name: str, version: Version, index: int) -> str:
        return f"{self.model(name, version)}/chunk/{index}"

    def want(self, name: str, version: Version) -> str:
        """Where a device asks a seeder (`lepton-fleet serve-models`) for the manifest or chunks it lacks."""
        return f"{self.model(name, version)}/want"

    @property
    def wants(self) -> str:
        """Every model's `want` topic: what a seeder subscribes to."""
        return f"{self.prefix}/models/+/+/want"

    def device(self, device: str) -> Topics:
        return Topics(self.prefix, device)

    def deploy(self, device: str) -> str:
        return self.device(device).deploy

    def cmd(self, target: str) -> str:
        """`target` is a device id, `group:G` or `all` (DESIGN §5)."""
        if target == "all":
            return f"{self.prefix}/all/cmd"
        if target.startswith("group:"):
            return self.device("all").group_cmd(target[6:])
        return self.device(target).cmd

    def device_of(self, topic: str) -> str | None:
        """The device id of `prefix/<dev>/…` (decoded), or None for a topic outside the prefix."""
        if not topic.startswith(f"{self.prefix}/"):
            return None
        level = topic[len(self.prefix) + 1:].split("/", 1)[0]
        return unsegment(level) if level else None

    def reply(self, device: str) -> str:
        return self.device(device).reply

    def sync(self, token: str) -> str:
        """An operator tool's own round-trip marker: back after the retained messages it subscribed before."""
        return f"{self.prefix}/fleet/sync/{token}"
