"""A small reader for MATLAB level-5 ``.mat`` files (the format of the Flowers-102 and
Stanford Cars annotations), so those datasets load as distributed without SciPy.

It reads what those files hold: numeric arrays, char arrays, cell arrays and struct
arrays, stored plain or zlib-compressed, in either byte order. Data are decoded
with numpy (``frombuffer``), never executed. MATLAB 7.3 files (HDF5) are refused
with a message. :func:`write_mat` writes the same subset; the tests use it to make
fixtures in the real format.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from swr.errors import SwrError

# data types of the element tags (MAT-file format, "Data Types" table)
_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8",
            12: "i8", 13: "u8"}
MI_INT8, MI_UINT8, MI_INT32, MI_UINT32, MI_DOUBLE = 1, 2, 5, 6, 9
MI_MATRIX, MI_COMPRESSED, MI_UTF8, MI_UTF16 = 14, 15, 16, 17
# array classes (the low byte of the array flags)
MX_CELL, MX_STRUCT, MX_CHAR, MX_DOUBLE = 1, 2, 4, 6
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4",
               14: "i8", 15: "u8"}


class _Bad(Exception):
    """A structural problem; :func:`read_mat` turns it into one SwrError line naming the file."""


def read_mat(path: str | Path) -> dict[str, Any]:
    """The variables of level-5 MAT-file ``path`` as ``{name: value}``.

    Numeric and char arrays become numpy arrays (char arrays: ``str`` for one row,
    else an array of ``str`` rows); cell arrays are object arrays; struct arrays are
    object arrays of ``dict``. Shapes are MATLAB's (at least 2-D, column-major order
    preserved). Raises :class:`SwrError` naming the file when it cannot be read.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SwrError(f"cannot read {path}: {e.strerror or e}") from None
    if raw[:19] == b"MATLAB 7.3 MAT-file" or raw[:8] == b"\x89HDF\r\n\x1a\n":
        raise SwrError(f"{path} is a MATLAB 7.3 (HDF5) file; save it as a version 5 MAT-file "
                       f"(the format the dataset is distributed in)")
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise SwrError(f"{path} is not a MATLAB level-5 MAT-file; restore it from the "
                       f"dataset's archive")
    order = "<" if raw[126:128] == b"IM" else ">"
    out: dict[str, Any] = {}
    try:
        pos = 128
        while pos + 8 <= len(raw):
            dtype, data, pos = _element(raw, pos, order)
            if dtype == MI_COMPRESSED:
                data = zlib.decompress(data)
                dtype, data, _ = _element(data, 0, order)
            if dtype != MI_MATRIX:
                continue  # e.g. the subsystem data of function handles
            name, value = _matrix(data, order)
            out[name] = value
    except (_Bad, zlib.error, struct.error, ValueError, IndexError, TypeError, OverflowError,
            UnicodeDecodeError, RecursionError) as e:
        raise SwrError(f"{path} is a damaged MAT-file ({e}); restore it from the dataset's "
                       f"archive") from None
    return out


def _element(buf: bytes, pos: int, order: str) -> tuple[int, bytes, int]:
    """``(type, payload, next position)`` of the data element at ``pos``."""
    first, second = struct.unpack_from(order + "II", buf, pos)
    if first >> 16:  # small element: type and size in 4 bytes, data in the next 4
        dtype, size = first & 0xFFFF, first >> 16
        if size > 4:
            raise _Bad(f"small element of {size} bytes at byte {pos}")
        return dtype, bytes(buf[pos + 4:pos + 4 + size]), pos + 8
    dtype, size = first, second
    start = pos + 8
    if start + size > len(buf):
        raise _Bad(f"element at byte {pos} runs past the end")
    # compressed elements are not padded; all others end on an 8-byte boundary
    step = size if dtype == MI_COMPRESSED else (size + 7) // 8 * 8
    return dtype, bytes(buf[start:start + size]), start + step


def _numbers(dtype: int, data: bytes, order: str) -> np.ndarray:
    if dtype in (MI_UTF8,):
        return np.frombuffer(data, "u1")
    if dtype == MI_UTF16:
        return np.frombuffer(data, order + "u2")
    if dtype not in _NUMERIC:
        raise _Bad(f"unsupported data type {dtype}")
    return np.frombuffer(data, order + _NUMERIC[dtype])


def _matrix(buf: bytes, order: str) -> tuple[str, Any]:
    """``(name, value)`` of one miMATRIX payload."""
    pos = 0
    _, flags, pos = _element(buf, pos, order)
    mx_class = _numbers(MI_UINT32, flags, order)[0] & 0xFF
    complex_ = bool(_numbers(MI_UINT32, flags, order)[0] & 0x800)
    dtype, dims, pos = _element(buf, pos, order)
    shape = tuple(int(d) for d in _numbers(dtype, dims, order))
    _, name, pos = _element(buf, pos, order)
    name = name.decode("latin-1")
    if any(d < 0 for d in shape):
        raise _Bad(f"negative dimension in {shape}")
    count = math.prod(shape) if shape else 0
    if count > 8 * len(buf) + 8:  # every element takes at least a byte (cells: 8)
        raise _Bad(f"dimensions {shape} are larger than the data")
    if mx_class in _MX_NUMERIC:
        dtype, real, pos = _element(buf, pos, order)
        values = _numbers(dtype, real, order).astype(_MX_NUMERIC[mx_class])
        if complex_:
            dtype, imag, pos = _element(buf, pos, order)
            values = values + 1j * _numbers(dtype, imag, order)
        return name, values.reshape(shape, order="F")
    if mx_class == MX_CHAR:
        dtype, data, pos = _element(buf, pos, order) if pos < len(buf) else (MI_UINT8, b"", pos)
        if dtype == MI_UTF8:
            codes = list(data.decode("utf-8"))
        else:
            codes = [chr(c) for c in _numbers(dtype, data, order)]
        grid = np.array(codes or [""] * count, dtype=object).reshape(shape, order="F")
        rows = ["".join(row) for row in grid.reshape(shape[0], -1)] if count else [""] * shape[0]
        return name, rows[0] if len(rows) == 1 else np.array(rows)
    if mx_class == MX_CELL:
        cells = np.empty(count, dtype=object)
        for i in range(count):
            _, sub, pos = _element(buf, pos, order)
            cells[i] = _matrix(sub, order)[1]
        return name, cells.reshape(shape, order="F")
    if mx_class == MX_STRUCT:
        dtype, width, pos = _element(buf, pos, order)
        width = int(_numbers(dtype, width, order)[0])
        _, names, pos = _element(buf, pos, order)
        fields = [names[i:i + width].split(b"\0", 1)[0].decode("latin-1")
                  for i in range(0, len(names), width)] if width else []
        items = np.empty(count, dtype=object)
        for i in range(count):
            record = {}
            for f in fields:
                _, sub, pos = _element(buf, pos, order)
                record[f] = _matrix(sub, order)[1]
            items[i] = record
        return name, items.reshape(shape, order="F")
    raise _Bad(f"variable {name!r} has MATLAB class {mx_class}, which this reader does not read")


# -- writing (for fixtures in the real format) ----------------------------------------------
def _tag(dtype: int, payload: bytes) -> bytes:
    # MATLAB packs payloads of up to 4 bytes into a "small element"; so does this writer
    if len(payload) <= 4 and dtype != MI_MATRIX:
        return struct.pack("<HH", dtype, len(payload)) + payload.ljust(4, b"\0")
    return struct.pack("<II", dtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _encode(name: str, value: Any) -> bytes:
    """One miMATRIX element for ``value``: str, dict (1x1 struct), list of dicts (1xN
    struct), list of other values (1xN cell) or a numeric numpy array (as double)."""
    if isinstance(value, str):
        codes = np.array([ord(c) for c in value], "<u2")
        shape, klass, body = (1, len(value)), MX_CHAR, _tag(4, codes.tobytes())
    elif isinstance(value, dict) or (isinstance(value, list) and value
                                     and all(isinstance(v, dict) for v in value)):
        records = [value] if isinstance(value, dict) else value
        fields = list(records[0])
        width = max(len(f) for f in fields) + 1
        names = b"".join(f.encode().ljust(width, b"\0") for f in fields)
        body = (struct.pack("<HHi", MI_INT32, 4, width) + _tag(MI_INT8, names)
                + b"".join(_encode("", r[f]) for r in records for f in fields))
        shape, klass = (1, len(records)), MX_STRUCT
    elif isinstance(value, list):
        shape, klass = (1, len(value)), MX_CELL
        body = b"".join(_encode("", v) for v in value)
    else:
        arr = np.asarray(value, dtype="<f8")
        arr = arr.reshape(1, -1) if arr.ndim < 2 else arr
        shape, klass = arr.shape, MX_DOUBLE
        # like MATLAB, store whole numbers in the smallest unsigned type that holds them
        small = arr.size and np.all(arr == np.round(arr)) and arr.min() >= 0
        if small and arr.max() < 256:
            body = _tag(MI_UINT8, arr.astype("u1").tobytes(order="F"))
        elif small and arr.max() < 65536:
            body = _tag(4, arr.astype("<u2").tobytes(order="F"))
        else:
            body = _tag(MI_DOUBLE, arr.tobytes(order="F"))
    flags = _tag(MI_UINT32, struct.pack("<II", klass, 0))
    dims = _tag(MI_INT32, struct.pack(f"<{len(shape)}i", *shape))
    return _tag(MI_MATRIX, flags + dims + _tag(MI_INT8, name.encode()) + body)


def write_mat(path: str | Path, variables: dict[str, Any], compress: bool = True) -> None:
    """Write ``variables`` as a little-endian level-5 MAT-file (see :func:`_encode`)."""
    header = (b"MATLAB 5.0 MAT-file, written by swr".ljust(116) + b"\0" * 8
              + struct.pack("<H", 0x0100) + b"IM")
    body = b""
    for name, value in variables.items():
        element = _encode(name, value)
        if compress:
            packed = zlib.compress(element)
            element = struct.pack("<II", MI_COMPRESSED, len(packed)) + packed
        body += element
    Path(path).write_bytes(header + body)
