"""A device that deploys one model and may SIGKILL itself on the way (run by tests/test_delivery_crash.py).

    python tests/delivery_worker.py PORT PREFIX STORE KEYS_JSON NAME VERSION [--kill-at-byte K | --kill-at POINT]
    python tests/delivery_worker.py --serve

`--serve` imports everything once, then for each line of JSON arguments on stdin
forks a fresh device process that runs them (a new process each time, as after a
real restart, without paying ~0.5 s of imports per run), and after it ends prints
`{"exit": code}` (negative: killed by that signal).

Prints one JSON line `{"first_write": offset}` when it first writes to the partial
file, and on success one line with the final state. `--kill-at-byte K` writes the
file up to byte K (exclusive) and dies with SIGKILL; `--kill-at POINT` dies at a
named failpoint (`after_verify`, `before_rename`, `after_rename`, `after_activate`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent.delivery import failpoints
from agent.delivery.service import DeliveryService, DeployRequest
from agent.delivery.signed_manifest import DevicePolicy
from agent.delivery.signing import TrustedKeys
from agent.delivery.store import ModelStore
from agent.mqtt.client import BrokerAddress, PahoLink
from agent.mqtt.topics import FleetTopics
from agent.runtime import load_backend
from agent.version import parse_version


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    for name in ("port", "prefix", "store", "keys", "name", "version"):
        p.add_argument(name)
    p.add_argument("--kill-at-byte", type=int)
    p.add_argument("--kill-at")
    args = p.parse_args(argv)
    seen_write = False

    def handler(point: str, ctx: dict[str, Any]) -> None:
        nonlocal seen_write
        if point == "part.write":
            offset, data = ctx["offset"], ctx["data"]
            if not seen_write:
                seen_write = True
                print(json.dumps({"first_write": offset}), flush=True)
            k = args.kill_at_byte
            if k is not None and (offset < k <= offset + len(data) or k == offset == 0):
                os.pwrite(ctx["part"].fd, bytes(data[: k - offset]), offset)
                _die()
        elif point == args.kill_at:
            _die()

    failpoints.handler = handler
    link = PahoLink(BrokerAddress("127.0.0.1", int(args.port), False)).start()
    store = ModelStore(Path(args.store))
    trusted = TrustedKeys.from_config(json.loads(args.keys))
    svc = DeliveryService(link, store, trusted, DevicePolicy(backend=load_backend().name), device_id="crash",
                          topics=FleetTopics(args.prefix))
    svc.recover()
    final = svc.deploy(DeployRequest(args.name, parse_version(args.version)))
    print(json.dumps(final.payload()), flush=True)
    link.close()
    return 0


def serve() -> int:
    load_backend()  # import the interpreter once, in the parent
    for line in sys.stdin:
        argv = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = main(argv)
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"exit": code}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
