"""The dashboard's web side (aiohttp): the page and its assets, a JSON API, one WebSocket per open page with
coalesced pushes, the actions (token, audit log, read-only without `--key`) and `/metrics`.

The MQTT side runs on paho's thread and only marks what changed (`DashboardView`); `push_loop` wakes a few
times a second, builds the rows of the devices that changed and sends them in one message per page. A page
therefore gets at most `PUSH_EVERY_S`⁻¹ messages a second however many devices talk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from agent.errors import BadInput
from agent.fleet.dashboard.state import DashboardView, count
from agent.mqtt.client import PahoLink
from agent.mqtt.topics import SCHEMA_VERSION

STATIC = Path(__file__).parent / "static"
PUSH_EVERY_S = 0.25
PRESENCE_EVERY_S = 1.0
"""How often every device's presence is recomputed: stale comes from time passing, not from a message."""
COMMANDS = ("ping", "status", "start", "stop", "configure", "reload", "bench")
SHADOW_DEFAULTS = {"min_agreement": 0.9, "max_latency_ratio": 1.5}
"""A shadow deploy's thresholds when the page leaves them out: `lepton-fleet deploy --shadow`'s defaults."""
TOKEN_HEADER = "X-Lepton-Token"  # noqa: S105 - the header's name, not a token
OPERATOR_HEADER = "X-Lepton-Operator"

logger = logging.getLogger(__name__)
audit = logging.getLogger("lepton.dashboard.audit")


@dataclass
class Dashboard:
    view: DashboardView
    link: PahoLink
    token: str
    can_deploy: bool
    broker: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The rows as last pushed: counts and new pages read these, never the MQTT side's live state."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    focus: dict[int, tuple[str, float]] = field(default_factory=dict)
    """id(socket) → (device, newest point sent) for pages showing one device."""
    connected: bool = True
    disconnected_at: float | None = None

    def now(self) -> float:
        """Presence is judged at this time: frozen while our own broker connection is down, so a lost broker
        shows as a banner instead of turning every device stale."""
        return self.disconnected_at if self.disconnected_at is not None else time.time()

    def state_message(self) -> dict[str, Any]:
        return {"type": "broker", "connected": self.connected, "broker": self.broker,
                "since": self.disconnected_at, "can_deploy": self.can_deploy}


KEY: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)


def _dash(request: web.Request) -> Dashboard:
    return request.app[KEY]


# -- pages and reads -------------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def fleet(request: web.Request) -> web.Response:
    d = _dash(request)
    rows = list(d.rows.values())
    return web.json_response({"rows": rows, "counts": count(rows), **d.state_message()})


async def device(request: web.Request) -> web.Response:
    detail = _dash(request).view.device_detail(request.match_info["device"])
    if detail is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such device"}), content_type="application/json")
    return web.json_response(detail)


async def models(request: web.Request) -> web.Response:
    d = _dash(request)
    with d.view.cond:
        requests = [{"id": k, **v} for k, v in d.view.requests.items()]
    return web.json_response({"models": d.view.model_list(), "requests": requests[-20:]})


async def metrics(request: web.Request) -> web.Response:
    try:
        from agent.fleet.metrics import render  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise web.HTTPNotImplemented(text="metrics: agent.fleet.metrics is not in this build\n") from None
    body, content_type = await asyncio.get_running_loop().run_in_executor(None, render, _dash(request).view)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


# -- actions ---------------------------------------------------------------------------------------------------


def _who(request: web.Request) -> str:
    # The page's own word, so kept to one short printable line: the audit log stays one line per action.
    name = "".join(c for c in request.headers.get(OPERATOR_HEADER, "") if c.isprintable()).strip()[:64] or "anonymous"
    return f"{name} from {request.remote}"


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def _action(request: web.Request, build: Any) -> web.Response:
    """Checks the token, decodes the body with `build(dashboard, body) -> (target, action, fields)`, sends the
    command, records and logs it; the reply carries the command id the page follows."""
    d = _dash(request)
    given = request.headers.get(TOKEN_HEADER, "")
    if not hmac.compare_digest(given.encode(), d.token.encode()):
        audit.warning("refused %s %s by %s: %s", request.method, request.path, _who(request),
                      "no token" if not given else "wrong token")
        return _error(401, f"this action needs the dashboard's token ({TOKEN_HEADER} header)")
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise BadInput("give a JSON object")
        target, action, fields = build(d, body)
    except (ValueError, BadInput) as exc:
        return _error(400, str(exc))
    except PermissionError as exc:
        audit.warning("refused %s by %s: %s", request.path, _who(request), exc)
        return _error(403, str(exc))
    if not d.connected:
        return _error(503, f"broker {d.broker} unreachable: nothing sent")
    request_id = uuid.uuid4().hex[:12]
    command = {"id": request_id, "action": action, **fields, "ts": round(time.time(), 3), "v": SCHEMA_VERSION}
    who = _who(request)
    d.view.track(request_id, {"action": action, "target": target, "fields": fields, "who": who, "ts": time.time()})
    topic = d.view.topics.cmd(target)
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: d.link.publish_wait(topic, json.dumps(command).encode(), qos=1, timeout=10.0))
    except Exception as exc:  # the broker went away mid-send: said to the page and in the log
        audit.warning("%s %s to %s by %s failed: %s", action, request_id, target, who, exc)
        return _error(503, str(exc))
    audit.warning("%s %s to %s by %s: %s", action, request_id, target, who, json.dumps(fields))
    return web.json_response({"id": request_id, "target": target, "action": action})


def _target(body: dict[str, Any], key: str = "target") -> str:
    from agent.fleet.verbs import _check_target

    target = body.get(key)
    if not isinstance(target, str) or not target:
        raise BadInput(f"{key}: give a device id, group:NAME or all")
    _check_target(target)
    return target


def _build_cmd(d: Dashboard, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    action = body.get("action")
    if action not in COMMANDS:
        raise BadInput(f"action {action!r}: one of {', '.join(COMMANDS)}")
    args = body.get("args") or {}
    if not isinstance(args, dict):
        raise BadInput("args: give a JSON object")
    return _target(body), str(action), {k: v for k, v in args.items() if k not in ("id", "action", "ts", "v")}


def _read_only(d: Dashboard) -> None:
    if not d.can_deploy:
        raise PermissionError("read-only: the dashboard was started without --key, so it does not deploy or roll back")


def _build_deploy(d: Dashboard, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    _read_only(d)
    from agent.fleet.verbs import _parse_ref

    name, version = _parse_ref(f"{body.get('model')}@{body.get('version')}")
    fields: dict[str, Any] = {"model": name, "version": version}
    if body.get("shadow"):
        items = body.get("shadow_items", 200)
        if not isinstance(items, int) or isinstance(items, bool) or items < 1:
            raise BadInput("shadow_items: a whole number of items, at least 1")
        # The device's own check (ShadowSpec): what it would refuse is refused here, before anything is sent.
        shadow = {"items": items, "seconds": None,
                  **{k: default if body.get(k) is None else body[k] for k, default in SHADOW_DEFAULTS.items()}}
        from agent.delivery.activation import ShadowSpec

        ShadowSpec.from_command(shadow)
        if not shadow["max_latency_ratio"]:
            raise BadInput("max_latency_ratio: must be above 0")
        fields["shadow"] = shadow
    return _target(body, "to"), "deploy", fields


def _build_rollback(d: Dashboard, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    _read_only(d)
    from agent.delivery.signed_manifest import NAME_RE
    from agent.version import parse_version

    name = body.get("model")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadInput(f"model {name!r}: not a model name")
    fields: dict[str, Any] = {"model": name}
    if body.get("version") not in (None, ""):
        fields["version"] = parse_version(str(body["version"]))
    return _target(body, "to"), "rollback", fields


async def cmd(request: web.Request) -> web.Response:
    return await _action(request, _build_cmd)


async def deploy(request: web.Request) -> web.Response:
    return await _action(request, _build_deploy)


async def rollback(request: web.Request) -> web.Response:
    return await _action(request, _build_rollback)


# -- pushes ----------------------------------------------------------------------------------------------------


async def socket(request: web.Request) -> web.WebSocketResponse:
    d = _dash(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 16)
    await ws.prepare(request)
    d.sockets.add(ws)
    rows = list(d.rows.values())
    await ws.send_json({"type": "rows", "rows": rows, "counts": count(rows), "full": True})
    await ws.send_json(d.state_message())
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("type") == "focus":
                if isinstance(data.get("device"), str):
                    d.focus[id(ws)] = (data["device"], float(data.get("since") or 0))
                else:
                    d.focus.pop(id(ws), None)
    finally:
        d.focus.pop(id(ws), None)
        d.sockets.discard(ws)
    return ws


async def _send_all(d: Dashboard, message: dict[str, Any]) -> None:
    text = json.dumps(message)
    for ws in list(d.sockets):
        if not ws.closed:
            with contextlib.suppress(ConnectionError):  # the page went away: its handler forgets it
                await ws.send_str(text)


async def push_loop(d: Dashboard) -> None:
    last_presence = 0.0
    while True:
        await asyncio.sleep(PUSH_EVERY_S)
        try:
            await _push_once(d, time.monotonic() - last_presence >= PRESENCE_EVERY_S)
        except Exception:
            logger.exception("dashboard push failed; trying again")
        if time.monotonic() - last_presence >= PRESENCE_EVERY_S:
            last_presence = time.monotonic()


async def _push_once(d: Dashboard, check_presence: bool) -> None:
    connected = d.link.connected.is_set()
    if connected != d.connected:
        d.connected = connected
        d.disconnected_at = None if connected else time.time()
        logger.warning("broker %s: %s", d.broker, "connection back" if connected else "connection lost")
        if connected:
            d.view.ask_presence()  # statuses missed while away: every device says its own again
        await _send_all(d, d.state_message())
    dirty, events, models_changed = d.view.take_dirty()
    now = d.now()
    if check_presence:
        with d.view.cond:
            names = list(d.view.devices)
        dirty |= {n for n in names if n not in d.rows or d.view.presence(n, now) != d.rows[n]["presence"]}
    if dirty:
        changed = [d.view.row(n, now) for n in sorted(dirty)]
        for r in changed:
            d.rows[r["device"]] = r
        await _send_all(d, {"type": "rows", "rows": changed, "counts": count(list(d.rows.values()))})
    if events:
        await _send_all(d, {"type": "events", "events": events})
    if models_changed:
        await _send_all(d, {"type": "models"})
    for ws in list(d.sockets):
        focused = d.focus.get(id(ws))
        if focused is None or focused[0] not in dirty or ws.closed:
            continue
        news = d.view.latest_since(*focused)
        if news["points"] or news["results"]:
            newest = max([p["ts"] for p in news["points"]] + [r.get("ts") or 0 for r in news["results"]])
            d.focus[id(ws)] = (focused[0], max(focused[1], float(newest)))
            await ws.send_json({"type": "device", "device": focused[0], **news})


def make_app(d: Dashboard) -> web.Application:
    app = web.Application()
    app[KEY] = d
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_get("/api/device/{device}", device)
    app.router.add_get("/api/models", models)
    app.router.add_post("/api/cmd", cmd)
    app.router.add_post("/api/deploy", deploy)
    app.router.add_post("/api/rollback", rollback)
    app.router.add_get("/ws", socket)
    app.router.add_get("/metrics", metrics)

    async def background(app: web.Application) -> Any:
        task = asyncio.create_task(push_loop(d))
        yield
        task.cancel()
        for ws in list(d.sockets):
            await ws.close()

    app.cleanup_ctx.append(background)
    return app
