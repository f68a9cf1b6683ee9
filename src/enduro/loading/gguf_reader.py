"""A GGUF file's metadata and tensor table, parsed over a read-only memory map.

Layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the
metadata key/values, one info per tensor (name, dims innermost first, ggml type, offset), padding to
`general.alignment`, then the tensor data. Every read is checked against the end of the file, so a
malformed file becomes a ModelLoadError naming it, never a struct.error or an IndexError.
"""

import itertools
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from enduro.loading.errors import ModelLoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and has not been written since 2023
DEFAULT_ALIGNMENT = 32  # llama.cpp's, when the file does not state general.alignment
MAX_DIMS = 4  # GGML_MAX_DIMS

_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
# Fixed-size metadata value types: type id → numpy dtype (little-endian).
_SCALAR_DTYPES: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
    6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_BOOL = 7
_U64 = struct.Struct("<Q")
# The smallest a tensor info can be (8-byte name length, n_dims, one dim, type, offset) and a
# key/value (key length, type, one byte of value): bounds for counts before looping over them.
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 4 + 1


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]  # torch order: outermost first, so shape[-1] is GGUF's ne[0]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file; tensor bytes stay in the memory map until asked for."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]  # in file order
    blob: np.ndarray = field(repr=False)  # the whole file, uint8, read-only

    def tensor_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's raw bytes as a uint8 view into the map (no copy)."""
        return self.blob[info.offset : info.offset + info.num_bytes]


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table."""
    blob = _map_file(path)
    cursor = _Cursor(blob.data, path)
    version, tensor_count, kv_count = _read_header(cursor)
    metadata = _read_metadata(cursor, kv_count)
    alignment = _alignment(cursor, metadata)
    infos = [_read_tensor_info(cursor) for _ in range(tensor_count)]
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = tuple(_place(cursor, raw, data_start, alignment) for raw in infos)
    _check_layout(cursor, tensors)
    return GGUFFile(path, version, metadata, tensors, blob)


def _map_file(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
        if size < 4 + 4 + 8 + 8:
            raise ModelLoadError(f"{path}: {size} bytes is too short to be a GGUF file")
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read the file ({error.strerror or error})") from error


def _read_header(cursor: "_Cursor") -> tuple[int, int, int]:
    magic = bytes(cursor.take(4, "the magic"))
    if magic != MAGIC:
        raise cursor.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    version = cursor.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count = cursor.u64("the tensor count")
    kv_count = cursor.u64("the metadata count")
    for count, what, min_bytes in (
        (tensor_count, "tensor count", _MIN_TENSOR_INFO_BYTES),
        (kv_count, "metadata count", _MIN_KV_BYTES),
    ):
        if count * min_bytes > cursor.remaining():
            raise cursor.fail(
                f"{what} {count} cannot fit in the {cursor.remaining()} bytes after the header "
                f"(truncated or corrupt)"
            )
    return version, tensor_count, kv_count


def _read_metadata(cursor: "_Cursor", kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string("a metadata key")
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        value_type = cursor.u32(f"the type of metadata {key!r}")
        metadata[key] = _read_value(cursor, value_type, key)
    return metadata


def _read_value(cursor: "_Cursor", value_type: int, key: str) -> Any:
    if value_type == _STRING:
        return cursor.string(f"metadata {key!r}")
    if value_type == _ARRAY:
        return _read_array(cursor, key)
    if value_type not in _SCALAR_DTYPES:
        raise cursor.fail(f"metadata {key!r} has unknown value type {value_type}")
    value = cursor.numbers(_SCALAR_DTYPES[value_type], 1, f"metadata {key!r}")[0]
    if value_type == _BOOL:
        return bool(value)
    if value_type == _FLOAT32:
        # A float32 1e-6 widens to 9.99999997e-07; the shortest decimal that rounds to the same
        # float32 is the value the writer meant, and what a config.json would say.
        return float(str(np.float32(value)))
    return value.item()


def _read_array(cursor: "_Cursor", key: str) -> list[Any]:
    element_type = cursor.u32(f"the element type of metadata {key!r}")
    count = cursor.u64(f"the length of metadata {key!r}")
    if element_type == _STRING:
        return cursor.strings(count, f"metadata {key!r}")
    if element_type not in _SCALAR_DTYPES:
        raise cursor.fail(f"metadata {key!r} is an array of unsupported type {element_type}")
    values = cursor.numbers(_SCALAR_DTYPES[element_type], count, f"metadata {key!r}")
    return values.astype(bool).tolist() if element_type == _BOOL else values.tolist()


def _alignment(cursor: "_Cursor", metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a positive power of two")
    return alignment


@dataclass(frozen=True)
class _RawTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne[0] (innermost) first
    type_id: int
    relative_offset: int


def _read_tensor_info(cursor: "_Cursor") -> _RawTensorInfo:
    name = cursor.string("a tensor name")
    n_dims = cursor.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(cursor.numbers("<u8", n_dims, f"the shape of tensor {name!r}").tolist())
    type_id = cursor.u32(f"the type of tensor {name!r}")
    offset = cursor.u64(f"the data offset of tensor {name!r}")
    return _RawTensorInfo(name, dims, type_id, offset)


def _place(
    cursor: "_Cursor", raw: _RawTensorInfo, data_start: int, alignment: int
) -> GGUFTensorInfo:
    """Check one tensor's type, shape and offset, and locate its bytes in the file."""
    where = f"tensor {raw.name!r}"
    if raw.type_id not in GGML_QUANT_SIZES:
        raise cursor.fail(f"{where} has unknown ggml type {raw.type_id}")
    ggml_type = GGMLQuantizationType(raw.type_id)
    if any(dim == 0 for dim in raw.dims):
        raise cursor.fail(f"{where} has an empty dimension in shape {list(raw.dims)}")
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if raw.dims[0] % block_size:
        raise cursor.fail(
            f"{where}: a row of {raw.dims[0]} values is not a whole number of "
            f"{ggml_type.name} blocks of {block_size}"
        )
    if raw.relative_offset % alignment:
        raise cursor.fail(f"{where}: data offset {raw.relative_offset} is not {alignment}-aligned")
    num_elements = int(np.prod(raw.dims, dtype=object))
    num_bytes = num_elements // block_size * block_bytes
    offset = data_start + raw.relative_offset
    if offset + num_bytes > cursor.size:
        raise cursor.fail(
            f"{where} needs bytes {offset}..{offset + num_bytes} but the file has only "
            f"{cursor.size} (truncated?)"
        )
    return GGUFTensorInfo(raw.name, raw.dims[::-1], ggml_type, offset, num_bytes)


def _check_layout(cursor: "_Cursor", tensors: tuple[GGUFTensorInfo, ...]) -> None:
    """Names are unique and no two tensors share bytes."""
    names = [info.name for info in tensors]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise cursor.fail(f"tensor {duplicate!r} appears twice")
    by_offset = sorted(tensors, key=lambda info: info.offset)
    for before, after in itertools.pairwise(by_offset):
        if before.offset + before.num_bytes > after.offset:
            raise cursor.fail(f"tensors {before.name!r} and {after.name!r} overlap")


class _Cursor:
    """Reads little-endian values front to back, checking each read against the end of the file."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer = buffer
        self.path = path
        self.pos = 0
        self.size = len(buffer)

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {reason}")

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, num_bytes: int, what: str) -> memoryview:
        if num_bytes > self.remaining():
            raise self.fail(
                f"the file ends inside {what} (needs {num_bytes} bytes at offset {self.pos}, "
                f"{self.remaining()} left; truncated or corrupt)"
            )
        start = self.pos
        self.pos += num_bytes
        return self.buffer[start : self.pos]

    def numbers(self, dtype: str, count: int, what: str) -> np.ndarray:
        width = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * width, what), dtype=dtype, count=count)

    def u32(self, what: str) -> int:
        return int(self.numbers("<u4", 1, what)[0])

    def u64(self, what: str) -> int:
        return int(self.numbers("<u8", 1, what)[0])

    def string(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        return self._decode(self.take(length, what), what)

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: the tokenizer's vocabulary, so the loop is kept tight."""
        if count * _U64.size > self.remaining():
            raise self.fail(f"{what} claims {count} strings, more than the file can hold")
        buffer, pos, size = self.buffer, self.pos, self.size
        read_length = _U64.unpack_from
        values: list[str] = []
        for _ in range(count):
            if pos + _U64.size > size:
                break
            (length,) = read_length(buffer, pos)
            pos += _U64.size
            if pos + length > size:
                break
            values.append(self._decode(buffer[pos : pos + length], what))
            pos += length
        self.pos = pos
        if len(values) < count:
            raise self.fail(f"the file ends inside string {len(values)} of {what} (truncated?)")
        return values

    def _decode(self, raw: memoryview, what: str) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error.reason})") from error
