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
from agent.fleet.samples import add_sample_commands
from agent.fleet.verbs import add_commands as add_delivery_commands

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


class _AgentVersion(argparse.Action):
    """`--version`: the package, and the interpreter that would run models here (LEPTON_BACKEND honoured)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version, the runtime backend and its version, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from agent.runtime import load_backend

        try:
            backend = load_backend()
            runtime = f"backend {backend.name} {backend.version}"
        except BadInput as exc:
            runtime = str(exc).split(" (", 1)[0]  # without the import errors
        print(f"{parser.prog} {__version__} ({runtime})")
        parser.exit()


def _runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", help="ai-edge-litert | tflite-runtime | tensorflow (default: first installed; "
                   "LEPTON_BACKEND overrides)")
    g.add_argument("--threads", type=_positive, help="interpreter threads (default: all cores)")
    g.add_argument("--no-xnnpack", action="store_true", help="run the builtin kernels without XNNPACK")
    g.add_argument("--delegate", help="delegate library, e.g. edgetpu (libedgetpu.so.1)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 3600 seconds")
    return value


def _audio_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("audio (wake word models; INPUT a .wav, - for raw 16 kHz PCM on stdin, mic: or mic:NAME)")
    g.add_argument("--refractory", type=_seconds, metavar="S",
                   help="seconds after a detection before the same wake word is reported again (default 2)")
    g.add_argument("--mic-backend", choices=("arecord", "sounddevice"), default="arecord",
                   help="how mic: inputs are captured (default arecord)")


def _stream_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network streams (rtsp://, http://, ...)")
    g.add_argument("--transport", choices=("tcp", "udp"), help="RTSP transport (default: FFmpeg's, TCP)")
    g.add_argument("--timeout", type=_seconds, metavar="S", default=10.0,
                   help="seconds a stream may take to open or to send the next frame (default 10); with --frames, "
                        "a stream silent for three times this ends the run")
    g.add_argument("--username", help="user name (instead of user@ in the URL)")
    cred = g.add_mutually_exclusive_group()
    cred.add_argument("--password-file", metavar="FILE", help="the password: first line of FILE (keep it out of "
                      "the URL, which shows in the process list)")
    cred.add_argument("--password-env", metavar="VAR", help="the password: environment variable VAR")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .tflite, or a manifest .json (ours or microWakeWord v2)")
    p.add_argument("--labels", metavar="FILE", help="labels, one per line (overrides the manifest's)")
    p.add_argument("--task", help="run as this task instead of the manifest's or the recognised one")


def _agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-agent", description="Lepton Edge Agent (device side)")
    parser.add_argument("--version", action=_AgentVersion)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="inputs, outputs, quantization, ops, size, task, int8 or not")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _runtime_options(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("infer", help="run a model on images, folders, globs, videos, cameras or streams")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image, folder, glob, video, camera:N, /dev/videoN, csi:0, picamera2:N, rtsp://, http://")
    p.add_argument("--frames", type=_positive, help="stop each input after this many frames (cameras and "
                   "streams run until interrupted otherwise)")
    p.add_argument("--threshold", type=_threshold, help="minimum score, 0..1")
    p.add_argument("--top-k", type=_positive, help="classes to report")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    _stream_options(p)
    _audio_options(p)
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

    p = model.add_parser("quantize", help="float model -> int8/dynamic/fp16 model and its manifest")
    p.add_argument("model", metavar="MODEL", help="a float .tflite, or our (or a microWakeWord) manifest .json")
    p.add_argument("--calib", nargs="+", metavar="INPUT", default=[],
                   help="calibration inputs: images, folders, globs, video files, .npy/.npz arrays, a pulled "
                        "dataset folder; WAV clips for a wake word model")
    p.add_argument("--scheme", choices=("int8", "dynamic", "fp16", "float32"), default="int8",
                   help="int8 (needs --calib), dynamic, fp16, or float32 (the rewritten float model)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .tflite to write (manifest: OUT .json)")
    p.add_argument("--labels", metavar="FILE", help="labels, one per line (overrides the manifest's)")
    p.add_argument("--limit", type=_positive, default=500, help="calibration samples at most (default 500)")
    p.add_argument("--no-fuse", action="store_true", help="keep standalone RELUs (default: fuse into producers)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _runtime_options(p)
    p.set_defaults(func=_cmd_quantize)

    p = model.add_parser("compare", help="size, latency, agreement and op profile of variants against a base")
    p.add_argument("models", nargs="+", metavar="MODEL", help="BASE then VARIANT... (.tflite or manifest .json)")
    p.add_argument("--eval", nargs="+", required=True, metavar="INPUT", dest="eval_inputs",
                   help="evaluation inputs: images, folders, globs, video files, a pulled samples folder; "
                        "WAV clips for a wake word BASE")
    p.add_argument("--runs", type=_positive, default=50, help="timed runs per model and thread count (default 50)")
    p.add_argument("--limit", type=_positive, default=1000, help="evaluation items at most (default 1000)")
    p.add_argument("--task", help="run every model as this task instead of its manifest's or the recognised one")
    p.add_argument("--write-manifest", metavar="PATH", help="write BASE's manifest with the variants and their "
                   "measured figures (all files beside PATH)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _runtime_options(p)
    p.set_defaults(func=_cmd_compare)

    from agent.fleet.report import add_report

    add_report(model)

    from agent.fleet.live import add_connection_options

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
    p.add_argument("action", metavar="ACTION", help="ping, status, start, stop, configure, reload, bench, tune")
    p.add_argument("args", nargs="?", metavar="JSON", help='arguments, e.g. \'{"pipeline": "cam", "threshold": 0.6}\'')
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for replies (default 10)")
    p.add_argument("--id", help="command id (default: a fresh one); repeat an id to test idempotency")
    p.add_argument("--format", choices=("pretty", "json"), default="pretty")
    add_connection_options(p)
    p.set_defaults(func=_cmd_fleet_cmd)
    add_delivery_commands(sub)
    add_sample_commands(sub)
    from agent.fleet.retire import add_retire_command

    add_retire_command(sub)
    from agent.fleet.dashboard import add_command as add_dashboard_command

    add_dashboard_command(sub)
    return parser


# -- commands -------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    from agent.infer import load_model
    from agent.inspect import describe, format_text

    spec, model = load_model(args)
    info = describe(model, spec)
    out.write((json.dumps(info, indent=2) if args.format == "json" else format_text(info)) + "\n")
    return 0


def _cmd_infer(args: argparse.Namespace, out: TextIO) -> int:
    from agent.infer import infer_command

    return infer_command(args, out)


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from agent.infer import bench_command

    return bench_command(args, out)


def _cmd_quantize(args: argparse.Namespace, out: TextIO) -> int:
    if args.delegate:
        raise BadInput("--delegate: quantize runs on the CPU runtime")
    from agent.compress.quantize import quantize_model

    result = quantize_model(args.model, args.output, scheme=args.scheme, calib=args.calib, labels=args.labels,
                            threads=args.threads, backend=args.backend, limit=args.limit, fuse=not args.no_fuse)
    if args.format == "json":
        out.write(json.dumps(result.as_dict()) + "\n")
    else:
        out.write(f"wrote {result.path} ({result.size} bytes, {result.size / result.float32_size:.1%} of the "
                  f"float32 model's {result.float32_size}; {result.scheme}, {result.calibration_items} "
                  f"calibration items) and {result.manifest_path}\n")
    return 0


def _cmd_compare(args: argparse.Namespace, out: TextIO) -> int:
    from agent.compress.compare import compare, format_table, manifest_task, write_variants_manifest

    if len(args.models) < 2:
        raise BadInput("compare needs BASE and at least one VARIANT")
    task = manifest_task(args.models[0], args.task, args.backend) if args.write_manifest else None
    report = compare(args.models[0], args.models[1:], args.eval_inputs, runs=args.runs, threads=args.threads,
                     backend=args.backend, xnnpack=not args.no_xnnpack, delegate=args.delegate, limit=args.limit,
                     task=args.task)
    if args.write_manifest:
        write_variants_manifest(report, args.write_manifest, task)
    out.write((json.dumps(report) if args.format == "json" else format_table(report)) + "\n")
    return 0



def _cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from agent.daemon import run

    return run(args.config)


def _cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    from agent.config_load import load
    from agent.daemon import check_delivery, check_link, check_pipelines
    from agent.sources.capture import redact

    eff = load(args.config)
    check_pipelines(eff)
    check_link(eff)
    check_delivery(eff)
    described = eff.describe()
    for pipeline in described.get("pipelines", []):
        pipeline["source"] = redact(pipeline["source"])  # a camera password in the URI is not shown
    out.write(json.dumps(described, indent=2) + "\n")
    return 0


def _cmd_profile(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from agent.config_load import profile_report

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
    from agent.fleet.live import watch

    return watch(args, out)


def _cmd_fleet_cmd(args: argparse.Namespace, out: TextIO) -> int:
    from agent.fleet.live import cmd

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
