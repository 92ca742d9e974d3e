"""`inspect MODEL`: what a model is, as the runtime sees it."""

from __future__ import annotations

from typing import Any

from agent.manifest import ModelSpec
from agent.runtime import Model
from agent.tasks.task import recognise


def describe(model: Model, spec: ModelSpec) -> dict[str, Any]:
    recognised = recognise(model)
    float_ops = model.float_ops()
    info: dict[str, Any] = {
        "model": str(model.path),
        "manifest": str(spec.manifest_path) if spec.manifest_path else None,
        "name": spec.name,
        "version": spec.version,
        "size_bytes": model.file.size,
        "backend": {"name": model.backend.name, "version": model.backend.version},
        "threads": model.threads,
        "xnnpack": model.xnnpack,
        "delegate": model.delegate,
        "delegated_partitions": model.delegated_ops,
        "signatures": sorted(model.signatures),
        "subgraphs": model.file.subgraphs,
        "stateful": model.stateful,
        "int8": not float_ops,
        "float_ops": float_ops,
        "inputs": [t.as_dict() for t in model.inputs],
        "outputs": [t.as_dict() for t in model.outputs],
        "ops": model.op_counts,
        "task": spec.task or recognised.task,
        "task_source": "manifest" if spec.task else "recognised",
        "task_detail": recognised.detail,
        "labels": len(spec.labels),
    }
    if spec.micro is not None:
        info["micro"] = spec.micro.model_dump(exclude_none=True)
    return info


def _tensor_line(t: dict[str, Any]) -> str:
    q = t.get("quantization")
    quant = f"  scale={q['scale']:.6g} zero_point={q['zero_point']}" if q else ""
    return f"    {t['name']}  {t['dtype']}{t['shape']}{quant}"


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"model      {info['model']}" + (f"  (manifest {info['manifest']})" if info["manifest"] else ""),
        f"name       {info['name']}" + (f"  version {info['version']}" if info["version"] is not None else ""),
        f"size       {info['size_bytes']} bytes",
        f"backend    {info['backend']['name']} {info['backend']['version']}, {info['threads']} threads, "
        + ("XNNPACK" if info["xnnpack"] else f"delegate {info['delegate']}" if info["delegate"] else "no delegate")
        + f" ({info['delegated_partitions']} delegated partitions)",
        f"task       {info['task']} ({info['task_source']}; {info['task_detail']})",
        f"int8       {'yes' if info['int8'] else 'no'}"
        + ("" if info["int8"] else f" (float ops: {', '.join(info['float_ops'])})"),
        f"stateful   {'yes (resource variables)' if info['stateful'] else 'no'}",
        f"signatures {', '.join(info['signatures']) or 'none'}; subgraphs {info['subgraphs']}",
        "inputs",
        *(_tensor_line(t) for t in info["inputs"]),
        "outputs",
        *(_tensor_line(t) for t in info["outputs"]),
        "ops        " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()),
    ]
    if info["labels"]:
        lines.append(f"labels     {info['labels']}")
    if "micro" in info:
        lines.append("micro      " + ", ".join(f"{k}={v}" for k, v in info["micro"].items()))
    return "\n".join(lines)
