"""Frame → input tensor, written straight into the interpreter's input view.

Per frame: resize (stretch, or letterbox with a constant border) into a small
preallocated buffer, convert the colour order on that small image, then one
look-up table maps each pixel byte to the model's input value — normalisation
((p - mean) / std) and quantization (q = p' / scale + zero_point) fused into a
256-entry table per channel — writing into the tensor. Nothing frame-sized is
allocated after the first frame of a given size. A region of interest is a
slice (a view) of the frame, so cropping costs nothing either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import BadInput
from agent.manifest import Preprocess
from agent.runtime import Model, TensorInfo
from agent.vision.cv import cv2

logger = logging.getLogger(__name__)

# (frame channels, model colour) -> cv2 conversion code; None: no conversion.
_COLOR_CODES: dict[tuple[int, str], int | None] = {
    (3, "BGR"): None,
    (3, "RGB"): cv2.COLOR_BGR2RGB,
    (3, "GRAY"): cv2.COLOR_BGR2GRAY,
    (4, "BGR"): cv2.COLOR_BGRA2BGR,
    (4, "RGB"): cv2.COLOR_BGRA2RGB,
    (4, "GRAY"): cv2.COLOR_BGRA2GRAY,
    (1, "BGR"): cv2.COLOR_GRAY2BGR,
    (1, "RGB"): cv2.COLOR_GRAY2RGB,
    (1, "GRAY"): None,
}


_ALL = slice(None)


@dataclass(frozen=True)
class ImageInput:
    """The geometry of an image input tensor."""

    height: int
    width: int
    channels: int
    layout: str  # NHWC | NCHW


def image_input(info: TensorInfo, layout: str = "auto") -> ImageInput | None:
    """Read H, W, C from a 4-D input shape; None when the tensor is not an image."""
    shape = info.shape
    if len(shape) != 4 or shape[0] != 1:
        return None
    if layout == "NCHW" or (layout == "auto" and shape[3] not in (1, 3) and shape[1] in (1, 3)):
        _, c, h, w = shape
        layout = "NCHW"
    else:
        _, h, w, c = shape
        layout = "NHWC"
    if c not in (1, 3) or h < 2 or w < 2:
        return None
    return ImageInput(h, w, c, layout)


def value_lut(info: TensorInfo, pre: Preprocess, channels: int) -> np.ndarray[Any, Any] | None:
    """The per-channel pixel → input value table, or None when the pixel byte is the input."""
    normalize = pre.normalize or ("quantization" if info.quantized else "mean_std")
    pixels = np.arange(256, dtype=np.float64)
    if normalize == "quantization":
        if info.dtype == np.uint8:
            return None
        if info.dtype == np.int8:
            lut = (pixels - 128).astype(np.int8)
            return np.ascontiguousarray(np.repeat(lut[None, :, None], channels, axis=2).reshape(1, 256, channels))
        raise BadInput(
            f"preprocess.normalize: 'quantization' needs a uint8 or int8 input, this model takes {info.dtype.name}"
        )
    mean = np.resize(np.asarray(pre.mean, dtype=np.float64), channels)
    std = np.resize(np.asarray(pre.std, dtype=np.float64), channels)
    real = (pixels[:, None] - mean[None, :]) / std[None, :]  # (256, C)
    if info.quantized:
        limits = np.iinfo(info.dtype)
        table = np.clip(np.rint(real / info.scale + info.zero_point), limits.min, limits.max).astype(info.dtype)
    elif info.dtype in (np.float32, np.float64):
        table = real.astype(info.dtype)
    else:
        raise BadInput(f"input tensor {info.name!r}: dtype {info.dtype.name} is not supported for images")
    return np.ascontiguousarray(table.reshape(1, 256, channels))


class ImagePreprocessor:
    """Writes BGR (or gray, or BGRA) uint8 frames into one image input of a model."""

    def __init__(self, model: Model, pre: Preprocess, input_index: int = 0, pad_value: int = 0) -> None:
        info = model.inputs[input_index]
        geometry = image_input(info, pre.layout)
        if geometry is None:
            raise BadInput(f"{model.path}: input {info.name!r} {list(info.shape)} is not an image tensor")
        self.geometry = geometry
        self.color = "GRAY" if geometry.channels == 1 else pre.color
        if geometry.channels == 3 and pre.color == "GRAY":
            raise BadInput(f"{model.path}: preprocess.color is GRAY but the model takes 3 channels")
        self.letterbox = pre.resize == "letterbox"
        self.pad_value = pad_value
        self.roi = pre.roi
        self.interpolation = cv2.INTER_AREA if pre.interpolation == "area" else cv2.INTER_LINEAR
        self._crop = (0, 0, 0, 0)  # y0, y1, x0, x1 of the region of interest in the current frame size
        self._lut = value_lut(info, pre, geometry.channels)
        # Two cheaper forms of the same table (cv2.LUT with a table per channel is ~3x slower than
        # with one shared table, and a byte shift is cheaper still):
        # - every channel maps alike: one single-channel table;
        # - int8 input taking pixel - 128: the bytes written as uint8, then the sign bit flipped.
        self._flip_sign = False
        if self._lut is not None and (self._lut == self._lut[..., :1]).all():
            self._lut = np.ascontiguousarray(self._lut[..., 0])
            shift = (np.arange(256) - 128).astype(np.int8)
            if self._lut.dtype == np.int8 and np.array_equal(self._lut[0], shift) and geometry.layout == "NHWC":
                self._lut, self._flip_sign = None, True
        self._model = model
        self._input_index = input_index
        self._rows = _ALL
        """The rows of the input that change from frame to frame (the picture, not the letterbox border)."""
        self._bind()
        # Buffers per frame geometry (channels, height, width); rebuilt only when it changes.
        self._key: tuple[int, int, int] | None = None
        self._resized: np.ndarray[Any, Any] = np.empty(0, np.uint8)
        self._patch: np.ndarray[Any, Any] | None = None
        self._patch_at: tuple[int, int] = (0, 0)
        self._colored: np.ndarray[Any, Any] | None = None
        self._code: int | None = None
        # Maps tensor-normalised x/y back to frame-normalised: x_frame = ax * u + bx.
        self.mapping = (1.0, 0.0, 1.0, 0.0)

    def _bind(self) -> None:
        """Take the destination views from the model (again after it rebuilt its interpreter)."""
        g = self.geometry
        view = self._model.input(self._input_index)[0]
        self._generation = self._model.generation
        self._borders_written = False  # a new input tensor: its border rows are not written yet
        self._row_views: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any] | None] | None = None
        if g.layout == "NCHW":
            self._target = np.empty((g.height, g.width, g.channels), dtype=view.dtype)
            self._nchw: np.ndarray[Any, Any] | None = view
        else:
            self._target = view.view(np.uint8) if self._flip_sign else view
            self._nchw = None
        if g.channels == 1:
            self._target = self._target.reshape(g.height, g.width)

    def _prepare(self, frame_h: int, frame_w: int, channels: int) -> None:
        g = self.geometry
        key = (channels, frame_h, frame_w)
        if (channels, self.color) not in _COLOR_CODES:
            raise BadInput(f"frame has {channels} channels; expected 1, 3 or 4")
        full_h, full_w = frame_h, frame_w
        if self.roi is not None:
            x0, y0, x1, y1 = self.roi
            cx0, cx1 = min(round(x0 * full_w), full_w - 1), max(round(x1 * full_w), 1)
            cy0, cy1 = min(round(y0 * full_h), full_h - 1), max(round(y1 * full_h), 1)
            cx1, cy1 = max(cx1, cx0 + 1), max(cy1, cy0 + 1)
            self._crop = (cy0, cy1, cx0, cx1)
            frame_h, frame_w = cy1 - cy0, cx1 - cx0
        self._code = _COLOR_CODES[(channels, self.color)]
        shape: tuple[int, ...] = (g.height, g.width) if channels == 1 else (g.height, g.width, channels)
        self._resized = np.empty(shape, np.uint8)
        self._patch = None
        self._rows = _ALL
        self._borders_written = False
        self._row_views = None
        if self.letterbox:
            scale = min(g.width / frame_w, g.height / frame_h)
            nw, nh = max(1, round(frame_w * scale)), max(1, round(frame_h * scale))
            px, py = (g.width - nw) // 2, (g.height - nh) // 2
            self._resized.fill(self.pad_value)
            if px == 0:
                # Full-width content (a landscape frame): its rows are contiguous, resize straight into them.
                self._patch = self._resized[py : py + nh]
                if self._nchw is None:
                    self._rows = slice(py, py + nh)
            else:
                self._patch = np.empty((nh, nw, *shape[2:]), np.uint8)
            self._patch_at = (py, px)
            self.mapping = (g.width / nw, -px / nw, g.height / nh, -py / nh)
        else:
            self.mapping = (1.0, 0.0, 1.0, 0.0)
        if self.roi is not None:
            # Region-normalised → frame-normalised: x = x0 + w * x_region, composed into the same affine map.
            cy0, cy1, cx0, cx1 = self._crop
            rw, rh = (cx1 - cx0) / full_w, (cy1 - cy0) / full_h
            ax, bx, ay, by = self.mapping
            self.mapping = (ax * rw, cx0 / full_w + bx * rw, ay * rh, cy0 / full_h + by * rh)
        final_needs_lut = self._lut is not None or self._nchw is not None
        if self._code is not None and final_needs_lut:
            self._colored = np.empty((g.height, g.width) if g.channels == 1 else (g.height, g.width, 3), np.uint8)
        else:
            self._colored = None
        self._key = key

    def __call__(self, frame: np.ndarray[Any, Any]) -> None:
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
            raise BadInput(f"frame of shape {frame.shape} and dtype {frame.dtype} is not an 8-bit image")
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        if channels == 1 and frame.ndim == 3:
            frame = frame[:, :, 0]
        if self._generation != self._model.generation:
            self._bind()
        if self._key != (channels, frame.shape[0], frame.shape[1]):
            self._prepare(frame.shape[0], frame.shape[1], channels)
        if self._resize(frame):
            if self._flip_sign:
                np.bitwise_xor(self._target, 0x80, out=self._target)
            return
        g = self.geometry
        if self._patch is not None:
            py, px = self._patch_at
            if px:
                np.copyto(self._resized[py : py + self._patch.shape[0], px : px + self._patch.shape[1]], self._patch)
        # Once the border rows of a letterboxed landscape frame are in the input, only the rows with the
        # picture change: colour and value table run on those (3/4 of the tensor for 4:3 frames).
        if self._borders_written:
            if self._row_views is None:
                rows = self._rows
                self._row_views = (self._resized[rows], self._target[rows],
                                   None if self._colored is None else self._colored[rows])
            src, target, colored = self._row_views  # made once: three numpy slicings less per frame
        else:
            src, target, colored = self._resized, self._target, self._colored
        in_target = False
        if self._code is not None:
            in_target = colored is None
            dst = target if colored is None else colored
            cv2.cvtColor(src, self._code, dst=dst)
            src = dst
        if self._lut is not None:
            cv2.LUT(src, self._lut, dst=target)
        elif not in_target:
            np.copyto(target, src, casting="unsafe")
        if self._flip_sign:
            np.bitwise_xor(target, 0x80, out=target)  # uint8 p -> int8 p - 128, in place
        self._borders_written = self._rows is not _ALL
        if self._nchw is not None:
            np.copyto(self._nchw, self._target.reshape(g.height, g.width, -1).transpose(2, 0, 1))

    def _resize(self, frame: np.ndarray[Any, Any]) -> bool:
        """The frame's region of interest resized into its buffer; True when that buffer is the input itself."""
        if self.roi is not None:
            cy0, cy1, cx0, cx1 = self._crop
            frame = frame[cy0:cy1, cx0:cx1]
        g = self.geometry
        if self._code is None and self._lut is None and self._nchw is None and not self.letterbox:
            # The frame already has the model's colour order and raw bytes are the input.
            cv2.resize(frame, (g.width, g.height), dst=self._target, interpolation=self.interpolation)
            return True
        if self._patch is not None:
            cv2.resize(frame, (self._patch.shape[1], self._patch.shape[0]), dst=self._patch,
                       interpolation=self.interpolation)
        else:
            cv2.resize(frame, (g.width, g.height), dst=self._resized, interpolation=self.interpolation)
        return False

    def resize_only(self, frame: np.ndarray[Any, Any]) -> None:
        """Only the resize of a frame `__call__` has seen (its size set up): the fixed cost of a frame's size,
        which benchmarks report apart (it does not shrink with the model, nor grow as invoke does on a Pi)."""
        self._resize(frame)

    def map_boxes(self, boxes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Map [N,4] boxes [xmin, ymin, xmax, ymax] from tensor-normalised to frame-normalised, in place."""
        scale, offset = self._mapping4 if boxes.dtype == np.float32 else self._mapping4_f64
        boxes *= scale
        boxes += offset
        # Into 0..1, NaN (a broken model's) made 0: fmax/fmin, not np.clip, whose Python wrapper costs more.
        np.fmax(boxes, 0.0, out=boxes)
        np.fmin(boxes, 1.0, out=boxes)
        return boxes

    def map_box_rows(self, rows: list[tuple[float, float, float, float]]) -> list[list[float]]:
        """`map_boxes` for a few boxes in Python floats (`Detections.few`), without a numpy call (and brought
        into 0..1 by conditional expressions: cheaper than builtin min/max calls)."""
        ax, bx, ay, by = self._mapping
        mapped = []
        for x0, y0, x1, y1 in rows:
            box = [x0 * ax + bx, y0 * ay + by, x1 * ax + bx, y1 * ay + by]
            mapped.append([v if 0.0 <= v <= 1.0 else 1.0 if v > 1.0 else 0.0 for v in box])  # NaN: 0
        return mapped

    @property
    def mapping(self) -> tuple[float, float, float, float]:
        """(ax, bx, ay, by): x_frame = ax * x_tensor + bx, y_frame = ay * y_tensor + by."""
        return self._mapping

    @mapping.setter
    def mapping(self, value: tuple[float, float, float, float]) -> None:
        ax, bx, ay, by = self._mapping = value
        # Per box column [xmin, ymin, xmax, ymax], as float32 like the boxes: one multiply and one add per frame.
        self._mapping4_f64 = (np.array([ax, ay, ax, ay]), np.array([bx, by, bx, by]))
        self._mapping4 = (self._mapping4_f64[0].astype(np.float32), self._mapping4_f64[1].astype(np.float32))
