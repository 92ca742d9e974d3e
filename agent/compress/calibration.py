"""Calibration samples made by the agent's own preprocessing, so calibration sees what the device sees.

An image or a video frame goes through `ImagePreprocessor` — the very code the device
runs, with the manifest's colour order, resize mode and normalisation — into the float
model's input tensor, and the tensor is read back as one sample. Models whose inputs
are not images take `.npy` arrays (one sample, or a stack of them along the batch axis)
or `.npz` files with one array per signature input. A wake word model (one input of
[1, stride, 40]: microWakeWord's frontend features) takes WAV clips instead — `.wav` files,
folders of them, a pulled dataset folder's `audio/` — each streamed through a fresh micro frontend
as the runtime does (`agent.tasks.wakeword.clip_features`) and cut into windows of `stride` rows.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.manifest import ModelSpec
from agent.runtime import Model

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
Sample = dict[str, np.ndarray[Any, Any]]


def collect_samples(
    model: Model, spec: ModelSpec, names: Mapping[int, str], inputs: list[str], limit: int
) -> list[Sample]:
    """Calibration samples {signature input name: array} from INPUT arguments, at most `limit`.

    `names` maps the model's input tensor indices to the signature's argument names.
    BadInput when an input cannot be read, does not fit the model's input, or nothing is left.
    """
    missing = [t.name for t in model.inputs if t.index not in names]
    if missing:
        raise BadInput(f"{model.path}: input {missing[0]!r} is not in the model's signature")
    arrays = [arg for arg in inputs if Path(arg).suffix.lower() in ARRAY_SUFFIXES]
    media = [arg for arg in inputs if Path(arg).suffix.lower() not in ARRAY_SUFFIXES]
    samples: list[Sample] = []
    for arg in arrays:
        samples.extend(_array_samples(model, names, Path(arg)))
    if media and _features_input(model):
        samples.extend(_audio_samples(model, names, media, limit - len(samples)))
    elif media:
        wav = next((arg for arg in media if Path(arg).suffix.lower() == ".wav"), None)
        if wav is not None:
            shapes = ", ".join(f"{t.name!r} {list(t.shape)}" for t in model.inputs)
            raise BadInput(f"--calib {wav}: WAV clips calibrate a wake word model (input [1, stride, 40]); this "
                           f"model's input is {shapes}")
        samples.extend(_image_samples(model, spec, names, media, limit - len(samples)))
    if not samples:
        raise BadInput(f"--calib {' '.join(inputs)}: the calibration set is empty")
    if len(samples) > limit:
        logger.info("calibration: using the first %d of %d samples", limit, len(samples))
        samples = samples[:limit]
    return samples


def _features_input(model: Model) -> bool:
    """One float input of microWakeWord's frontend features: [1, stride, 40]."""
    from agent.tasks.wakeword import FEATURES

    shape = model.inputs[0].shape if len(model.inputs) == 1 else ()
    return len(shape) == 3 and shape[0] == 1 and shape[1] >= 1 and shape[2] == FEATURES \
        and model.inputs[0].dtype.kind == "f"


def _audio_samples(model: Model, names: Mapping[int, str], args: list[str], limit: int) -> list[Sample]:
    from agent.compress.compare_audio import clips
    from agent.tasks.wakeword import clip_features

    info = model.inputs[0]
    stride, name = info.shape[1], names[info.index]
    samples: list[Sample] = []
    for clip in clips(args, limit, "--calib")[0]:
        rows = clip_features(clip)
        for k in range(len(rows) // stride):
            if len(samples) >= limit:
                return samples
            samples.append({name: rows[k * stride:(k + 1) * stride][None].astype(info.dtype)})
    if not samples:
        raise BadInput(f"--calib {' '.join(args)}: the clips are too short for one window of {stride} feature rows")
    return samples


def _image_samples(model: Model, spec: ModelSpec, names: Mapping[int, str], args: list[str],
                   limit: int) -> list[Sample]:
    from agent.vision.preprocess import ImagePreprocessor, image_input

    info = model.inputs[0]
    if len(model.inputs) != 1 or image_input(info, spec.preprocess.layout) is None:
        shapes = ", ".join(f"{t.name!r} {list(t.shape)}" for t in model.inputs)
        raise BadInput(
            f"--calib {args[0]}: images do not fit the model's input ({shapes} is not one image tensor); "
            "give .npy/.npz arrays of that shape"
        )
    preprocessor = ImagePreprocessor(model, spec.preprocess)
    view = model.input(0)
    name = names[info.index]
    samples: list[Sample] = []
    for frame in _frames(args):
        if len(samples) >= limit:
            break
        preprocessor(frame)
        samples.append({name: view.copy()})
    return samples


def _frames(args: list[str]) -> Iterator[np.ndarray[Any, Any]]:
    from agent.samples.dataset import expand_inputs
    from agent.sources.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES, decoded_frames

    given, args = args, expand_inputs(args)  # a pulled dataset folder: its images
    if given and not args:
        raise BadInput(f"--calib {' '.join(given)}: the calibration set is empty (the dataset holds no images)")
    for arg in args:
        path = Path(arg)
        if path.is_dir() and not any(
            p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES for p in path.iterdir() if p.is_file()
        ):
            raise BadInput(f"--calib {arg}: the calibration set is empty (the folder holds no images)")
    try:
        yield from decoded_frames(args)
    except BadInput as exc:
        raise BadInput(f"--calib {exc}") from None


def _array_samples(model: Model, names: Mapping[int, str], path: Path) -> list[Sample]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"--calib {path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BadInput(f"--calib {path}: cannot read arrays ({exc})") from None
    if isinstance(loaded, np.ndarray):
        if len(model.inputs) != 1:
            wanted = ", ".join(names[t.index] for t in model.inputs)
            raise BadInput(f"--calib {path}: the model has {len(model.inputs)} inputs; give an .npz with {wanted}")
        per_input = {model.inputs[0].index: loaded}
    else:
        with loaded:
            by_name = {k: loaded[k] for k in loaded.files}
        per_input = {}
        for t in model.inputs:
            if names[t.index] not in by_name:
                have = ", ".join(by_name) or "none"
                raise BadInput(f"--calib {path}: no array named {names[t.index]!r} (has {have})")
            per_input[t.index] = by_name[names[t.index]]
    stacks: dict[int, np.ndarray[Any, Any]] = {}
    for t in model.inputs:
        stacks[t.index] = _as_stack(path, names[t.index], t.shape, t.dtype, per_input[t.index])
    counts = {len(s) for s in stacks.values()}
    if len(counts) != 1:
        raise BadInput(f"--calib {path}: the arrays hold different numbers of samples ({sorted(counts)})")
    return [{names[i]: s[k] for i, s in stacks.items()} for k in range(counts.pop())]


def _as_stack(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype[Any],
              array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """[N, *shape] samples: the array is one sample of `shape`, or N of them stacked on the batch axis."""
    if array.dtype.kind not in "fiu" or not np.all(np.isfinite(array)):
        raise BadInput(f"--calib {path}: {name!r} must hold finite numbers, not {array.dtype}")
    if tuple(array.shape) == shape:
        return array.astype(dtype, copy=False)[None]
    batch_one = len(shape) >= 1 and shape[0] == 1
    if batch_one and tuple(array.shape[1:]) == shape[1:] and array.shape[0] >= 1:
        return array.astype(dtype, copy=False)[:, None]
    if math.prod(array.shape) == 0:
        raise BadInput(f"--calib {path}: the calibration set is empty ({name!r} holds no values)")
    raise BadInput(f"--calib {path}: {name!r} has shape {list(array.shape)}, which does not fit the "
                   f"model's input {list(shape)}")
