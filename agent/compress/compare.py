"""`lepton-fleet model compare BASE VARIANT... --eval INPUTS...`: measured, never assumed.

For BASE and each VARIANT on this machine and runtime:

- size, and its ratio to BASE;
- precision (float32, fp16, dynamic, int8, mixed), read from the tensors;
- raw invoke and whole-pipeline latency (p50/p95) at 1 thread and at N, measured
  side by side: every timed round runs each model once, in rotating order, so all see
  the same machine load; ratios to BASE;
- agreement with BASE on the evaluation inputs, from the tasks' own results
  (`agent.compress.agreement`), and the signal-to-noise ratio of every raw output
  against BASE's (task-independent: it works before a model's decoder exists);
- an op profile: how many partitions the delegate (XNNPACK) made and which ops it left
  to the builtin kernels. An int8 model can be slower than its float version when its
  ops fall off the fast path; this says which.

A bare `.tflite` variant is run like BASE (same task, labels, decoder settings and
preprocessing, with BASE's normalisation made explicit); a variant with its own manifest
is run by its manifest. Only a runtime is needed, so this works on both lanes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench import percentiles
from agent.compress import agreement as agree
from agent.compress.atomic import write_together
from agent.errors import BadInput
from agent.manifest import Manifest, ModelSpec, load_spec
from agent.runtime import Model, load_backend
from agent.tasks.task import Inference, create_task, recognise

_INTEGER_ACTIVATIONS = frozenset({"int8", "uint8", "int16"})


@dataclass
class Contender:
    """One model in the comparison and what was measured for it."""

    arg: str
    spec: ModelSpec
    role: str
    results: list[list[dict[str, Any]]] = field(default_factory=list)
    signal_power: list[float] = field(default_factory=list)
    noise_power: list[float] = field(default_factory=list)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def precision(model: Model) -> str:
    """What the model computes in, from its tensors' dtypes."""
    dtypes = model.tensor_dtypes()
    produced = {t for op in model.ops for t in op.outputs}
    graph_inputs = {t.index for t in model.inputs}
    constants = {i for op in model.ops for i in op.inputs if i >= 0 and i not in produced and i not in graph_inputs}
    weights = {dtypes[i].name for i in constants if i in dtypes}
    activations = {dtypes[t].name for t in produced if t in dtypes}
    float_ops = model.float_ops()
    if "float16" in weights:
        return "fp16"
    if not float_ops and activations & _INTEGER_ACTIVATIONS:
        return "int16x8" if "int16" in activations else "int8"
    if "int8" in weights and float_ops:
        return "mixed" if activations & _INTEGER_ACTIVATIONS else "dynamic"
    return "float32"


def _like_base(variant: ModelSpec, base: ModelSpec, base_model: Model) -> ModelSpec:
    """A bare .tflite variant is driven as BASE is, with BASE's normalisation spelled out."""
    if variant.manifest is not None or variant.micro is not None:
        return variant
    info = base_model.inputs[0] if base_model.inputs else None
    normalize = base.preprocess.normalize
    if normalize is None and info is not None:
        normalize = "quantization" if info.quantized else "mean_std"
    return variant.model_copy(update={
        "task": base.task,
        "labels": base.labels,
        "preprocess": base.preprocess.model_copy(update={"normalize": normalize}),
        "postprocess": base.postprocess,
    })


def _eval_items(inputs: list[str], limit: int) -> tuple[list[np.ndarray[Any, Any]], list[str | None]]:
    """The evaluation frames, and for each the reason it was captured for (a pulled dataset folder's
    images carry one; other inputs None)."""
    from agent.samples.dataset import reasoned_inputs
    from agent.sources.files import decoded_frames

    items: list[np.ndarray[Any, Any]] = []
    reasons: list[str | None] = []
    pairs = reasoned_inputs(inputs)
    try:
        if all(reason is None for _, reason in pairs):
            uris: list[tuple[list[str], str | None]] = [([uri for uri, _ in pairs], None)]
        else:
            uris = [([uri], reason) for uri, reason in pairs]
        for group, reason in uris:
            for frame in decoded_frames(group):
                items.append(frame)
                reasons.append(reason)
                if len(items) >= limit:
                    break
            if len(items) >= limit:
                break
    except BadInput as exc:
        raise BadInput(f"--eval {exc}") from None
    if not items:
        raise BadInput(f"--eval {' '.join(inputs)}: no evaluation items")
    return items, reasons


def _build(spec: ModelSpec, backend: str | None, threads: int, xnnpack: bool,
           delegate: str | None, task: str | None) -> Inference:
    model = Model(spec.path, backend=backend, threads=threads, xnnpack=xnnpack, delegate=delegate)
    inference = Inference(model, create_task(model, spec, task))
    if inference.item_kind != "image":
        raise BadInput(f"{spec.manifest_path or spec.path}: task {inference.task.key!r} takes "
                       f"{inference.item_kind} items; compare evaluates images and video frames for now")
    return inference


def compare(
    base_arg: str,
    variant_args: list[str],
    eval_inputs: list[str],
    *,
    runs: int = 50,
    threads: int | None = None,
    backend: str | None = None,
    xnnpack: bool = True,
    delegate: str | None = None,
    limit: int = 1000,
    task: str | None = None,
) -> dict[str, Any]:
    """Measure BASE and every VARIANT side by side; the JSON report (see the module docstring)."""
    base_spec = load_spec(base_arg)
    if base_spec.micro is not None or base_spec.task == "wakeword":
        from agent.compress.compare_audio import compare_wakeword

        return compare_wakeword(base_arg, variant_args, eval_inputs, runs=runs, limit=limit, precision=precision,
                                backend=backend)
    many = threads or max(1, os.cpu_count() or 1)
    thread_counts = sorted({1, many})
    items, reasons = _eval_items(eval_inputs, limit)

    first = _build(base_spec, backend, many, xnnpack, delegate, task)
    specs = [base_spec] + [_like_base(load_spec(v), base_spec, first.model) for v in variant_args]
    contenders = [Contender(arg, spec, "base" if k == 0 else "variant")
                  for k, (arg, spec) in enumerate(zip([base_arg, *variant_args], specs, strict=True))]
    inferences = [first] + [_build(c.spec, backend, many, xnnpack, delegate, task) for c in contenders[1:]]

    _agreement_pass(contenders, inferences, items)
    profiles = [_profile(inf.model) for inf in inferences]
    del inferences, first
    for n in thread_counts:
        _latency_pass(contenders, items, n, runs, backend, xnnpack, delegate, task)

    base = contenders[0]
    base_size = base.spec.path.stat().st_size
    kind = agree.result_kind(base.results)
    rows = []
    for c, profile in zip(contenders, profiles, strict=True):
        size = c.spec.path.stat().st_size
        row: dict[str, Any] = {
            "model": c.arg,
            "file": str(c.spec.path),
            "role": c.role,
            "sha256": _sha256(c.spec.path),
            "size_bytes": size,
            "size_ratio": round(size / base_size, 4),
            **profile,
            "latency_ms": c.latency,
            "latency_ratio": {
                n: {stage: _ratio(c.latency[n][stage]["p50"], base.latency[n][stage]["p50"])
                    for stage in ("invoke_ms", "pipeline_ms")}
                for n in c.latency
            },
        }
        if c.role == "variant":
            row["agreement"] = agree.agreement(base.results, c.results, kind)
            if any(r is not None for r in reasons):
                row["agreement_by_reason"] = _by_reason(base.results, c.results, reasons, kind)
            row["output_snr_db"] = [agree.snr_db(s, e) if not math.isnan(e) else None
                                    for s, e in zip(c.signal_power, c.noise_power, strict=True)]
        rows.append(row)
    backend_info = load_backend(backend)
    return {
        "base": base_arg,
        "backend": {"name": backend_info.name, "version": backend_info.version},
        "machine": platform.machine(),
        "xnnpack": xnnpack and delegate is None,
        "delegate": delegate,
        "threads": thread_counts,
        "runs": runs,
        "eval_items": len(items),
        "models": rows,
    }


def _by_reason(base: list[Any], variant: list[Any], reasons: list[str | None], kind: str | None) -> dict[str, Any]:
    """Agreement over the items captured for each reason (a dataset folder's `band`, `random`, …)."""
    out: dict[str, Any] = {}
    for reason in sorted({r or "none" for r in reasons}):
        picked = [i for i, r in enumerate(reasons) if (r or "none") == reason]
        out[reason] = {"items": len(picked), **(agree.agreement([base[i] for i in picked],
                                                                [variant[i] for i in picked], kind) or {})}
    return out


def _ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 3) if reference > 0 else None


def _agreement_pass(contenders: list[Contender], inferences: list[Inference],
                    items: list[np.ndarray[Any, Any]]) -> None:
    """Every item through every model; keep the results and accumulate raw-output SNR against BASE."""
    base_model = inferences[0].model
    buffers = [[np.empty(math.prod(o.shape), np.float32) for o in inf.model.outputs] for inf in inferences]
    n_out = len(base_model.outputs)
    for c in contenders[1:]:
        c.signal_power = [0.0] * n_out
        c.noise_power = [0.0] * n_out
    for item in items:
        for k, (c, inf) in enumerate(zip(contenders, inferences, strict=True)):
            c.results.append(inf.process(item))
            for i in range(len(inf.model.outputs)):
                inf.model.dequantize_output(i, buffers[k][i])
            if k == 0:
                continue
            for i in range(n_out):
                ref = buffers[0][i]
                if i >= len(buffers[k]) or buffers[k][i].shape != ref.shape:
                    c.noise_power[i] = math.nan  # a different output layout: no element-wise comparison
                    continue
                if math.isnan(c.noise_power[i]):
                    continue
                diff = ref.astype(np.float64) - buffers[k][i]
                c.signal_power[i] += float(np.dot(ref, ref))
                c.noise_power[i] += float(np.dot(diff, diff))


def _latency_pass(contenders: list[Contender], items: list[np.ndarray[Any, Any]], threads: int, runs: int,
                  backend: str | None, xnnpack: bool, delegate: str | None, task: str | None) -> None:
    inferences = [_build(c.spec, backend, threads, xnnpack, delegate, task) for c in contenders]
    for r in range(max(3, runs // 10)):
        for inf in inferences:
            inf.run(items[r % len(items)])
    clock = time.perf_counter_ns
    invoke: list[list[float]] = [[] for _ in inferences]
    pipeline: list[list[float]] = [[] for _ in inferences]
    order = list(range(len(inferences)))
    for r in range(runs):
        item = items[r % len(items)]
        for k in order:
            inf = inferences[k]
            t0 = clock()
            inf.model.invoke()
            t1 = clock()
            inf.run(item)
            t2 = clock()
            invoke[k].append((t1 - t0) / 1e6)
            pipeline[k].append((t2 - t1) / 1e6)
        order = order[1:] + order[:1]  # no model always runs first (or right after another)
    for k, c in enumerate(contenders):
        c.latency[str(threads)] = {"invoke_ms": percentiles(invoke[k]), "pipeline_ms": percentiles(pipeline[k])}


def _profile(model: Model) -> dict[str, Any]:
    delegation = model.delegation()
    return {
        "precision": precision(model),
        "inputs": [t.as_dict() for t in model.inputs],
        "ops": len(model.ops),
        "op_profile": {
            "partitions": delegation.partitions,
            "delegated_ops": delegation.delegated,
            "off_fast_path": delegation.undelegated_counts(),
        },
    }


# -- output -------------------------------------------------------------------------


def _agreement_text(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    if a["kind"] == "classify":
        return f"top-1 {_percent(a['top1_agreement'])}"
    if a["kind"] == "detect":
        return (f"recall {_percent(a['recall'])} IoU {a['mean_iou'] if a['mean_iou'] is not None else '-'} "
                f"count {_percent(a['count_agreement'])}")
    if a["kind"] == "wakeword":
        return f"decisions {_percent(a['decision_agreement'])}"
    return json.dumps(a)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(report: dict[str, Any]) -> str:
    if report.get("kind") == "wakeword":
        from agent.compress.compare_audio import format_wakeword_table

        return format_wakeword_table(report)
    threads = [str(n) for n in report["threads"]]
    head = f"{'MODEL':<34} {'PREC':<8} {'SIZE KB':>8} {'xBASE':>6}"
    for n in threads:
        head += f" {'INV@' + n:>8} {'PIPE@' + n:>8} {'xBASE':>6}"
    head += f"  {'AGREEMENT':<34} {'SNR dB':>7}  OFF FAST PATH"
    lines = [
        f"backend {report['backend']['name']} {report['backend']['version']} on {report['machine']}, "
        f"{'XNNPACK' if report['xnnpack'] else 'no XNNPACK'}, {report['eval_items']} evaluation items, "
        f"{report['runs']} timed runs, latency p50 in ms",
        head,
    ]
    for row in report["models"]:
        name = Path(row["model"]).name
        line = f"{name[-34:]:<34} {row['precision']:<8} {row['size_bytes'] / 1024:>8.1f} {row['size_ratio']:>6.2f}"
        for n in threads:
            lat, ratio = row["latency_ms"][n], row["latency_ratio"][n]
            shown = "-" if ratio["pipeline_ms"] is None else f"{ratio['pipeline_ms']:.2f}"
            line += f" {lat['invoke_ms']['p50']:>8.2f} {lat['pipeline_ms']['p50']:>8.2f} {shown:>6}"
        if row["role"] == "base":
            line += f"  {'(base)':<34} {'':>7}"
        else:
            snrs = [s for s in row["output_snr_db"] if s is not None]
            snr = f"{min(snrs):.1f}" if snrs else "same" if row["output_snr_db"] else "-"
            line += f"  {_agreement_text(row['agreement']):<34} {snr:>7}"
        off = row["op_profile"]["off_fast_path"]
        line += "  " + (", ".join(f"{op} x{count}" for op, count in off.items()) or "none")
        lines.append(line)
    return "\n".join(lines)


def manifest_task(base_arg: str, task: str | None = None, backend: str | None = None) -> str:
    """The task BASE's variants manifest names: `task` (--task), else BASE's manifest's, else the one the
    runtime recognises from a bare file's tensors (BlazeFace's regressors and scores: detect). BadInput when
    none tells (no known output layout): asked before anything is measured, so no run is wasted."""
    if task:
        return task
    spec = load_spec(base_arg)
    if spec.task:
        return spec.task
    recognition = recognise(Model(spec.path, backend=backend, threads=1))
    if recognition.task == "tensors":
        raise BadInput(f"--write-manifest: cannot tell the task of {spec.path.name} ({recognition.detail}); "
                       "give it with --task")
    return recognition.task


def write_variants_manifest(report: dict[str, Any], path: str | Path, task: str | None = None) -> Path:
    """BASE's manifest with every variant and its measured figures (DESIGN §4 `variants`); `task` names a
    bare BASE's task (`manifest_task`)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise BadInput(f"--write-manifest {path}: must be a .json file")
    folder = path.resolve().parent
    for row in report["models"]:
        if Path(row["file"]).resolve().parent != folder:
            raise BadInput(f"--write-manifest {path}: {row['file']} is not beside the manifest; "
                           "put the model files in its folder")
    base_row = report["models"][0]
    base_spec = load_spec(report["base"])
    measured_on = {"backend": report["backend"], "machine": report["machine"], "xnnpack": report["xnnpack"],
                   "eval_items": report["eval_items"], "threads": report["threads"]}
    data: dict[str, Any] = (
        base_spec.manifest.model_dump(exclude_none=True) if base_spec.manifest is not None else {
            "name": base_spec.name,
            "version": base_spec.version if base_spec.version is not None else 1,
            "task": task or manifest_task(report["base"]),
            "preprocess": base_spec.preprocess.model_dump(exclude_none=True),
            "postprocess": base_spec.postprocess.model_dump(),
        }
    )
    data.update(file=Path(base_row["file"]).name, sha256=base_row["sha256"], size=base_row["size_bytes"])
    if base_spec.labels and isinstance(data.get("labels"), str | type(None)):
        data["labels"] = list(base_spec.labels)
    data.pop("signature", None)
    data.pop("key_id", None)
    data["metrics"] = {**data.get("metrics", {}), "precision": base_row["precision"],
                       "latency_ms": base_row["latency_ms"], "measured_on": measured_on}
    data["variants"] = [_variant_entry(row) for row in report["models"][1:]]
    Manifest.model_validate(data)
    write_together({path: (json.dumps(data, indent=2) + "\n").encode()})
    return path


def _variant_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "file": Path(row["file"]).name,
        "sha256": row["sha256"],
        "size": row["size_bytes"],
        "precision": row["precision"],
        "input_shape": row["inputs"][0]["shape"] if row["inputs"] else None,
        "metrics": {
            "size_ratio": row["size_ratio"],
            "latency_ms": row["latency_ms"],
            "latency_ratio": row["latency_ratio"],
            "agreement": row["agreement"],
            "output_snr_db": row["output_snr_db"],
            "off_fast_path": row["op_profile"]["off_fast_path"],
        },
    }
    if row["model"].lower().endswith(".json"):
        entry["manifest"] = Path(row["model"]).name
    return entry
