"""Structural check of a `.tflite` flatbuffer before any interpreter sees it.

tflite-runtime 2.14 does not verify the flatbuffer it is given: a truncated model
crashes the process with a segmentation fault. We walk the parts of the schema
that the interpreter dereferences (the root table, operator codes, subgraphs,
tensors, operators, buffers) and check every offset against the file length, so a
bad file is refused with a sentence instead of a crash. The walk also yields the
custom op names, which the interpreter cannot report for a model it refuses.

Schema: tensorflow/compiler/mlir/lite/schema/schema.fbs (Model, OperatorCode,
SubGraph, Tensor, Operator, Buffer). Field numbers below are that schema's.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.errors import BadInput

_IDENTIFIER = b"TFL3"

# Model fields
_M_OPERATOR_CODES, _M_SUBGRAPHS, _M_BUFFERS, _M_SIGNATURE_DEFS = 1, 2, 4, 7
# OperatorCode fields
_OC_DEPRECATED_BUILTIN, _OC_CUSTOM_CODE, _OC_BUILTIN = 0, 1, 3
# SubGraph fields
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
# Tensor / Operator / Buffer fields
_T_SHAPE, _T_TYPE, _T_BUFFER = 0, 1, 2
_OP_OPCODE_INDEX, _OP_INPUTS, _OP_OUTPUTS = 0, 1, 2
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2

CUSTOM = 32  # BuiltinOperator.CUSTOM
# TensorType -> bytes per element. Unknown types count 8 (the widest scalar): this is an upper bound.
_TYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 5: 1, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8, 13: 8, 14: 8,
               15: 4, 16: 2, 17: 1, 18: 2}
FLOAT_TYPES = frozenset({0, 1, 10, 16})  # TensorType FLOAT32, FLOAT16, FLOAT64, BFLOAT16


class _Corrupt(Exception):
    pass


class _Reader:
    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf = buf
        self.n = len(buf)

    def need(self, pos: int, size: int) -> None:
        if pos < 0 or pos + size > self.n:
            raise _Corrupt(f"offset {pos}+{size} lies past the end of the file ({self.n} bytes)")

    def u8(self, pos: int) -> int:
        self.need(pos, 1)
        return self.buf[pos]

    def u16(self, pos: int) -> int:
        self.need(pos, 2)
        return int(struct.unpack_from("<H", self.buf, pos)[0])

    def u32(self, pos: int) -> int:
        self.need(pos, 4)
        return int(struct.unpack_from("<I", self.buf, pos)[0])

    def i32(self, pos: int) -> int:
        self.need(pos, 4)
        return int(struct.unpack_from("<i", self.buf, pos)[0])

    def u64(self, pos: int) -> int:
        self.need(pos, 8)
        return int(struct.unpack_from("<Q", self.buf, pos)[0])


class _Table:
    def __init__(self, r: _Reader, pos: int) -> None:
        self.r = r
        self.pos = pos
        vtable = pos - r.i32(pos)
        self.vt_len = r.u16(vtable)
        obj_len = r.u16(vtable + 2)
        r.need(vtable, self.vt_len)
        r.need(pos, obj_len)
        self.vtable = vtable

    def field(self, i: int) -> int | None:
        slot = 4 + 2 * i
        if slot + 2 > self.vt_len:
            return None
        off = self.r.u16(self.vtable + slot)
        return self.pos + off if off else None

    def table(self, i: int) -> _Table | None:
        p = self.field(i)
        return None if p is None else _Table(self.r, p + self.r.u32(p))

    def vector(self, i: int, elem_size: int) -> tuple[int, int]:
        """(first element position, length); (0, 0) when absent."""
        p = self.field(i)
        if p is None:
            return 0, 0
        start = p + self.r.u32(p)
        length = self.r.u32(start)
        self.r.need(start + 4, length * elem_size)
        return start + 4, length

    def tables(self, i: int) -> list[_Table]:
        start, length = self.vector(i, 4)
        return [_Table(self.r, start + 4 * k + self.r.u32(start + 4 * k)) for k in range(length)]

    def ints(self, i: int) -> list[int]:
        start, length = self.vector(i, 4)
        return [self.r.i32(start + 4 * k) for k in range(length)]

    def string(self, i: int) -> str | None:
        start, length = self.vector(i, 1)
        if not start:
            return None
        return bytes(self.r.buf[start : start + length]).decode("utf-8", "replace")

    def scalar(self, i: int, fmt: str, default: int) -> int:
        p = self.field(i)
        if p is None:
            return default
        self.r.need(p, struct.calcsize(fmt))
        return int(struct.unpack_from("<" + fmt, self.r.buf, p)[0])


@dataclass(frozen=True)
class ModelFile:
    """What the flatbuffer itself says, independent of any runtime."""

    path: Path
    size: int
    subgraphs: int
    operators: int
    custom_ops: tuple[str, ...]
    has_signatures: bool
    tensor_types: tuple[int, ...]
    """TensorType of every tensor of the main subgraph, by tensor index."""
    arena_bound: int = 0
    """Bytes of every tensor that is not a constant (shape x element size, over all subgraphs): an upper
    bound of the arena an interpreter allocates, known before one is made. A flipped byte in a shape
    makes it absurd, and the delivery self-test refuses such a model before loading it."""

    def is_float(self, tensor_index: int) -> bool:
        return 0 <= tensor_index < len(self.tensor_types) and self.tensor_types[tensor_index] in FLOAT_TYPES


def read_model_file(path: Path) -> ModelFile:
    """Check `path` is a complete TFLite flatbuffer; raise BadInput naming the problem."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size < 8:
                raise BadInput(f"{path}: not a TFLite model (only {size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if buf[4:8] != _IDENTIFIER:
                    raise BadInput(f"{path}: not a TFLite model (no TFL3 identifier)")
                try:
                    return _walk(path, _Reader(buf))
                except _Corrupt as exc:
                    raise BadInput(f"{path}: truncated or corrupt TFLite model ({exc})") from None
    except FileNotFoundError:
        raise BadInput(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory, not a model file") from None
    except PermissionError:
        raise BadInput(f"{path}: model file is not readable (permission denied)") from None


def _walk(path: Path, r: _Reader) -> ModelFile:
    model = _Table(r, r.u32(0))
    custom: list[str] = []
    codes = model.tables(_M_OPERATOR_CODES)
    for code in codes:
        builtin = max(code.scalar(_OC_DEPRECATED_BUILTIN, "b", 0), code.scalar(_OC_BUILTIN, "i", 0))
        if builtin == CUSTOM:
            custom.append(code.string(_OC_CUSTOM_CODE) or "?")
    buffers = model.tables(_M_BUFFERS)
    constant: list[bool] = []
    for k, buffer in enumerate(buffers):
        _, data_len = buffer.vector(_B_DATA, 1)
        offset, size = buffer.scalar(_B_OFFSET, "Q", 0), buffer.scalar(_B_SIZE, "Q", 0)
        if offset > 1 and offset + size > r.n:
            raise _Corrupt(f"buffer {k} ends at byte {offset + size}, the file has {r.n}")
        constant.append(data_len > 0 or (offset > 1 and size > 0))
    subgraphs = model.tables(_M_SUBGRAPHS)
    if not subgraphs:
        raise _Corrupt("no subgraph")
    n_ops = arena = 0
    main_types: list[int] = []
    for k, sg in enumerate(subgraphs):
        tensors = sg.tables(_SG_TENSORS)
        if k == 0:
            main_types = [t.scalar(_T_TYPE, "b", 0) for t in tensors]
        for t in tensors:
            shape = t.ints(_T_SHAPE)
            b = t.scalar(_T_BUFFER, "I", 0)
            if b >= max(len(buffers), 1):
                raise _Corrupt(f"tensor refers to buffer {b} of {len(buffers)}")
            if not (b < len(constant) and constant[b]):
                arena += _TYPE_BYTES.get(t.scalar(_T_TYPE, "b", 0), 8) * math.prod(max(d, 1) for d in shape)
        for idx in sg.ints(_SG_INPUTS) + sg.ints(_SG_OUTPUTS):
            if not 0 <= idx < len(tensors):
                raise _Corrupt(f"subgraph input/output {idx} is not a tensor")
        for op in sg.tables(_SG_OPERATORS):
            if op.scalar(_OP_OPCODE_INDEX, "I", 0) >= len(codes):
                raise _Corrupt("operator refers to an unknown operator code")
            for idx in op.ints(_OP_INPUTS) + op.ints(_OP_OUTPUTS):
                if idx >= len(tensors):
                    raise _Corrupt(f"operator refers to tensor {idx} of {len(tensors)}")
            n_ops += 1
    _, n_sigs = model.vector(_M_SIGNATURE_DEFS, 4)
    return ModelFile(
        path=path,
        size=r.n,
        subgraphs=len(subgraphs),
        operators=n_ops,
        custom_ops=tuple(dict.fromkeys(custom)),
        has_signatures=n_sigs > 0,
        tensor_types=tuple(main_types),
        arena_bound=arena,
    )
