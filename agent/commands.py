"""Commands from the fleet (DESIGN §5): strict decoding, a schema per action, one reply per id.

Commands arrive on `lepton/<dev>/cmd`, `lepton/group/<g>/cmd` and `lepton/all/cmd`; the worker that
runs them in order, one reply per id, is agent.command_bus. This module says what a command is.

Decoding is strict: at most 64 KiB, UTF-8, JSON without NaN/Infinity, without numbers that
overflow, without duplicate keys, an object at the top. A bad command gets an error reply
when its id can be read (a lenient second parse looks for a single top-level `id`);
otherwise it is dropped and counted. An id already executed is answered from the persisted record.

Each action registers a pydantic schema (`extra="forbid"`) with `register_action`; the
daemon supplies the handlers. `deploy`, `rollback` and `models` are answered by the model
delivery service (docs/delivery.md); their schemas are here with the others.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.config import Fps, ModelName, PolicySettings, Threshold, TopicName
from agent.mqtt import wire

logger = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
MAX_ID_CHARS = 128
QUEUE_SIZE = 256

CommandId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[\x20-\x7e]+$")]


class CommandError(Exception):
    """An error reply: `code` is machine-readable, `message` says what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Command(BaseModel):
    """Fields every command has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: CommandId
    action: str
    ts: float | None = None
    """When the operator sent it (informative)."""
    v: int | None = None
    """Schema version of the sender."""


class Ping(Command):
    action: Literal["ping"]


class Status(Command):
    action: Literal["status"]


class Start(Command):
    action: Literal["start"]
    pipeline: TopicName | None = None
    """One pipeline; default: every pipeline."""


class Stop(Command):
    action: Literal["stop"]
    pipeline: TopicName | None = None
    """One pipeline; default: every pipeline."""


class PolicyPatch(BaseModel):
    """Policy fields to change; the others keep their value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: tuple[str, ...] | None = None
    max_results: Annotated[int, Field(ge=1, le=1000)] | None = None
    on_change: bool | None = None
    heartbeat_s: Annotated[float, Field(ge=0)] | None = None
    max_rate: Annotated[float, Field(gt=0, le=1000)] | None = None

    def apply(self, policy: PolicySettings) -> PolicySettings:
        return policy.model_copy(update=self.model_dump(exclude_none=True))


class Configure(Command):
    action: Literal["configure"]
    pipeline: TopicName
    threshold: Threshold | None = None
    fps: Fps | None = None
    policy: PolicyPatch | None = None


class Reload(Command):
    action: Literal["reload"]


class Bench(Command):
    action: Literal["bench"]
    pipeline: TopicName
    runs: Annotated[int, Field(ge=1, le=1000)] = 50


class Tune(Command):
    action: Literal["tune"]
    pipeline: TopicName | None = None
    """One pipeline; default: every pipeline that has a budget and model variants."""


def _version(v: int | str | None) -> int | str | None:
    from agent.version import version_key

    if v is not None:
        version_key(v)  # ValueError says what is wrong
    return v


class ShadowTrialArgs(BaseModel):
    """`deploy --shadow`: how long the trial runs and what promotes the model (the rest: config defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: Annotated[int, Field(ge=1)] | None = None
    seconds: Annotated[float, Field(gt=0)] | None = None
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    max_latency_ratio: Annotated[float, Field(gt=0)] | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None


class Deploy(Command):
    action: Literal["deploy"]
    model: ModelName
    version: StrictInt | StrictStr
    """An integer or semver (1.2.3, 1.2.3-rc.1)."""
    shadow: ShadowTrialArgs | None = None

    _check_version = field_validator("version")(_version)


class Rollback(Command):
    action: Literal["rollback"]
    model: ModelName
    version: StrictInt | StrictStr | None = None
    """A version this device keeps; default: the previous one."""

    _check_version = field_validator("version")(_version)


class Models(Command):
    action: Literal["models"]


class Capture(Command):
    """Keep the next `count` items of a pipeline, or every item for `duration_s` (docs/capture.md)."""

    action: Literal["capture"]
    pipeline: TopicName
    count: Annotated[int, Field(ge=1, le=1000)] | None = None
    duration_s: Annotated[float, Field(gt=0, le=3600)] | None = None

    @model_validator(mode="after")
    def _one(self) -> Capture:
        if (self.count is None) == (self.duration_s is None):
            raise ValueError("give either count or duration_s")
        return self


SampleId = Annotated[str, Field(pattern=r"^[0-9]{13}-[A-Za-z0-9_.-]{1,64}-[0-9]{1,9}$")]
"""A sample id as the device's store names it (never a path)."""


class Samples(Command):
    """The captured samples: `list` them (filtered), `offer` some for a pull (agent.samples.offer), `delete`
    the ones the operator holds (acknowledged), `purge` all."""

    action: Literal["samples"]
    op: Literal["list", "offer", "delete", "purge"]
    pipeline: TopicName | None = None
    reason: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")] | None = None
    since: float | None = None
    """Unix seconds: only samples captured from then on."""
    limit: Annotated[int, Field(ge=1, le=1000)] = 1000
    ids: Annotated[tuple[SampleId, ...], Field(max_length=1000)] = ()
    """For `offer`: the samples to publish; for `delete`: the samples the operator has pulled and verified."""


ACTIONS: dict[str, type[Command]] = {}


def register_action(schema: type[Command]) -> type[Command]:
    """Make an action known: its name is the schema's `action` literal."""
    name = schema.model_fields["action"].annotation.__args__[0]  # type: ignore[union-attr]
    ACTIONS[name] = schema
    return schema


for _schema in (Ping, Status, Start, Stop, Configure, Reload, Bench, Tune, Deploy, Rollback, Models, Capture, Samples):
    register_action(_schema)


# -- decoding ---------------------------------------------------------------------------------


def decode(payload: bytes) -> dict[str, Any]:
    """The command object, or CommandError saying what is wrong with the bytes."""
    try:
        return wire.decode(payload, MAX_COMMAND_BYTES, "command")
    except wire.WireError as exc:
        raise CommandError(exc.code, exc.message) from None


_FIRST_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([\x20\x21\x23-\x5b\x5d-\x7e]{1,128})"\s*[,}]')


def _ignore(text: str) -> None:
    return None


def readable_id(payload: bytes) -> str | None:
    """The command's id when one can be read at all, for the error reply; None otherwise."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        pairs = json.loads(payload.decode("utf-8"), object_pairs_hook=list, parse_int=_ignore,
                           parse_float=_ignore, parse_constant=_ignore)
    except (ValueError, RecursionError):
        # Broken or nested too deeply for a parse: an id written first can still be read.
        match = _FIRST_ID.match(payload)
        return match.group(1).decode("ascii") if match else None
    if not isinstance(pairs, list):
        return None
    ids = [v for k, v in pairs if k == "id"] if all(isinstance(p, tuple) for p in pairs) else []
    if len(ids) != 1 or not isinstance(ids[0], str):
        return None
    cid = ids[0]
    if not 0 < len(cid) <= MAX_ID_CHARS or not cid.isprintable() or not cid.isascii():
        return None
    return cid


def validate(data: dict[str, Any]) -> Command:
    """The command under its action's schema; CommandError names the field that is wrong."""
    action = data.get("action")
    if not isinstance(action, str):
        raise CommandError("bad_request", "action: missing or not a string")
    schema = ACTIONS.get(action)
    if schema is None:
        known = ", ".join(sorted(ACTIONS))
        raise CommandError("unknown_action", f"action {action[:64]!r} is not known (known: {known})")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "command"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise CommandError("bad_request", f"{loc}: {msg}") from None
