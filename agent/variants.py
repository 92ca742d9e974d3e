"""Cheaper variants of a model, as its manifest lists them (`variants`, DESIGN §4).

A variant is another file of the same model beside the manifest. The governor falls back
to a cheaper one under thermal or CPU pressure and comes back when the pressure is gone.
Entries are read tolerantly: the compression tooling writes
`{file, sha256, size, precision, input_shape, manifest?, metrics {latency_ratio, agreement, …}}`,
a hand-written manifest may give just `{file, cost_rank}`. The fields used here:

- `file` (required): a plain file name beside the manifest; `sha256` and `size` are checked when given.
- `manifest`: the variant's own manifest beside it (its preprocessing may differ); loaded instead.
- `cost_rank` (int ≥ 1): the variant's place in the fallback ladder (1 = the first to fall back to).
- `latency_ratio` (or `metrics.latency_ratio`): its latency over the base's; below 1 is cheaper.
- `latency_ms` (or `metrics.latency_ms`) against the base manifest's `metrics.latency_ms`, when no ratio is given.
- `agreement` (or `metrics.agreement`): how often it agrees with the base (0-1); variants below the
  governor's `min_agreement` are not used.

A variant with neither `cost_rank` nor a cost below the base's is not a fallback and is ignored.
"""

from __future__ import annotations

import hashlib
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BadInput
from agent.manifest import ModelSpec, load_spec

logger = logging.getLogger(__name__)

_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelVariant:
    """One cheaper file of a model, in the governor's ladder."""

    file: str
    rank: int
    """1 = the first variant to fall back to, 2 the next cheaper, …"""
    relative_cost: float | None
    """Its cost over the base model's (latency ratio); None when only `cost_rank` says it is cheaper."""
    agreement: float | None
    entry: dict[str, Any]


def _typical(value: Any, prefer: tuple[str, ...] = ("pipeline_ms", "p50")) -> float | None:
    """A number, or the median of the numbers in a nested dict (per-thread tables), preferring keys in `prefer`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        for key in prefer:
            if key in value:
                return _typical(value[key], prefer)
        numbers = [n for n in (_typical(v, prefer) for v in value.values()) if n is not None]
        return statistics.median(numbers) if numbers else None
    return None


def _field(entry: dict[str, Any], name: str) -> Any:
    if name in entry:
        return entry[name]
    metrics = entry.get("metrics")
    return metrics.get(name) if isinstance(metrics, dict) else None


def _relative_cost(entry: dict[str, Any], base_metrics: dict[str, Any]) -> float | None:
    ratio = _typical(_field(entry, "latency_ratio"))
    if ratio is not None and ratio > 0:
        return ratio
    mine, base = _typical(_field(entry, "latency_ms")), _typical(base_metrics.get("latency_ms"))
    if mine is not None and base:
        return mine / base
    return None


def _agreement(entry: dict[str, Any]) -> float | None:
    value = _field(entry, "agreement")
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, int | float) and not isinstance(v, bool)]
        return min(numbers) if numbers else None
    return _typical(value)


def cheaper_variants(spec: ModelSpec, min_agreement: float = 0.0) -> list[ModelVariant]:
    """The manifest's cheaper variants in ladder order (the mildest fallback first)."""
    manifest = spec.manifest
    if manifest is None or not manifest.variants:
        return []
    ranked: list[tuple[tuple[float, float], ModelVariant]] = []
    for entry in manifest.variants:
        file = entry.get("file")
        if not isinstance(file, str) or not _SAFE_FILE.match(file) or file == manifest.file:
            continue
        cost = _relative_cost(entry, manifest.metrics)
        given = entry.get("cost_rank")
        rank = float(given) if isinstance(given, int) and not isinstance(given, bool) and given >= 1 else float("inf")
        explicit = rank != float("inf")
        if not explicit and (cost is None or cost >= 1.0):
            continue  # not known to be cheaper: never a fallback
        agreement = _agreement(entry)
        if agreement is not None and agreement < min_agreement:
            logger.info("model %s: variant %s agrees %.3f with the base, below %.3f; not used", spec.name, file,
                        agreement, min_agreement)
            continue
        # Explicit ranks first, in their order; the others by cost, the mildest (closest to 1) first.
        key = (rank, 0.0) if explicit else (rank, -(cost or 0.0))
        ranked.append((key, ModelVariant(file, 0, cost, agreement, dict(entry))))
    ranked.sort(key=lambda kv: kv[0])
    return [ModelVariant(v.file, i, v.relative_cost, v.agreement, v.entry) for i, (_, v) in enumerate(ranked, 1)]


def all_variants(spec: ModelSpec) -> list[ModelVariant]:
    """Every variant the manifest lists, in its order, whatever the operator measured: the device's tuner
    (`agent.tune`) measures them all itself."""
    manifest = spec.manifest
    if manifest is None or not manifest.variants:
        return []
    out: list[ModelVariant] = []
    for entry in manifest.variants:
        file = entry.get("file")
        if isinstance(file, str) and _SAFE_FILE.match(file) and file != manifest.file:
            out.append(ModelVariant(file, len(out) + 1, _relative_cost(entry, manifest.metrics), _agreement(entry),
                                    dict(entry)))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def variant_spec(spec: ModelSpec, variant: ModelVariant) -> ModelSpec:
    """The spec to run `variant` with: its own manifest if it has one, else the base's with its file.
    BadInput when the file is missing or does not match its size or sha256."""
    if spec.manifest_path is None:
        raise BadInput(f"model {spec.name}: variants need a manifest")
    folder = spec.manifest_path.parent
    own = variant.entry.get("manifest")
    if isinstance(own, str) and _SAFE_FILE.match(own):
        loaded = load_spec(folder / own)
        return loaded if loaded.labels or not spec.labels else loaded.model_copy(update={"labels": spec.labels})
    path = folder / variant.file
    where = f"{spec.manifest_path}: variant {variant.file!r}"
    if not path.is_file():
        raise BadInput(f"{where}: no such file beside the manifest")
    size = variant.entry.get("size")
    if isinstance(size, int) and path.stat().st_size != size:
        raise BadInput(f"{where}: {path.stat().st_size} bytes, the manifest says {size}")
    sha = variant.entry.get("sha256")
    if isinstance(sha, str) and _sha256(path) != sha:
        raise BadInput(f"{where}: does not match the manifest's sha256")
    return spec.model_copy(update={"path": path})
