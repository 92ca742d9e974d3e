"""Commands: strict decoding, schemas per action, one reply per id, idempotency from the record.

A corpus of hostile payloads and hypothesis-generated ones go through the real decoder and
bus; each gets an error reply (when an id can be read) or is dropped and counted, and the
next valid command still works."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.agent_state import AgentState
from agent.command_bus import CommandBus, Handler
from agent.commands import MAX_COMMAND_BYTES, Command, CommandError


class Bus:
    """A CommandBus with simple handlers, its replies collected."""

    def __init__(self, tmp: Path) -> None:
        self.replies: list[dict[str, Any]] = []
        self.executed: list[str] = []
        self.state = AgentState(tmp / "agent.sqlite3")

        def ping(c: Command) -> dict[str, Any]:
            self.executed.append(c.id)
            return {"pong": True}

        def fail(c: Command) -> dict[str, Any]:
            raise CommandError("not_found", "pipeline 'x': no such pipeline")

        def crash(c: Command) -> dict[str, Any]:
            raise RuntimeError("boom")

        handlers: dict[str, Handler] = {"ping": ping, "status": ping, "start": fail, "stop": crash, "configure": ping,
                    "reload": ping, "bench": ping}
        self.bus = CommandBus(handlers, self.state, self.replies.append, threading.Event())

    def send(self, payload: bytes | str) -> dict[str, Any] | None:
        data = payload.encode() if isinstance(payload, str) else payload
        return self.bus.handle("lepton/dev/cmd", data)


@pytest.fixture
def bus(tmp_path: Path) -> Bus:
    return Bus(tmp_path)


def _error(reply: dict[str, Any] | None, cid: str, code: str) -> None:
    assert reply is not None and reply["id"] == cid and reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]


def test_ping_and_reply_shape(bus: Bus) -> None:
    reply = bus.send('{"id": "a1", "action": "ping", "ts": 1.5, "v": 1}')
    assert reply == {"id": "a1", "ok": True, "result": {"pong": True}}
    assert bus.replies == [reply]


def test_same_id_is_answered_from_the_record(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    first = bus.send('{"id": "once", "action": "ping"}')
    again = bus.send('{"id": "once", "action": "ping"}')
    assert first == again and bus.executed == ["once"]
    bus.state.close()
    restarted = Bus(tmp_path)  # the record is on disk
    assert restarted.send('{"id": "once", "action": "ping"}') == first
    assert restarted.executed == []
    assert restarted.bus.stats.repeated == 1


@pytest.mark.parametrize(("payload", "code"), [
    ('{"id": "s", "action": "start", "pipeline": "x"}', "not_found"),
    ('{"id": "s", "action": "stop"}', "failed"),
])
def test_handler_errors_become_replies(bus: Bus, payload: str, code: str) -> None:
    _error(bus.send(payload), "s", code)
    assert bus.send('{"id": "u", "action": "ping"}') is not None  # and the bus goes on


@pytest.mark.parametrize(("payload", "code", "fragment"), [
    ('{"id": "x", "action": "teleport"}', "unknown_action", "teleport"),
    ('{"id": "x"}', "bad_request", "action"),
    ('{"id": "x", "action": "ping", "extra": 1}', "bad_request", "extra: unknown field"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "threshold": "high"}', "bad_request", "threshold"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "threshold": 3}', "bad_request", "threshold"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "threshold": "0.3"}', "bad_request", "threshold"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "fps": 5e-324}', "bad_request", "fps"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "fps": 0.001}', "bad_request", "fps"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "fps": "5"}', "bad_request", "fps"),
    ('{"id": "x", "action": "configure", "pipeline": "a/b"}', "bad_request", "pipeline"),
    ('{"id": "x", "action": "configure", "pipeline": "p", "policy": {"max_rate": -1}}', "bad_request",
     "policy.max_rate"),
    ('{"id": "x", "action": "bench", "pipeline": "p", "runs": 100000}', "bad_request", "runs"),
    ('{"id": "x", "action": "ping", "ts": NaN}', "bad_json", "NaN"),
    ('{"id": "x", "action": "ping", "ts": Infinity}', "bad_json", "Infinity"),
    ('{"id": "x", "action": "ping", "ts": 1e999999}', "bad_json", "out of range"),
    ('{"id": "x", "action": "ping", "action": "stop"}', "bad_json", "duplicate key 'action'"),
    ('{"id": "x", "action": "ping", "ts": ' + "9" * 5000 + "}", "bad_json", ""),
    ('{"id": "x", "action": "ping",', "bad_json", "line 1"),
    ('{"id": "x", "action": ["ping"]}', "bad_request", "action"),
])
def test_bad_commands_with_an_id_get_an_error_reply(bus: Bus, payload: str, code: str, fragment: str) -> None:
    reply = bus.send(payload)
    _error(reply, "x", code)
    assert reply is not None and fragment in reply["error"]["message"]
    assert bus.executed == []


@pytest.mark.parametrize("payload", [
    b"",
    b"\xff\xfe\x00garbage",
    b'{"id": "\xc3\x28", "action": "ping"}',  # invalid UTF-8
    b"[" * 100000,
    b'{"action": "ping"}',  # no id
    b'{"id": "", "action": "ping"}',
    b'{"id": 7, "action": "ping"}',
    b'{"id": "a", "id": "b", "action": "ping"}',  # which id?
    b'{"id": "' + b"x" * 200 + b'", "action": "ping"}',
    b'"just a string"',
    b"null",
    b"1e999999",
    b'{"id": "x", "action": "ping", "pad": "' + b"p" * MAX_COMMAND_BYTES + b'"}',  # too large: never parsed
    b"x" * (10 * 1024 * 1024),
])
def test_bad_commands_without_a_readable_id_are_dropped_and_counted(bus: Bus, payload: bytes) -> None:
    assert bus.send(payload) is None
    assert bus.replies == [] and bus.bus.stats.dropped == 1
    assert bus.send('{"id": "next", "action": "ping"}') is not None  # the next valid command works


def test_deep_nesting_inside_a_valid_envelope(bus: Bus) -> None:
    deep = '{"id": "d", "action": "ping", "x": ' + "[" * 50000 + "]" * 50000 + "}"
    _error(bus.send(deep[:MAX_COMMAND_BYTES - 10] if len(deep) > MAX_COMMAND_BYTES else deep), "d", "bad_json")


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300))
def test_random_bytes_never_break_the_bus(bus: Bus, payload: bytes) -> None:
    before = len(bus.replies)
    reply = bus.send(payload)
    assert len(bus.replies) - before == (0 if reply is None else 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["id", "action", "pipeline", "threshold", "fps", "policy", "runs",
                                             "ts", "v", "zzz"]), json_values, max_size=6),
       action=st.sampled_from(["ping", "status", "configure", "bench", "start", "nope"]),
       cid=st.text(min_size=1, max_size=10, alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e)))
def test_random_commands_get_exactly_one_reply(bus: Bus, body: dict[str, Any], action: str, cid: str) -> None:
    cid = f"h-{len(bus.replies)}-{cid}"  # fresh per example: idempotency is tested elsewhere
    payload = json.dumps({**body, "id": cid, "action": action})
    before = len(bus.replies)
    reply = bus.send(payload)
    assert reply is not None and reply["id"] == cid
    assert len(bus.replies) == before + 1
    assert reply["ok"] is True or reply["error"]["code"] in {"bad_request", "bad_json", "unknown_action",
                                                             "not_found", "failed"}


def test_flood_is_dropped_and_counted_without_blocking(tmp_path: Path) -> None:
    stop = threading.Event()
    replies: list[dict[str, Any]] = []
    gate = threading.Event()

    def slow_ping(c: Command) -> dict[str, Any]:
        gate.wait(10)  # the worker is busy; the queue fills
        return {"pong": True}

    state = AgentState(tmp_path / "a.sqlite3")
    bus = CommandBus({"ping": slow_ping}, state, replies.append, stop)
    bus.start()
    for i in range(1000):
        bus.submit("t", json.dumps({"id": f"f{i}", "action": "ping"}).encode())  # never blocks
    assert bus.stats.received == 1000 and bus.stats.queue_full > 0
    gate.set()
    done = threading.Event()
    def status(c: Command) -> dict[str, Any]:
        done.set()
        return {"ok": 1}

    bus.handlers["status"] = status
    bus.submit("t", b'{"id": "after", "action": "status"}')
    while bus.stats.queue_full and not done.wait(0.05):
        bus.submit("t", b'{"id": "after", "action": "status"}')  # retried until the queue has room
    assert done.wait(30)
    stop.set()
    bus.close(5)
    assert any(r["id"] == "after" and r["ok"] for r in replies)


# -- fault 5: an id that was claimed is answered exactly once, whatever happens after the claim -----------------


def test_a_result_json_cannot_carry_is_answered_once(bus: Bus) -> None:
    bus.bus.handlers["ping"] = lambda c: {"score": float("nan")}
    _error(bus.send('{"id": "nan", "action": "ping"}'), "nan", "failed")
    again = bus.send('{"id": "nan", "action": "ping"}')  # a retry gets the same answer, not "already running"
    assert again == bus.replies[0] and len(bus.replies) == 2


def test_a_record_that_cannot_be_written_still_answers_once(bus: Bus) -> None:
    bus.state.close()  # every write now raises sqlite3.ProgrammingError
    reply = bus.send('{"id": "r", "action": "ping"}')
    _error(reply, "r", "failed")
    assert bus.replies == [reply]


def test_a_command_interrupted_by_a_crash_is_answered_at_the_next_start(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.sqlite3")
    assert state.claim_command("mid") == (True, None)  # claimed, then the process died
    state.close()
    bus = Bus(tmp_path)
    bus.bus.recover()
    assert len(bus.replies) == 1
    _error(bus.replies[0], "mid", "interrupted")
    retry = bus.send('{"id": "mid", "action": "ping"}')
    assert retry == bus.replies[0] and bus.executed == []


def test_an_answer_given_later_leaves_the_worker_free_and_is_sent_once(bus: Bus) -> None:
    from agent.command_bus import Later

    pending = Later()
    bus.bus.handlers["bench"] = lambda c: pending
    assert bus.send('{"id": "slow", "action": "bench", "pipeline": "p"}') is None  # not answered yet
    assert bus.send('{"id": "next", "action": "ping"}') is not None  # the worker went on
    assert bus.send('{"id": "slow", "action": "bench", "pipeline": "p"}') is None  # a retry: still running
    pending.done({"score": float("nan")})  # even a result JSON cannot carry is answered, once
    pending.done({"items": 1})
    slow = [r for r in bus.replies if r["id"] == "slow"]
    assert len(slow) == 1
    _error(slow[0], "slow", "failed")
    assert bus.send('{"id": "slow", "action": "bench", "pipeline": "p"}') == slow[0]
