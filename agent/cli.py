"""Entry points: `lepton-agent` (device side) and `lepton-fleet` (operator side)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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

    p = sub.add_parser("infer", help="run a model on images, folders, globs, videos, cameras or streams")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image, folder, glob, video, camera:N, /dev/videoN, csi:0, picamera2:N, rtsp://, http://")
    p.add_argument("--frames", type=_positive, help="stop each input after this many frames (cameras and "
                   "streams run until interrupted otherwise)")
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


def _open_sources(uris: list[str]) -> list[Any]:
    """A source per INPUT, all opened before any work starts; BadInput names the first that is wrong."""
    from agent.sources.base import open_source

    sources: list[Any] = []
    try:
        for uri in uris:
            source = open_source(uri)
            source.open()
            sources.append(source)
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


def _items(source: Any, limit: int | None, stall_s: float | None = None) -> Iterator[Any]:
    """Items of one source until it ends or `limit`; a frame that cannot be decoded comes as its BadInput."""
    from agent.sources.base import EndOfStream

    count, waited_since = 0, time.monotonic()
    while limit is None or count < limit:
        try:
            item = source.read(timeout=0.5)
        except EndOfStream:
            return
        except BadInput as exc:
            yield exc
            continue
        if item is None:  # a live source between frames (it reconnects by itself)
            if stall_s is not None and time.monotonic() - waited_since > stall_s:
                raise LeptonError(f"{getattr(source, 'name', source.uri)}: no frame for {stall_s:.0f} s")
            continue
        count, waited_since = count + 1, time.monotonic()
        yield item


def _cmd_infer(args: argparse.Namespace, out: TextIO) -> int:
    sources = _open_sources(args.inputs)
    try:
        return _infer(args, sources, out)
    finally:
        for source in sources:
            source.close()


def _infer(args: argparse.Namespace, sources: list[Any], out: TextIO) -> int:
    spec, inference = _inference(args)
    if inference.task.item_kind != "image":
        raise BadInput(f"{args.model}: task {inference.task.key!r} does not take images")
    model_ref = {"name": spec.name, "version": spec.version}
    failed = 0
    if args.format == "table":
        out.write(f"{'SOURCE':<32} {'FRAME':>5}  {'MS':>7}  RESULT\n")
    for source in sources:
        for item in _items(source, args.frames):
            if isinstance(item, BadInput):
                failed += 1
                print(f"lepton-agent: {item}", file=sys.stderr)
                continue
            try:
                result = inference.run(item.data)
            except BadInput as exc:
                failed += 1
                print(f"lepton-agent: {item.file or getattr(source, 'name', source.uri)}: {exc}", file=sys.stderr)
                continue
            line: dict[str, Any] = {"source": source.uri, "frame": item.index}
            if item.file is not None:
                line["file"] = item.file
            line.update(model=model_ref, latency_ms=inference.latency.as_dict(), **result)
            if args.format == "jsonl":
                out.write(json.dumps(line) + "\n")
            else:
                lat = inference.latency
                total = lat.pre + lat.invoke + lat.post
                name = item.file or source.uri
                out.write(f"{name[-32:]:<32} {item.index:>5}  {total:>7.2f}  {_summary(result)}\n")
            out.flush()
    return 2 if failed else 0


def _cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from agent.bench import bench

    sources = _open_sources(args.inputs) if args.inputs else []
    try:
        _, inference = _inference(args)
        items = []
        for source in sources:
            for item in _items(source, args.runs, stall_s=30.0):
                if isinstance(item, BadInput):
                    raise item
                items.append(item.data.copy())  # sources reuse their frame buffers
    finally:
        for source in sources:
            source.close()
    report = bench(inference, items, runs=args.runs, warmup=max(0, args.warmup))
    if args.format == "json":
        out.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            out.write(f"{key:<12} {value}\n")
    return 0


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
