"""The dataset folder a pull fills, in formats labeling tools import (docs/capture.md §Dataset).

    OUT/images/<id>.jpg      frames, at the source's resolution
    OUT/audio/<id>.wav       clips, 16 kHz mono int16, pre-roll included
    OUT/samples/<id>.json    each sample's sidecar (device, pipeline, model, reason, scores, time, sha256)
    OUT/labels.jsonl         one line per sample: file, kind, reason, model, and the sidecar's `results` as
                             pre-labels (`classes`, `detections` with normalised boxes, or wake word `events`):
                             the model's own output, or for a `variant` sample the base model's
    OUT/coco.json            COCO instances for the images (boxes in pixels, `score` kept): detections pre-labels

`labels.jsonl` is for classes and wake words (Label Studio, CSV-minded tools, pandas); `coco.json` for
detections (CVAT, Label Studio, FiftyOne import COCO). Both are rebuilt from the sidecars after each
pull, so they always describe exactly the samples in the folder. `model quantize --calib OUT` and
`model compare --eval OUT` take the folder as is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.statefiles import fsync_dir

SIDECAR_VERSION = 2
"""2: a `variant` sample's `results` are the base model's answer, its pre-labels, and `variant_results` the
cheaper variant's; in 1 `results` were the variant's and `base_results` the base's (`current_sidecar`)."""
KIND_FOLDERS = {".jpg": "images", ".wav": "audio"}
LABELS = "labels.jsonl"
COCO = "coco.json"


def is_dataset(folder: Path) -> bool:
    """A folder a pull made (it has the labels file)."""
    return (folder / LABELS).is_file()


def current_sidecar(meta: dict[str, Any]) -> dict[str, Any]:
    """A sidecar in this version's shape: a version 1 `variant` sample (an older agent's, or a folder an older
    pull filled) has the base's answer as `results`, the pre-labels, and the variant's as `variant_results`."""
    if "base_results" not in meta:
        return meta
    upgraded = {k: v for k, v in meta.items() if k not in ("results", "base_results")}
    return upgraded | {"v": SIDECAR_VERSION, "results": meta["base_results"],
                       "variant_results": meta.get("results") or []}


def sidecars(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((folder / "samples").glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and (folder / _data_rel(meta)).is_file():
            out.append(current_sidecar(meta))
    return out


def _data_rel(meta: dict[str, Any]) -> str:
    file = str(meta.get("file", ""))
    return f"{KIND_FOLDERS.get(Path(file).suffix, 'other')}/{file}"


def has(folder: Path, sample: dict[str, Any]) -> bool:
    """The sample is in the folder, whole (its sidecar is written only after its verified data file)."""
    path = folder / "samples" / f"{sample['id']}.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("sha256") == sample.get("sha256") and (folder / _data_rel(meta)).is_file())


def place(folder: Path, verified: Path, sidecar: dict[str, Any]) -> None:
    """Move a verified data file into the folder, then write its sidecar (what makes it count as there)."""
    kind = KIND_FOLDERS[verified.suffix]
    (folder / kind).mkdir(exist_ok=True)
    (folder / "samples").mkdir(exist_ok=True)
    os.replace(verified, folder / kind / verified.name)
    fsync_dir(folder / kind)
    _write_atomic(folder / "samples" / f"{verified.stem}.json",
                  json.dumps(current_sidecar(sidecar), indent=1).encode())


def write_labels(folder: Path) -> dict[str, int]:
    """Rebuild labels.jsonl and coco.json from the sidecars; counts of what they hold."""
    metas = sidecars(folder)
    lines = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: dict[str, int] = {}
    for meta in metas:
        rel = _data_rel(meta)
        results = meta.get("results") or []
        line: dict[str, Any] = {k: meta.get(k) for k in ("id", "kind", "device", "pipeline", "reason", "model",
                                                          "ts", "score")}
        line["file"] = rel
        line["classes"] = [c for r in results for c in r.get("classes", ())]
        line["detections"] = [d for r in results for d in r.get("detections", ())]
        line["events"] = [{"label": r.get("label"), "score": r.get("score")} for r in results if "event" in r]
        lines.append(json.dumps(line, separators=(",", ":")))
        if meta.get("kind") == "image":
            w, h = int(meta.get("width", 0)), int(meta.get("height", 0))
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": rel, "width": w, "height": h})
            for d in line["detections"]:
                cat = categories.setdefault(str(d["label"]), len(categories) + 1)
                x0, y0, x1, y1 = d["box"]
                box = [round(x0 * w, 2), round(y0 * h, 2), round((x1 - x0) * w, 2), round((y1 - y0) * h, 2)]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                    "bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0,
                                    "score": d["score"]})
    coco = {"info": {"description": "lepton-fleet samples pull (model outputs as pre-labels)"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    _write_atomic(folder / LABELS, ("\n".join(lines) + "\n" if lines else "").encode())
    _write_atomic(folder / COCO, json.dumps(coco, indent=1).encode())
    return {"samples": len(lines), "images": len(images), "clips": len(lines) - len(images),
            "annotations": len(annotations)}


def dataset_files(folder: Path, kind: str) -> list[Path]:
    """The images (`image`) or clips (`audio`) of a dataset folder, in id order (capture time)."""
    return [folder / _data_rel(m) for m in sidecars(folder) if m.get("kind") == kind]


def reasoned_inputs(args: list[str], kind: str = "image") -> list[tuple[str, str | None]]:
    """(input, capture reason) for command-line inputs: a dataset folder gives each of its files of `kind`
    with the reason it was captured for; any other input is itself, with no reason."""
    out: list[tuple[str, str | None]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir() and is_dataset(path):
            out.extend((str(folder_path), reason) for folder_path, reason in _files_and_reasons(path, kind))
        else:
            out.append((arg, None))
    return out


def _files_and_reasons(folder: Path, kind: str) -> list[tuple[Path, str | None]]:
    return [(folder / _data_rel(m), m.get("reason")) for m in sidecars(folder) if m.get("kind") == kind]


def expand_inputs(args: list[str], kind: str = "image") -> list[str]:
    """Command-line inputs with each dataset folder replaced by its files of `kind` (others as given)."""
    out: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir() and is_dataset(path):
            out.extend(str(p) for p in dataset_files(path, kind))
        else:
            out.append(arg)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(name, 0o644)
    os.replace(name, path)
    fsync_dir(path.parent)
