"""Commands from the fleet (DESIGN §5): strict decoding, a schema per action, one reply per id.

Commands arrive on `lepton/<dev>/cmd`, `lepton/group/<g>/cmd` and `lepton/all/cmd`. The MQTT
thread only queues them (a bounded queue: a flood is dropped and counted, never blocks the
link); one worker decodes, validates and executes them in order.

Decoding is strict: at most 64 KiB, UTF-8, JSON without NaN/Infinity, without numbers that
overflow, without duplicate keys, an object at the top. A bad command gets an error reply
when its id can be read (a lenient second parse looks for a single top-level `id`);
otherwise it is dropped and counted. An id already executed is answered from the persisted record.

Each action registers a pydantic schema (`extra="forbid"`) with `register_action`; the
daemon supplies the handlers. `deploy`, `rollback` and `models` are answered by the model
delivery service (docs/delivery.md); their schemas are here with the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

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

from agent.config import Fps, PolicySettings, Threshold, TopicName
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


ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
"""A model name as delivery topics carry it (docs/delivery.md §2)."""


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


# -- the worker -------------------------------------------------------------------------------


@dataclass
class CommandStats:
    received: int = 0
    executed: int = 0
    repeated: int = 0
    """Ids seen before: answered from the record."""
    errors: int = 0
    """Error replies sent."""
    dropped: int = 0
    """Dropped without reply: no readable id, or the queue was full."""
    queue_full: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Later:
    """A handler's answer that another thread gives later (`done` or `fail`), so that a long command
    (bench) does not hold the single command worker. The reply still goes out once, when it comes; a
    process that dies first leaves the id to be answered `interrupted` at the next start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reply: tuple[dict[str, Any] | None, CommandError | None] | None = None
        self._then: Callable[[dict[str, Any] | None, CommandError | None], object] | None = None
        self.finished = threading.Event()

    def done(self, result: dict[str, Any]) -> None:
        self._settle(result, None)

    def fail(self, error: CommandError) -> None:
        self._settle(None, error)

    def _settle(self, result: dict[str, Any] | None, error: CommandError | None) -> None:
        with self._lock:
            if self._reply is not None:
                return
            self._reply, then = (result, error), self._then
        if then is not None:
            then(result, error)
        self.finished.set()

    def then(self, callback: Callable[[dict[str, Any] | None, CommandError | None], object]) -> None:
        with self._lock:
            self._then, reply = callback, self._reply
        if reply is not None:
            callback(*reply)


Handler = Callable[[Command], "dict[str, Any] | Later"]


class CommandRecord(Protocol):
    """Persistence of executed ids (agent.agent_state.AgentState)."""

    def claim_command(self, command_id: str) -> tuple[bool, str | None]: ...

    def record_reply(self, command_id: str, reply: str) -> None: ...

    def unanswered(self) -> list[str]: ...


class CommandBus:
    """Queue from the MQTT thread, one worker thread executing in order, one reply per id."""

    def __init__(self, handlers: dict[str, Handler], record: CommandRecord, reply: Callable[[dict[str, Any]], None],
                 stop: threading.Event) -> None:
        self.handlers = handlers
        self.record = record
        self.reply = reply
        self.stop = stop
        self.stats = CommandStats()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._unrecorded: dict[str, str] = {}
        """Replies the record could not store (disk full, SQLite error), by id: retries still get them."""

    def submit(self, topic: str, payload: bytes) -> None:
        """Called from the MQTT thread: never blocks."""
        self.stats.received += 1
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self.stats.queue_full += 1
            self.stats.dropped += 1
            if self.stats.queue_full in (1, 10, 100) or self.stats.queue_full % 1000 == 0:
                logger.warning("commands arrive faster than they run: %d dropped so far", self.stats.queue_full)

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def close(self, timeout: float) -> None:
        # A full queue needs no sentinel: the worker checks the stop event after each command.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            try:
                self.handle(*item)
            except Exception:
                # handle() answers errors itself; this is a bug in it, logged and survived.
                logger.exception("command worker: unexpected error (survived)")

    def handle(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Decode, validate, execute (once per id) and reply; returns the reply sent, if any."""
        try:
            data = decode(payload)
        except CommandError as exc:
            return self._error(readable_id(payload), exc)
        raw_id = data.get("id")
        try:
            command = validate(data)
        except CommandError as exc:
            cid = raw_id if isinstance(raw_id, str) and readable_id(payload) == raw_id else None
            return self._error(cid, exc)
        try:
            fresh, stored = self.record.claim_command(command.id)
        except Exception as exc:  # e.g. SQLite failing: nothing was claimed, so nothing runs
            logger.exception("command %s: the command record failed", command.id)
            return self._error(command.id, CommandError("failed", f"the command record failed: {_brief(exc)}"))
        if not fresh:
            self.stats.repeated += 1
            if stored is None:
                stored = self._unrecorded.get(command.id)
            if stored is None:
                logger.info("command %s: already running; the reply follows once", command.id)
                return None
            reply = json.loads(stored)
            self._send(reply)
            return dict(reply)
        # From here on the id is claimed: whatever fails, exactly one reply goes out and is kept for retries.
        try:
            result = self.handlers[command.action](command)
        except CommandError as exc:
            return self._finish(command, None, exc)
        except Exception as exc:
            logger.exception("command %s (%s) failed", command.id, command.action)
            return self._finish(command, None, CommandError("failed", _brief(exc)))
        if isinstance(result, Later):
            result.then(lambda r, e: self._finish(command, r, e))  # answered from the thread that settles it
            return None
        return self._finish(command, result, None)

    def _finish(self, command: Command, result: dict[str, Any] | None,
                error: CommandError | None) -> dict[str, Any]:
        """The one reply to a claimed id: recorded (or kept), then sent."""
        reply: dict[str, Any]
        try:
            if error is not None:
                raise error
            reply = {"id": command.id, "ok": True, "result": result}
            text = json.dumps(reply, allow_nan=False)
            self.stats.executed += 1
        except CommandError as exc:
            reply = {"id": command.id, "ok": False, "error": {"code": exc.code, "message": exc.message}}
            text = json.dumps(reply)
            self.stats.errors += 1
        except Exception as exc:  # a result JSON cannot carry (NaN, an object)
            logger.error("command %s (%s): the result cannot be sent: %s", command.id, command.action, exc)
            reply = {"id": command.id, "ok": False, "error": {"code": "failed", "message": _brief(exc)}}
            text = json.dumps(reply)
            self.stats.errors += 1
        self._keep(command.id, text)
        self._send(reply)
        return reply

    def recover(self) -> None:
        """Answer the ids a previous process claimed and never answered (it died mid-command)."""
        try:
            ids = self.record.unanswered()
        except Exception:
            logger.exception("command record: cannot list interrupted commands")
            return
        for cid in ids:
            reply = {"id": cid, "ok": False, "error": {
                "code": "interrupted",
                "message": "the agent stopped while running this command; it may have been done in part"}}
            logger.warning("command %s: interrupted by a stop or crash; answering so", cid)
            self._keep(cid, json.dumps(reply))
            self._send(reply)

    def _keep(self, cid: str, text: str) -> None:
        try:
            self.record.record_reply(cid, text)
        except Exception:
            # Kept in memory instead: a retry in this process still gets this reply, not a second run.
            logger.exception("command %s: cannot record its reply", cid)
            if len(self._unrecorded) >= QUEUE_SIZE:
                self._unrecorded.pop(next(iter(self._unrecorded)))
            self._unrecorded[cid] = text

    def _send(self, reply: dict[str, Any]) -> None:
        try:
            self.reply(reply)
        except Exception:
            logger.exception("command %s: sending the reply failed", reply.get("id"))

    def _error(self, cid: str | None, exc: CommandError) -> dict[str, Any] | None:
        if cid is None:
            self.stats.dropped += 1
            logger.info("command dropped (no readable id): %s", exc.message)
            return None
        self.stats.errors += 1
        reply = {"id": cid, "ok": False, "error": {"code": exc.code, "message": exc.message}}
        self._send(reply)
        return reply


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
