"""`lepton-agent infer` and `bench`: a model over files, cameras, streams or audio, from the command line.

Each input is driven by the same item loop as the daemon's pipelines (`agent.loop.run_items`):
a frame or chunk that cannot be decoded or run is reported on stderr and the next one goes on
(exit 2 at the end); results go to stdout as a table or JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from agent.errors import BadInput, LeptonError


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from agent.manifest import load_spec
    from agent.runtime import Model

    spec = load_spec(args.model, getattr(args, "labels", None))
    model = Model(spec.path, backend=args.backend, threads=args.threads, xnnpack=not args.no_xnnpack,
                  delegate=args.delegate)
    return spec, model


def _inference(args: argparse.Namespace) -> Any:
    from agent.tasks import Inference, create_task

    spec, model = load_model(args)
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


def _is_audio_input(arg: str) -> bool:
    return arg in ("-", "mic") or arg.startswith("mic:") or arg.lower().endswith((".wav", ".wave"))


def _audio_run(args: argparse.Namespace) -> bool:
    """Wake word models and audio inputs take the audio path, which never imports OpenCV."""
    from agent.manifest import load_spec
    from agent.tasks.task import RUNNER_MODULES

    if args.task is not None:
        return args.task in RUNNER_MODULES
    if any(_is_audio_input(i) for i in args.inputs):
        return True
    return load_spec(args.model).task in RUNNER_MODULES


def _audio_runner(args: argparse.Namespace) -> tuple[Any, Any]:
    from agent.tasks import create_runner
    from agent.tasks.wakeword import MODEL_OPTIONS

    # Streaming audio models are tiny (see MODEL_OPTIONS; --no-xnnpack: EXACT_MODEL_OPTIONS).
    args.threads = args.threads or MODEL_OPTIONS["threads"]
    spec, model = load_model(args)
    post: dict[str, Any] = {}
    if getattr(args, "threshold", None) is not None:
        post["threshold"] = args.threshold
    if getattr(args, "refractory", None) is not None:
        post["params"] = {**spec.postprocess.params, "refractory_s": args.refractory}
    if post:
        spec = spec.model_copy(update={"postprocess": spec.postprocess.model_copy(update=post)})
    runner = create_runner(model, spec, args.task)
    if runner.item_kind != "audio":
        raise BadInput(f"{args.model}: task {args.task or spec.task or runner.item_kind!r} does not take audio")
    return spec, runner


def _infer_audio(args: argparse.Namespace, out: TextIO) -> int:
    from agent.audio.stream import AUDIO_SOURCE_MODULES
    from agent.loop import run_items
    from agent.sources.source import EndOfStream, open_source

    spec, runner = _audio_runner(args)
    model_ref = {"name": spec.name, "version": spec.version}
    failed = 0
    if args.format == "table":
        out.write(f"{'SOURCE':<32} {'T':>8}  RESULT\n")
    for uri in args.inputs:
        try:
            options = {"backend": args.mic_backend} if uri.startswith("mic:") else {}
            source = open_source(uri, options, modules=AUDIO_SOURCE_MODULES)
            source.open()
        except BadInput as exc:
            failed += 1
            print(f"lepton-agent: {exc}", file=sys.stderr)
            continue
        runner.reset()

        def emit(item: Any, results: list[dict[str, Any]], runner: Any, uri: str = uri) -> None:
            for result in results:
                line = {"source": uri, "t": result["t"], "model": model_ref,
                        "latency_ms": runner.latency.as_dict(), **result}
                if args.format == "jsonl":
                    out.write(json.dumps(line) + "\n")
                else:
                    out.write(f"{uri[-32:]:<32} {result['t']:>8.2f}  {result['label']} {result['score']:.3f}\n")
                out.flush()

        try:
            with contextlib.suppress(EndOfStream):
                run_items(source, runner, emit, timeout=0.5)
        finally:
            source.close()
        problem = getattr(source, "problem", None)
        if problem:
            failed += 1
            print(f"lepton-agent: {problem}", file=sys.stderr)
    return 2 if failed else 0


def stream_source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The source options of network stream inputs, from `--transport`, `--timeout` and the credentials."""
    options: dict[str, Any] = {"timeout": args.timeout}
    for key in ("transport", "username", "password_file", "password_env"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return options


def shown(source: Any) -> str:
    """How a source is named in output: never with its password."""
    from agent.sources.capture import redact

    return str(getattr(source, "name", None) or redact(source.uri))


class _Stall:
    """Ends a run whose live source has sent nothing for `seconds` (None: never)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.last = time.monotonic()
        self.fired = False

    def saw(self) -> None:
        self.last = time.monotonic()

    def __call__(self) -> bool:
        if self.seconds is not None and time.monotonic() - self.last > self.seconds:
            self.fired = True
        return self.fired


def _open_sources(uris: list[str], stream_options: dict[str, Any] | None = None) -> list[Any]:
    """A source per INPUT, all opened before any work starts; BadInput names the first that is wrong."""
    from agent.sources.network import network_source
    from agent.sources.source import open_source

    sources: list[Any] = []
    try:
        for uri in uris:
            source = open_source(uri, stream_options if stream_options and network_source(uri) else None)
            source.open()
            sources.append(source)
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


def _items(source: Any, limit: int | None, stall_s: float | None = None) -> Iterator[Any]:
    """Items of one source until it ends or `limit`; a frame that cannot be decoded comes as its BadInput."""
    from agent.sources.source import EndOfStream

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
                raise LeptonError(f"{shown(source)}: no frame for {stall_s:g} s")
            continue
        count, waited_since = count + 1, time.monotonic()
        yield item


def infer_command(args: argparse.Namespace, out: TextIO) -> int:
    """`lepton-agent infer`: results per frame (images) or per detection (audio), one line each."""
    if _audio_run(args):
        return _infer_audio(args, out)
    sources = _open_sources(args.inputs, stream_source_options(args))
    try:
        return _infer(args, sources, out)
    finally:
        for source in sources:
            source.close()


def _infer(args: argparse.Namespace, sources: list[Any], out: TextIO) -> int:
    from agent.loop import run_items
    from agent.sources.source import EndOfStream

    spec, inference = _inference(args)
    if inference.task.item_kind != "image":
        raise BadInput(f"{args.model}: task {inference.task.key!r} does not take images")
    model_ref = {"name": spec.name, "version": spec.version}
    failed = 0
    if args.format == "table":
        out.write(f"{'SOURCE':<32} {'FRAME':>5}  {'MS':>7}  RESULT\n")
    for source in sources:
        name = shown(source)
        # With --frames the run has an end: a live source that goes silent must not hold it forever.
        stall = _Stall(3 * source.settings.timeout if args.frames and hasattr(source, "settings") else None)

        def bad(exc: BadInput, item: Any, name: str = name, stall: _Stall = stall) -> None:
            nonlocal failed
            stall.saw()
            failed += 1
            where = "" if item is None else f"{item.file or name}: "  # a read error names its file itself
            print(f"lepton-agent: {where}{exc}", file=sys.stderr)

        def emit(item: Any, results: list[dict[str, Any]], inference: Any, name: str = name,
                 stall: _Stall = stall) -> None:
            stall.saw()
            (result,) = results  # an Inference: one result per frame
            line: dict[str, Any] = {"source": name, "frame": item.index}
            if item.file is not None:
                line["file"] = item.file
            line.update(model=model_ref, latency_ms=inference.latency.as_dict(), **result)
            if args.format == "jsonl":
                out.write(json.dumps(line) + "\n")
            else:
                lat = inference.latency
                total = lat.pre + lat.invoke + lat.post
                shown_as = item.file or name
                out.write(f"{shown_as[-32:]:<32} {item.index:>5}  {total:>7.2f}  {_summary(result)}\n")
            out.flush()

        with contextlib.suppress(EndOfStream):
            run_items(source, inference, emit, timeout=0.5, limit=args.frames, on_bad=bad, stopping=stall)
        if stall.fired:
            raise LeptonError(f"{name}: no frame for {stall.seconds:g} s")
    return 2 if failed else 0


def _bench_audio(args: argparse.Namespace, out: TextIO) -> int:
    import numpy as np

    from agent.audio.realtime import bench_audio
    from agent.audio.stream import AUDIO_SOURCE_MODULES
    from agent.sources.audio import MicSource
    from agent.sources.source import EndOfStream, open_source

    _, runner = _audio_runner(args)
    clips = []
    for uri in args.inputs:
        source = open_source(uri, {}, modules=AUDIO_SOURCE_MODULES)
        if isinstance(source, MicSource):
            raise BadInput(f"{uri}: bench takes audio files, not a live microphone")
        source.open()
        chunks = []
        try:
            while True:
                item = source.read(1.0)
                if item is not None:
                    chunks.append(item.data)
        except EndOfStream:
            pass
        finally:
            source.close()
        if getattr(source, "problem", None):
            raise BadInput(str(getattr(source, "problem", "")))
        if chunks:
            clips.append(np.concatenate(chunks))
    report = bench_audio(runner, clips, runs=args.runs, warmup=max(0, args.warmup))
    if args.format == "json":
        out.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            out.write(f"{key:<16} {value}\n")
    return 0


def bench_command(args: argparse.Namespace, out: TextIO) -> int:
    """`lepton-agent bench`: raw invoke against the whole per-item path, or an audio model in real time."""
    if _audio_run(args):
        return _bench_audio(args, out)
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
