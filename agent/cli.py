"""Entry points: `lepton-agent` (device side) and `lepton-fleet` (operator side)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from agent import __version__
from agent.errors import BadInput, LeptonError

logger = logging.getLogger("agent")


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", help="ai-edge-litert | tflite-runtime | tensorflow (default: first installed; "
                   "LEPTON_BACKEND overrides)")
    g.add_argument("--threads", type=_positive, help="interpreter threads (default: all cores)")
    g.add_argument("--no-xnnpack", action="store_true", help="run the builtin kernels without XNNPACK")
    g.add_argument("--delegate", help="delegate library, e.g. edgetpu (libedgetpu.so.1)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .tflite, or a manifest .json (ours or microWakeWord v2)")
    p.add_argument("--labels", metavar="FILE", help="labels, one per line (overrides the manifest's)")
    p.add_argument("--task", help="run as this task instead of the manifest's or the recognised one")


def _agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-agent", description="Lepton Edge Agent (device side)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="inputs, outputs, quantization, ops, size, task, int8 or not")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _runtime_options(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("infer", help="run a model on images, folders, globs or video files")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--threshold", type=_threshold, help="minimum score, 0..1")
    p.add_argument("--top-k", type=_positive, help="classes to report")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    _runtime_options(p)
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("bench", help="raw invoke and whole-pipeline timings on this machine")
    _model_options(p)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs to run (default: a synthetic 640x480 frame)")
    p.add_argument("--runs", type=_positive, default=100, help="timed runs (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--format", choices=("json", "table"), default="json")
    _runtime_options(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("run", help="the daemon: pipelines, MQTT link, commands (until SIGTERM)")
    p.add_argument("--config", metavar="PATH", help="agent.toml (default: LEPTON_CONFIG, else /etc/lepton/agent.toml)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate the config and profile; print the effective settings")
    p.add_argument("--config", metavar="PATH", help="agent.toml (default: LEPTON_CONFIG, else /etc/lepton/agent.toml)")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("profile", help="the detected device class and why")
    p.add_argument("--config", metavar="PATH", help="also apply this agent.toml (its profile choice and overrides)")
    p.add_argument("--root", metavar="DIR", help="read /proc under DIR instead of / (default: the config's "
                   "telemetry.root)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_cmd_profile)
    return parser


def _fleet_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-fleet", description="Lepton Edge fleet tools (operator side)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = sub.add_parser("model", help="model tools").add_subparsers(dest="model_command", required=True,
                                                                        metavar="ACTION")
    p = model.add_parser("inspect", help="the agent's inspect, for operators")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _runtime_options(p)
    p.set_defaults(func=_cmd_inspect)

    from agent.fleet import add_connection_options

    p = sub.add_parser("watch", help="print results (and status) as they arrive")
    p.add_argument("device", nargs="?", metavar="DEVICE", help="one device (default: all)")
    p.add_argument("--status", action="store_true", help="also show status changes")
    p.add_argument("--format", choices=("table", "jsonl"), default="table")
    p.add_argument("--count", type=_positive, help="exit after this many results (exit 1 if they do not come)")
    p.add_argument("--seconds", type=float, help="exit after this long")
    add_connection_options(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("cmd", help="send a command to a device, group:G or all, and print the reply")
    p.add_argument("target", metavar="TARGET", help="DEVICE, group:NAME or all")
    p.add_argument("action", metavar="ACTION", help="ping, status, start, stop, configure, reload, bench")
    p.add_argument("args", nargs="?", metavar="JSON", help='arguments, e.g. \'{"pipeline": "cam", "threshold": 0.6}\'')
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for replies (default 10)")
    p.add_argument("--id", help="command id (default: a fresh one); repeat an id to test idempotency")
    p.add_argument("--format", choices=("pretty", "json"), default="pretty")
    add_connection_options(p)
    p.set_defaults(func=_cmd_fleet_cmd)
    return parser


# -- commands -------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from agent.manifest import load_spec
    from agent.runtime import Model

    spec = load_spec(args.model, getattr(args, "labels", None))
    model = Model(spec.path, backend=args.backend, threads=args.threads, xnnpack=not args.no_xnnpack,
                  delegate=args.delegate)
    return spec, model


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    from agent.inspect import describe, format_text

    spec, model = _load(args)
    info = describe(model, spec)
    out.write((json.dumps(info, indent=2) if args.format == "json" else format_text(info)) + "\n")
    return 0


def _inference(args: argparse.Namespace) -> Any:
    from agent.tasks import Inference, create_task

    spec, model = _load(args)
    post: dict[str, Any] = {}
    if getattr(args, "threshold", None) is not None:
        post["threshold"] = args.threshold
    if getattr(args, "top_k", None) is not None:
        post["top_k"] = args.top_k
    if post:
        spec = spec.model_copy(update={"postprocess": spec.postprocess.model_copy(update=post)})
    task = create_task(model, spec, args.task)
    return spec, Inference(model, task)


def _summary(result: dict[str, Any]) -> str:
    if "classes" in result:
        return ", ".join(f"{c['label']} {c['score']:.3f}" for c in result["classes"]) or "-"
    if "detections" in result:
        return ", ".join(f"{d['label']} {d['score']:.2f}" for d in result["detections"]) or "-"
    if "outputs" in result:
        return "; ".join(f"{o['name']}{o['shape']}" for o in result["outputs"])
    return json.dumps(result)


def _cmd_infer(args: argparse.Namespace, out: TextIO) -> int:
    from agent.sources.files import iter_frames, resolve_inputs

    inputs = resolve_inputs(args.inputs)
    spec, inference = _inference(args)
    if inference.task.item_kind != "image":
        raise BadInput(f"{args.model}: task {inference.task.key!r} does not take images")
    model_ref = {"name": spec.name, "version": spec.version}
    failed = 0
    if args.format == "table":
        out.write(f"{'SOURCE':<32} {'FRAME':>5}  {'MS':>7}  RESULT\n")
    for frame in iter_frames(inputs):
        if frame.image is None:
            failed += 1
            print(f"lepton-agent: {frame.error}", file=sys.stderr)
            continue
        try:
            result = inference.run(frame.image)
        except BadInput as exc:
            failed += 1
            print(f"lepton-agent: {frame.file or frame.source}: {exc}", file=sys.stderr)
            continue
        line: dict[str, Any] = {"source": frame.source, "frame": frame.index}
        if frame.file is not None:
            line["file"] = frame.file
        line.update(model=model_ref, latency_ms=inference.latency.as_dict(), **result)
        if args.format == "jsonl":
            out.write(json.dumps(line) + "\n")
        else:
            lat = inference.latency
            total = lat.pre + lat.invoke + lat.post
            name = frame.file or frame.source
            out.write(f"{name:<32} {frame.index:>5}  {total:>7.2f}  {_summary(result)}\n")
        out.flush()
    return 2 if failed else 0


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from agent.bench import bench
    from agent.sources.files import iter_frames, resolve_inputs

    inputs = resolve_inputs(args.inputs) if args.inputs else []
    _, inference = _inference(args)
    items = []
    for frame in iter_frames(inputs):
        if frame.image is None:
            raise BadInput(frame.error or f"{frame.source}: cannot decode")
        items.append(frame.image)
    report = bench(inference, items, runs=args.runs, warmup=max(0, args.warmup))
    if args.format == "json":
        out.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            out.write(f"{key:<12} {value}\n")
    return 0


def _cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from agent.daemon import run

    return run(args.config)


def _cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    from agent.config import load
    from agent.daemon import check_link, check_pipelines

    eff = load(args.config)
    check_pipelines(eff)
    check_link(eff)
    out.write(json.dumps(eff.describe(), indent=2) + "\n")
    return 0


def _cmd_profile(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from agent.profiles import profile_report

    report = profile_report(config=args.config, root=Path(args.root) if args.root else None)
    if args.format == "json":
        out.write(json.dumps(report, indent=2) + "\n")
        return 0
    out.write(f"profile  {report['profile']}  ({report['description']})\n")
    out.write(f"why      {report['reason']}\n")
    for key, value in report["evidence"].items():
        out.write(f"  {key.replace('_', ' ')}: {value if value is not None else '(not there)'}\n")
    skip = {"profile", "description", "reason", "evidence", "match", "name"}
    for key, value in report.items():
        if key not in skip:
            out.write(f"{key:<22} {value}\n")
    return 0


def _cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet import watch

    return watch(args, out)


def _cmd_fleet_cmd(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet import cmd

    return cmd(args, out)


# -- entry points ---------------------------------------------------------------


def _main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        return func(args, sys.stdout)
    except BadInput as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except LeptonError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`); nothing more to say.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


def agent_main(argv: Sequence[str] | None = None) -> int:
    return _main(_agent_parser(), argv)


def fleet_main(argv: Sequence[str] | None = None) -> int:
    return _main(_fleet_parser(), argv)
