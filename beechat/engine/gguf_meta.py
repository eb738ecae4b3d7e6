"""A small, fast GGUF header reader (standard library only).

Reads the key/values and the tensor infos of a GGUF file through `mmap`, without touching the
tensor data. Arrays of numbers are kept as lists; arrays of strings longer than
`MAX_STRING_ARRAY` items (a vocabulary, BPE merges) are skipped and kept only as their length,
so a 248K-token vocabulary costs a length walk, not 248K string objects. `GGUFMetadata.arrays`
records the element type and length of every array, so a skipped one can be told from a number.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

GGUFScalar = int | float | bool | str
GGUFValue = GGUFScalar | list[int] | list[float] | list[bool] | list[str]

MAGIC = b"GGUF"
MAX_STRING_ARRAY = 64
DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.h: enum gguf_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

# type -> (struct code, item size, array typecode)
_SCALARS: dict[int, tuple[str, int, str]] = {
    UINT8: ("B", 1, "B"), INT8: ("b", 1, "b"), UINT16: ("H", 2, "H"), INT16: ("h", 2, "h"),
    UINT32: ("I", 4, "I"), INT32: ("i", 4, "i"), FLOAT32: ("f", 4, "f"), BOOL: ("?", 1, "B"),
    UINT64: ("Q", 8, "Q"), INT64: ("q", 8, "q"), FLOAT64: ("d", 8, "d"),
}


class GGUFError(Exception):
    """A file that is not a readable GGUF; the message is one line naming the file."""


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    ggml_type: int
    offset: int  # relative to GGUFMetadata.data_offset


@dataclass
class GGUFMetadata:
    """Header of one GGUF file (or a hand-built one: see `from_kv`)."""

    kv: dict[str, GGUFValue]
    version: int = 3
    tensor_count: int = 0
    arrays: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (element type, length)
    tensors: list[TensorInfo] | None = None
    path: Path | None = None
    file_size: int = 0
    data_offset: int = 0  # where tensor data starts in the file

    @classmethod
    def from_kv(cls, kv: Mapping[str, GGUFValue], *, tensor_count: int = 0) -> GGUFMetadata:
        """Metadata from a plain dict (tests, planning for a model not on disk)."""
        arrays: dict[str, tuple[int, int]] = {}
        for key, value in kv.items():
            if isinstance(value, list):
                first = value[0] if value else 0
                elem = (STRING if isinstance(first, str) else BOOL if isinstance(first, bool)
                        else FLOAT32 if isinstance(first, float) else INT32)
                arrays[key] = (elem, len(value))
        return cls(kv=dict(kv), tensor_count=tensor_count, arrays=arrays)

    @property
    def arch(self) -> str:
        value = self.kv.get("general.architecture")
        return value if isinstance(value, str) else ""

    @property
    def name(self) -> str:
        value = self.kv.get("general.name")
        return value if isinstance(value, str) else (self.path.stem if self.path else "")

    def get(self, key: str, default: GGUFValue | None = None) -> GGUFValue | None:
        return self.kv.get(key, default)

    def arch_get(self, suffix: str, default: GGUFValue | None = None) -> GGUFValue | None:
        """The value of `{arch}.{suffix}`, e.g. arch_get("block_count")."""
        return self.kv.get(f"{self.arch}.{suffix}", default)

    def get_int(self, key: str, default: int = 0) -> int:
        """An integer key (bools and floats are refused: the default is returned)."""
        value = self.kv.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    @property
    def nextn_layers(self) -> int:
        """MTP (nextn) layers the model carries after its trunk (`{arch}.nextn_predict_layers`, 0 when
        absent): Qwen3.5/3.6 GGUFs converted with their MTP block have 1."""
        return self.get_int(f"{self.arch}.nextn_predict_layers")

    @property
    def n_vocab(self) -> int:
        """Length of tokenizer.ggml.tokens (0 when absent)."""
        info = self.arrays.get("tokenizer.ggml.tokens")
        return info[1] if info else 0


class _Reader:
    """Cursor over the mapped file; every read is bounds-checked by struct."""

    def __init__(self, buf: bytes | mmap.mmap, endian: str) -> None:
        self.buf = buf
        self.off = 0
        self.endian = endian
        self.size = len(buf)
        self._u64 = struct.Struct(endian + "Q")
        self._u32 = struct.Struct(endian + "I")

    def u32(self) -> int:
        (value,) = self._u32.unpack_from(self.buf, self.off)
        self.off += 4
        return int(value)

    def u64(self) -> int:
        (value,) = self._u64.unpack_from(self.buf, self.off)
        self.off += 8
        return int(value)

    def string(self) -> str:
        n = self.u64()
        end = self.off + n
        if end > self.size:
            raise struct.error("string past end of file")
        text = bytes(self.buf[self.off:end]).decode("utf-8", "replace")
        self.off = end
        return text

    def skip_strings(self, count: int) -> None:
        unpack, off, size = self._u64.unpack_from, self.off, self.size
        buf = self.buf
        for _ in range(count):
            off += 8 + unpack(buf, off)[0]
        if off > size:
            raise struct.error("string array past end of file")
        self.off = off

    def scalar(self, vtype: int) -> GGUFScalar:
        if vtype == STRING:
            return self.string()
        code, size, _ = _scalar_spec(vtype)
        (value,) = struct.unpack_from(self.endian + code, self.buf, self.off)
        self.off += size
        return bool(value) if vtype == BOOL else value

    def numbers(self, vtype: int, count: int) -> list[int] | list[float] | list[bool]:
        _, size, typecode = _scalar_spec(vtype)
        end = self.off + count * size
        if end > self.size:
            raise struct.error("array past end of file")
        items = array.array(typecode)
        items.frombytes(self.buf[self.off:end])
        if (self.endian == ">") != (sys.byteorder == "big") and size > 1:
            items.byteswap()
        self.off = end
        values = items.tolist()
        return [bool(v) for v in values] if vtype == BOOL else values

    def skip_value(self, vtype: int) -> None:
        if vtype == STRING:
            self.skip_strings(1)
        elif vtype == ARRAY:
            elem, count = self.u32(), self.u64()
            if elem == STRING:
                self.skip_strings(count)
            elif elem == ARRAY:
                for _ in range(count):
                    self.skip_value(ARRAY)
            else:
                self.off += count * _scalar_spec(elem)[1]
        else:
            self.off += _scalar_spec(vtype)[1]


def _scalar_spec(vtype: int) -> tuple[str, int, str]:
    spec = _SCALARS.get(vtype)
    if spec is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return spec


def _parse(buf: bytes | mmap.mmap, path: Path, file_size: int, with_tensors: bool) -> GGUFMetadata:
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    if len(buf) < 24:
        raise GGUFError(f"{path}: truncated GGUF header")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # a big-endian file reads as 0x0N000000
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (2 or 3 expected)")
    r = _Reader(buf, endian)
    r.off = 8
    tensor_count, kv_count = r.u64(), r.u64()
    kv: dict[str, GGUFValue] = {}
    arrays: dict[str, tuple[int, int]] = {}
    key = "(header)"
    try:
        for _ in range(kv_count):
            key = r.string()
            vtype = r.u32()
            if vtype != ARRAY:
                kv[key] = r.scalar(vtype)
                continue
            elem, count = r.u32(), r.u64()
            arrays[key] = (elem, count)
            if elem == STRING:
                if count <= MAX_STRING_ARRAY:
                    kv[key] = [r.string() for _ in range(count)]
                else:
                    r.skip_strings(count)
                    kv[key] = count
            elif elem == ARRAY:
                for _ in range(count):
                    r.skip_value(ARRAY)
                kv[key] = count
            else:
                kv[key] = r.numbers(elem, count)
        tensors: list[TensorInfo] | None = None
        data_offset = 0
        if with_tensors:
            tensors = []
            key = "(tensor infos)"
            for _ in range(tensor_count):
                name = r.string()
                n_dims = r.u32()
                if n_dims > 8:
                    raise ValueError(f"tensor {name} has {n_dims} dims")
                shape = tuple(r.u64() for _ in range(n_dims))
                tensors.append(TensorInfo(name, shape, r.u32(), r.u64()))
            align = kv.get("general.alignment", DEFAULT_ALIGNMENT)
            align = align if isinstance(align, int) and align > 0 else DEFAULT_ALIGNMENT
            data_offset = (r.off + align - 1) // align * align
    except struct.error:
        raise GGUFError(f"{path}: truncated GGUF file (ends inside {key})") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise GGUFError(f"{path}: corrupt GGUF header at {key}: {exc}") from None
    return GGUFMetadata(kv=kv, version=version, tensor_count=tensor_count, arrays=arrays,
                        tensors=tensors, path=path, file_size=file_size, data_offset=data_offset)


def read_metadata(path: str | os.PathLike[str], *, tensors: bool = True) -> GGUFMetadata:
    """Read the header of the GGUF at `path`. Raises GGUFError (one line) for a bad file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{p}: empty file, not a GGUF")
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # not mappable (a pipe, some network file systems)
                return _parse(f.read(), p, size, tensors)
            with mm:
                return _parse(mm, p, size, tensors)
    except GGUFError:
        raise
    except OSError as exc:
        raise GGUFError(f"{p}: cannot read: {exc.strerror or exc}") from None
