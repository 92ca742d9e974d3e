"""`lepton-fleet dashboard`: one process, one MQTT connection, a live web page for the fleet (DESIGN §3).

`add_command()` registers the verb; aiohttp (the `dashboard` extra) is imported only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from agent.errors import BadInput

DEFAULT_LISTEN = "127.0.0.1:8420"


def add_command(sub: Any) -> None:
    from agent.fleet.live import add_connection_options

    p = sub.add_parser("dashboard", help="a live web page for the fleet: hot list, device view, models, actions")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="address to serve on (default %(default)s; any other than loopback needs --token-file; "
                        "port 0: a free one)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="the token every action (command, deploy, rollback) needs, first line (default: a fresh "
                        "random one, printed in the page's address)")
    p.add_argument("--key", type=Path, metavar="FILE",
                   help="the release signing key; without it deploy and rollback are refused (read-only)")
    add_connection_options(p)
    p.set_defaults(func=cmd_dashboard)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise BadInput(f"--listen {text!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BadInput(f"--token-file {path}: cannot read ({exc.strerror})") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise BadInput(f"--token-file {path}: the first line must hold a token of 16 characters or more")
    return token


def cmd_dashboard(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from aiohttp import web
    except ImportError:
        raise BadInput("the dashboard needs aiohttp: pip install 'lepton-agent[dashboard]'") from None

    host, port = parse_listen(args.listen)
    if not is_loopback(host) and args.token_file is None:
        raise BadInput(f"--listen {args.listen}: not a loopback address, so actions need a token: give --token-file")
    token = read_token(args.token_file) if args.token_file is not None else secrets.token_urlsafe(18)
    if args.key is not None:
        from agent.delivery.signing import load_private_key

        load_private_key(args.key)  # a wrong file is said now, not at the first deploy
    from agent.fleet.dashboard.server import Dashboard, make_app
    from agent.fleet.dashboard.state import DashboardView
    from agent.fleet.live import broker_url, open_link
    from agent.fleet.verbs import _topics

    _audit_to_stderr()
    topics = _topics(args)
    link = open_link(args)
    try:
        view = DashboardView(link, topics)
        view.sync()
        view.ask_presence()
        dashboard = Dashboard(view, link, token, can_deploy=args.key is not None, broker=broker_url(args))
        return asyncio.run(_serve(web, make_app(dashboard), host, port, out, args, token))
    finally:
        link.close()


async def _serve(web: Any, app: Any, host: str, port: int, out: TextIO, args: argparse.Namespace,
                 token: str) -> int:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise BadInput(f"--listen {args.listen}: cannot listen ({exc.strerror or exc})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the address is out: whoever read it may stop us
        loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    address = f"http://{shown}:{bound[1]}/"
    if args.token_file is None:
        out.write(f"dashboard {address}#token={token}\n")
    else:
        out.write(f"dashboard {address} (actions need the token in {args.token_file})\n")
    if args.key is None:
        out.write("read-only for deployments: started without --key\n")
    out.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def _audit_to_stderr() -> None:
    """Every action (and every refused one) is one line on stderr, whatever -v says: the audit trail."""
    audit = logging.getLogger("lepton.dashboard.audit")
    if not audit.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s audit: %(message)s"))
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)
        audit.propagate = False
