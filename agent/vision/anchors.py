"""SSD anchors generated the way MediaPipe's SsdAnchorsCalculator does, and the BlazeFace presets.

A port of `mediapipe/calculators/tflite/ssd_anchors_calculator.cc`
(`GenerateAnchors`): layers that share a stride are merged into one feature map
whose positions each carry the anchors of all those layers; with
`fixed_anchor_size` every anchor has width and height 1, and the decoder scales
the regressed size by the input size instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SsdAnchorOptions:
    """The fields of MediaPipe's SsdAnchorsCalculatorOptions that shape the anchors."""

    input_size_width: int
    input_size_height: int
    num_layers: int
    strides: tuple[int, ...]
    min_scale: float = 0.1484375
    max_scale: float = 0.75
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    aspect_ratios: tuple[float, ...] = (1.0,)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = False
    fixed_anchor_size: bool = True
    feature_map_width: tuple[int, ...] = field(default_factory=tuple)
    feature_map_height: tuple[int, ...] = field(default_factory=tuple)


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1.0)


def ssd_anchors(o: SsdAnchorOptions) -> np.ndarray[Any, Any]:
    """[N, 4] float32 anchors (x_center, y_center, width, height), normalised to the input."""
    if len(o.strides) != o.num_layers:
        raise ValueError(f"{o.num_layers} layers need {o.num_layers} strides, got {len(o.strides)}")
    out: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < o.num_layers:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < o.num_layers and o.strides[last] == o.strides[layer]:
            scale = _scale(o.min_scale, o.max_scale, last, len(o.strides))
            if last == 0 and o.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(o.aspect_ratios)
                scales += [scale] * len(o.aspect_ratios)
                if o.interpolated_scale_aspect_ratio > 0.0:
                    following = 1.0 if last == len(o.strides) - 1 else _scale(
                        o.min_scale, o.max_scale, last + 1, len(o.strides))
                    scales.append(math.sqrt(scale * following))
                    ratios.append(o.interpolated_scale_aspect_ratio)
            last += 1
        sizes = [(s / math.sqrt(r), s * math.sqrt(r)) for s, r in zip(scales, ratios, strict=True)]  # (h, w)
        if o.feature_map_height:
            fh, fw = o.feature_map_height[layer], o.feature_map_width[layer]
        else:
            stride = o.strides[layer]
            fh, fw = math.ceil(o.input_size_height / stride), math.ceil(o.input_size_width / stride)
        for y in range(fh):
            for x in range(fw):
                cx, cy = (x + o.anchor_offset_x) / fw, (y + o.anchor_offset_y) / fh
                for h, w in sizes:
                    out.append((cx, cy, 1.0, 1.0) if o.fixed_anchor_size else (cx, cy, w, h))
        layer = last
    return np.asarray(out, np.float32)


# MediaPipe's face_detection_*_common.pbtxt graphs, keyed by the model's input size.
BLAZEFACE_ANCHORS: dict[int, SsdAnchorOptions] = {
    128: SsdAnchorOptions(128, 128, num_layers=4, strides=(8, 16, 16, 16)),  # short-range (and front)
    192: SsdAnchorOptions(192, 192, num_layers=1, strides=(4,), interpolated_scale_aspect_ratio=0.0),  # full-range
    256: SsdAnchorOptions(256, 256, num_layers=4, strides=(16, 32, 32, 32)),  # back camera
}
