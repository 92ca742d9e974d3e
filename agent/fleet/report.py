"""`lepton-fleet model report NAME`: which variant of a model each class of board runs, and why, as the
boards measured it themselves (agent.tune, docs/tuning.md).

The report asks every device of the target (`--to`, default all) for its `status` and keeps the
tune tables of the pipelines running model NAME, grouped by the device's profile (its class).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any, TextIO

from agent.errors import BadInput


def add_report(model: Any) -> None:
    """Register `model report` on the fleet's `model` sub-parsers."""
    from agent.fleet.live import add_connection_options

    p = model.add_parser("report", help="the variant each class of board runs and why, measured on the boards")
    p.add_argument("name", metavar="NAME", help="the model name (its manifest's `name`)")
    p.add_argument("--to", default="all", metavar="TARGET", help="a device id, group:NAME, or all (default)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to collect replies (a group or all answers over time; default 5)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    add_connection_options(p)
    p.set_defaults(func=report)


def gather(name: str, replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The report from `status` replies: per device class, per device, its tune tables of model `name`."""
    classes: dict[str, dict[str, Any]] = {}
    without: list[str] = []
    for reply in replies:
        status = reply.get("result") if reply.get("ok") else None
        if not isinstance(status, dict):
            continue
        tables = [t for t in (status.get("tune") or {}).values()
                  if isinstance(t, dict) and (t.get("model") or {}).get("name") == name]
        runs_it = any((p.get("model") or {}).get("name") == name for p in status.get("pipelines") or [])
        if not tables:
            if runs_it:
                without.append(reply["device"])
            continue
        group = classes.setdefault(str(status.get("profile")), {"devices": {}, "chosen": collections.Counter()})
        group["devices"][reply["device"]] = tables
        for t in tables:
            group["chosen"][t.get("chosen") or "(base)"] += 1
    return {"model": name, "classes": {k: {"devices": v["devices"], "chosen": dict(v["chosen"])}
                                       for k, v in sorted(classes.items())},
            "not_tuned": sorted(without), "devices_asked": len(replies)}


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_text(data: dict[str, Any]) -> str:
    lines = [f"model {data['model']}: {sum(len(c['devices']) for c in data['classes'].values())} device(s) tuned, "
             f"{len(data['classes'])} class(es)"]
    for cls, group in data["classes"].items():
        chosen = ", ".join(f"{k} x{n}" for k, n in sorted(group["chosen"].items()))
        lines.append(f"\nCLASS {cls}: runs {chosen}")
        for device, tables in sorted(group["devices"].items()):
            for t in tables:
                b = t["budget"]
                lines.append(f"  {device} pipeline {t['pipeline']}: threads {t['threads']}, level {t['level']}, "
                             f"budget p95 ≤ {b['latency_budget_ms']:g} ms, agreement ≥ {b['min_agreement']:g}"
                             + (f", RSS ≤ {b['max_rss_mb']:g} MB" if b.get("max_rss_mb") else "")
                             + f" ({t['trigger']})")
                lines.append(f"    {'VARIANT':36} {'P50 ms':>8} {'P95 ms':>8} {'AGREE':>6} {'RSS MB':>7}  MISSES")
                for r in t["table"]:
                    mark = "*" if r["chosen"] else " "
                    lines.append(f"  {mark} {r['file']:36} {_num(r['p50_ms'], '8.2f')} {_num(r['p95_ms'], '8.2f')} "
                                 f"{_num(r['agreement'], '6.2f')} {_num(r['rss_mb'], '7.1f')}  "
                                 f"{', '.join(r['misses']) or '-'}{'  ' + r['error'] if r.get('error') else ''}")
                lines.append(f"    why: {t['why']}")
    if data["not_tuned"]:
        lines.append(f"\nrunning it, not tuned (no budget or no variants): {', '.join(data['not_tuned'])}")
    return "\n".join(lines)


def report(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet.live import ask

    if not args.timeout > 0:
        raise BadInput("--timeout: must be more than 0")
    replies = ask(args, args.to, "status", {}, args.timeout)
    data = gather(args.name, replies)
    if not data["classes"]:
        print(f"lepton-fleet: no device of {args.to} reported a tune of model {args.name} "
              f"({len(replies)} answered within {args.timeout:g} s)", file=sys.stderr)
        return 1
    out.write((json.dumps(data) if args.format == "json" else format_text(data)) + "\n")
    return 0
