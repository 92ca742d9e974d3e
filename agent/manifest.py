"""Model manifests: ours (DESIGN §4) and microWakeWord v2 JSON, read into one `ModelSpec`.

A MODEL argument is either a `.tflite` (no manifest: everything is inferred from
the tensors) or a `.json` manifest whose `file` names the model beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import BadInput

_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocess(_Strict):
    """How a frame becomes the input tensor."""

    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    """Channel order the model was trained on (frames arrive as BGR)."""
    resize: Literal["stretch", "letterbox"] = "stretch"
    """Stretch to the input size, or keep aspect ratio and pad."""
    interpolation: Literal["linear", "area"] = "linear"
    """Resampling: `linear` (bilinear), or `area` (pixel averaging when shrinking: no aliasing, closer
    to the antialiased resize many reference pipelines use)."""
    layout: Literal["NHWC", "NCHW", "auto"] = "auto"
    """Tensor layout; `auto` reads it from the input shape."""
    normalize: Literal["quantization", "mean_std"] | None = None
    """`quantization`: the raw pixel byte is the quantized value (uint8 as is, int8 minus 128);
    `mean_std`: (pixel - mean) / std, then quantized with the tensor's own scale/zero-point.
    Default: `quantization` for integer inputs, `mean_std` for float inputs."""
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    """Per channel (or one value for all), in pixel units 0..255."""
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    """Per channel (or one value for all), in pixel units; must not be 0."""
    roi: tuple[float, float, float, float] | None = None
    """Region of interest `[xmin, ymin, xmax, ymax]`, normalised 0..1 in the frame; only it is fed to
    the model, and boxes are still reported in whole-frame coordinates. None: the whole frame."""

    @field_validator("roi")
    @classmethod
    def _roi_inside(cls, v: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if v is not None and not (0.0 <= v[0] < v[2] <= 1.0 and 0.0 <= v[1] < v[3] <= 1.0):
            raise ValueError("must be [xmin, ymin, xmax, ymax] with 0 <= min < max <= 1")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _one_or_three(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) not in (1, 3):
            raise ValueError("give one value or one per channel (3)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _mean_std_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "normalize" not in data and ("mean" in data or "std" in data):
            return {**data, "normalize": "mean_std"}
        return data


class Postprocess(_Strict):
    """How output tensors become a result."""

    decoder: str | None = None
    """Decoder key (`classify`, …); None: recognised from the output tensors."""
    softmax: bool | Literal["auto"] = "auto"
    """Apply softmax to the scores; `auto`: when the output is not produced by SOFTMAX/LOGISTIC."""
    top_k: Annotated[int, Field(ge=1, le=1000)] = 5
    """Keep the k best classes."""
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Drop results scoring below this."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Decoder-specific parameters."""


class Runtime(_Strict):
    """Constraints on where the model may run."""

    backends: tuple[str, ...] = ()
    """Backends it is known to work on; empty: any."""
    boards: tuple[str, ...] = ()
    """Profile classes it is meant for; empty: any."""
    min_agent: str | None = None
    """Oldest agent version that can run it."""


class Delivery(_Strict):
    """How a model travels over MQTT (docs/delivery.md); signed together with the rest of the manifest."""

    chunk_size: Annotated[int, Field(ge=64, le=256 * 1024 * 1024)]
    """Bytes per chunk; every chunk but the last has exactly this many."""
    chunks: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...]
    """sha256 of each chunk in order, so a bad chunk is refused on arrival and a partial file re-checked."""
    published: float
    """When the publisher signed it (Unix seconds)."""
    expires: float | None = None
    """After this (Unix seconds) devices refuse the manifest; None: never."""


class Manifest(_Strict):
    """Our model manifest (DESIGN §4)."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    """Model name, unique in the fleet."""
    version: int | str
    """Monotonic integer or semver string."""
    task: Annotated[str, Field(min_length=1)]
    """classify | detect | wakeword | …"""
    file: str
    """The `.tflite` beside the manifest (a plain file name)."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    size: Annotated[int, Field(ge=1)] | None = None
    labels: list[str] | str | None = None
    """Label list, or a file name beside the manifest with one label per line."""
    preprocess: Preprocess = Field(default_factory=Preprocess)
    postprocess: Postprocess = Field(default_factory=Postprocess)
    runtime: Runtime = Field(default_factory=Runtime)
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Measured figures (accuracy, latency) carried with the model; informative."""
    variants: list[dict[str, Any]] = Field(default_factory=list)
    """Alternative files of the same model (governor and deploy choose)."""
    signature: str | None = None
    key_id: str | None = None
    delivery: Delivery | None = None
    """Present on manifests published for delivery over MQTT."""

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _SAFE_FILE.match(v) or ".." in v:
            raise ValueError("must be a plain file name beside the manifest")
        return v


class MicroSettings(BaseModel):
    """The `micro` block of a microWakeWord v2 manifest."""

    model_config = ConfigDict(extra="allow", frozen=True)

    probability_cutoff: Annotated[float, Field(gt=0.0, le=1.0)]
    sliding_window_size: Annotated[int, Field(ge=1, le=1000)]
    feature_step_size: Annotated[int, Field(ge=1, le=1000)] = 10
    tensor_arena_size: int | None = None
    minimum_esphome_version: str | None = None


class MicroManifest(BaseModel):
    """A microWakeWord v2 JSON manifest, accepted as ESPHome writes it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["micro"]
    wake_word: Annotated[str, Field(min_length=1)]
    model: str
    version: Literal[2]
    micro: MicroSettings
    author: str | None = None
    trained_languages: list[str] = Field(default_factory=list)

    @field_validator("model")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _SAFE_FILE.match(v) or ".." in v:
            raise ValueError("must be a plain file name beside the manifest")
        return v


class ModelSpec(BaseModel):
    """What the runner needs: the model file and how to drive it, whatever the manifest kind."""

    model_config = ConfigDict(frozen=True)

    path: Path
    manifest_path: Path | None = None
    name: str
    version: int | str | None = None
    task: str | None = None
    labels: tuple[str, ...] = ()
    preprocess: Preprocess = Field(default_factory=Preprocess)
    postprocess: Postprocess = Field(default_factory=Postprocess)
    micro: MicroSettings | None = None
    manifest: Manifest | None = None


def _format_validation(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "manifest"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {err['msg']}{more}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line; blank lines are skipped. A missing file is bad input."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read labels ({exc})") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def load_spec(model: Path | str, labels: Path | str | None = None) -> ModelSpec:
    """Read MODEL (a `.tflite` or a manifest `.json`) into a ModelSpec; BadInput on any problem."""
    path = Path(model)
    if path.suffix.lower() != ".json":
        if not path.exists():
            raise BadInput(f"{path}: no such model file")
        spec = ModelSpec(path=path, name=path.stem)
    else:
        spec = _load_manifest(path)
    if labels is not None:
        spec = spec.model_copy(update={"labels": read_labels(Path(labels))})
    return spec


def _load_manifest(path: Path) -> ModelSpec:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such manifest") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read manifest ({exc.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{path}: invalid manifest: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: invalid manifest: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BadInput(f"{path}: invalid manifest: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: invalid manifest: expected a JSON object")
    try:
        if data.get("type") == "micro":
            return _from_micro(path, MicroManifest.model_validate(data))
        return _from_ours(path, Manifest.model_validate(data))
    except ValidationError as exc:
        raise BadInput(f"{path}: invalid manifest: {_format_validation(exc)}") from None


def _from_ours(path: Path, m: Manifest) -> ModelSpec:
    model_path = path.parent / m.file
    if not model_path.is_file():
        raise BadInput(f"{path}: model file {m.file!r} named by the manifest does not exist")
    if m.size is not None and model_path.stat().st_size != m.size:
        raise BadInput(
            f"{path}: model file {m.file!r} is {model_path.stat().st_size} bytes, the manifest says {m.size}"
        )
    if m.sha256 is not None and _sha256(model_path) != m.sha256:
        raise BadInput(f"{path}: model file {m.file!r} does not match the manifest's sha256")
    labels = read_labels(path.parent / m.labels) if isinstance(m.labels, str) else tuple(m.labels or ())
    return ModelSpec(
        path=model_path,
        manifest_path=path,
        name=m.name,
        version=m.version,
        task=m.task,
        labels=labels,
        preprocess=m.preprocess,
        postprocess=m.postprocess,
        manifest=m,
    )


def _from_micro(path: Path, m: MicroManifest) -> ModelSpec:
    model_path = path.parent / m.model
    if not model_path.is_file():
        raise BadInput(f"{path}: model file {m.model!r} named by the manifest does not exist")
    return ModelSpec(
        path=model_path,
        manifest_path=path,
        name=path.stem,
        version=m.version,
        task="wakeword",
        labels=(m.wake_word,),
        postprocess=Postprocess(decoder="wakeword", threshold=m.micro.probability_cutoff),
        micro=m.micro,
    )
