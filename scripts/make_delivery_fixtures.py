#!/usr/bin/env python3
"""Write the two small models the delivery tests need that no training can produce (dev only).

Both take the same input as `colors_int8` (int8 [1,32,32,3], scale 1, zero point -128) and
give the same output shape ([1,3] int8), so they pass a pipeline's shape check and fail later:

- `invoke_fails.tflite`: GATHER with an index computed from the input (so the runtime
  cannot check it at load) that is always past the end of its table: every `Invoke()` fails.
- `fails_on_dark.tflite`: the top-left pixel's first channel (as int8, pixel - 128) is
  the GATHER index into a 128-row table: a mid-grey or bright pixel runs, a darker one
  (a negative index) makes `Invoke()` fail. So it passes a self-test on a grey sample
  and crashes the pipeline on real frames, which is what the probation window is for.

The flatbuffer is built with the `flatbuffers` package (a dependency of ai-edge-litert)
using the TFLite schema's field slots directly; run with `.venv/bin/python`.
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# schema.fbs values
INT32, INT8 = 2, 9
ADD, GATHER, CAST, RESHAPE, SLICE = 0, 36, 53, 22, 65


class _Graph:
    def __init__(self) -> None:
        self.b = flatbuffers.Builder(1024)
        self.buffers: list[bytes] = [b""]  # buffer 0 is the empty sentinel
        self.tensors: list[tuple[list[int], int, int, str, tuple[float, int] | None]] = []
        self.ops: list[tuple[int, list[int], list[int]]] = []
        self.codes: list[int] = []

    def tensor(self, shape: list[int], ttype: int, name: str, data: bytes | None = None,
               quant: tuple[float, int] | None = None) -> int:
        buf = 0
        if data is not None:
            self.buffers.append(data)
            buf = len(self.buffers) - 1
        self.tensors.append((shape, ttype, buf, name, quant))
        return len(self.tensors) - 1

    def op(self, code: int, inputs: list[int], outputs: list[int]) -> None:
        if code not in self.codes:
            self.codes.append(code)
        self.ops.append((self.codes.index(code), inputs, outputs))

    def _ints(self, values: list[int]) -> int:
        self.b.StartVector(4, len(values), 4)
        for v in reversed(values):
            self.b.PrependInt32(v)
        return self.b.EndVector()

    def _bytes(self, data: bytes) -> int:
        self.b.StartVector(1, len(data), 16)
        for v in reversed(data):
            self.b.PrependUint8(v)
        return self.b.EndVector()

    def _tables(self, offsets: list[int]) -> int:
        self.b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            self.b.PrependUOffsetTRelative(off)
        return self.b.EndVector()

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        b = self.b
        buffers = []
        for data in self.buffers:
            d = self._bytes(data) if data else None
            b.StartObject(3)
            if d is not None:
                b.PrependUOffsetTRelativeSlot(0, d, 0)
            buffers.append(b.EndObject())
        tensors = []
        for shape, ttype, buf, name, quant in self.tensors:
            s, n = self._ints(shape), b.CreateString(name)
            q = None
            if quant is not None:
                b.StartVector(4, 1, 4)
                b.PrependFloat32(quant[0])
                scale = b.EndVector()
                b.StartVector(8, 1, 8)
                b.PrependInt64(quant[1])
                zp = b.EndVector()
                b.StartObject(7)
                b.PrependUOffsetTRelativeSlot(2, scale, 0)
                b.PrependUOffsetTRelativeSlot(3, zp, 0)
                q = b.EndObject()
            b.StartObject(10)
            b.PrependUOffsetTRelativeSlot(0, s, 0)
            b.PrependInt8Slot(1, ttype, 0)
            b.PrependUint32Slot(2, buf, 0)
            b.PrependUOffsetTRelativeSlot(3, n, 0)
            if q is not None:
                b.PrependUOffsetTRelativeSlot(4, q, 0)
            tensors.append(b.EndObject())
        ops = []
        for code_index, ins, outs in self.ops:
            i, o = self._ints(ins), self._ints(outs)
            b.StartObject(9)
            b.PrependUint32Slot(0, code_index, 0)
            b.PrependUOffsetTRelativeSlot(1, i, 0)
            b.PrependUOffsetTRelativeSlot(2, o, 0)
            ops.append(b.EndObject())
        codes = []
        for code in self.codes:
            b.StartObject(4)
            b.PrependInt8Slot(0, min(code, 127), 0)
            b.PrependInt32Slot(2, 1, 1)
            b.PrependInt32Slot(3, code, 0)
            codes.append(b.EndObject())
        t, o, i, out = self._tables(tensors), self._tables(ops), self._ints(inputs), self._ints(outputs)
        name = b.CreateString("main")
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, t, 0)
        b.PrependUOffsetTRelativeSlot(1, i, 0)
        b.PrependUOffsetTRelativeSlot(2, out, 0)
        b.PrependUOffsetTRelativeSlot(3, o, 0)
        b.PrependUOffsetTRelativeSlot(4, name, 0)
        subgraph = b.EndObject()
        cv, sv, bv = self._tables(codes), self._tables([subgraph]), self._tables(buffers)
        desc = b.CreateString("lepton delivery test fixture")
        b.StartObject(8)
        b.PrependUint32Slot(0, 3, 0)
        b.PrependUOffsetTRelativeSlot(1, cv, 0)
        b.PrependUOffsetTRelativeSlot(2, sv, 0)
        b.PrependUOffsetTRelativeSlot(3, desc, 0)
        b.PrependUOffsetTRelativeSlot(4, bv, 0)
        model = b.EndObject()
        b.Finish(model, file_identifier=b"TFL3")
        return bytes(b.Output())


IMAGE_QUANT = (1.0, -128)
SCORE_QUANT = (1.0 / 256, -128)


def _corner_index(g: _Graph, x: int) -> int:
    """int32 [1]: the first value of image tensor `x` (pixel - 128)."""
    begin = g.tensor([4], INT32, "begin", np.zeros(4, np.int32).tobytes())
    size = g.tensor([4], INT32, "size", np.ones(4, np.int32).tobytes())
    corner = g.tensor([1, 1, 1, 1], INT8, "corner", quant=IMAGE_QUANT)
    g.op(SLICE, [x, begin, size], [corner])
    shape = g.tensor([1], INT32, "shape", np.array([1], np.int32).tobytes())
    flat = g.tensor([1], INT8, "flat", quant=IMAGE_QUANT)
    g.op(RESHAPE, [corner, shape], [flat])
    index = g.tensor([1], INT32, "index")
    g.op(CAST, [flat], [index])
    return index


def invoke_fails() -> bytes:
    g = _Graph()
    x = g.tensor([1, 32, 32, 3], INT8, "image", quant=IMAGE_QUANT)
    corner = _corner_index(g, x)
    offset = g.tensor([1], INT32, "offset", np.array([1000], np.int32).tobytes())
    index = g.tensor([1], INT32, "past_the_end")
    g.op(ADD, [corner, offset], [index])
    table = g.tensor([2, 3], INT8, "table", np.array([[127, -128, -128], [-128, 127, -128]], np.int8).tobytes(),
                     quant=SCORE_QUANT)
    y = g.tensor([1, 3], INT8, "scores", quant=SCORE_QUANT)
    g.op(GATHER, [table, index], [y])
    return g.build([x], [y])


def fails_on_dark() -> bytes:
    g = _Graph()
    x = g.tensor([1, 32, 32, 3], INT8, "image", quant=IMAGE_QUANT)
    index = _corner_index(g, x)
    rows = np.full((128, 3), -128, np.int8)
    rows[:, 0] = 127  # every row says "red": the model runs, its answer is not the point
    table = g.tensor([128, 3], INT8, "table", rows.tobytes(), quant=SCORE_QUANT)
    y = g.tensor([1, 3], INT8, "scores", quant=SCORE_QUANT)
    g.op(GATHER, [table, index], [y])
    return g.build([x], [y])


def main() -> None:
    (OUT / "invoke_fails.tflite").write_bytes(invoke_fails())
    (OUT / "fails_on_dark.tflite").write_bytes(fails_on_dark())
    print(OUT)


if __name__ == "__main__":
    main()
