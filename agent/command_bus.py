"""The command worker: one thread runs the fleet's commands in order, one reply per id (DESIGN §5).

The MQTT thread only queues a command (a bounded queue: a flood is dropped and counted, never blocks the
link); the worker decodes and validates it (agent.commands), claims its id in the persisted record, runs the
daemon's handler and sends the one reply. A handler may answer `Later` (bench), which frees the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.commands import QUEUE_SIZE, Command, CommandError, decode, readable_id, validate

logger = logging.getLogger(__name__)


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
