"""The wire format between the API process and the engine process: framed msgpack, never pickle.

A frame is a 4-byte big-endian length followed by one msgpack map, `{"type": kind, **fields}`.
Payloads are dataclasses written field by field (enums as their values, tuples as lists) and
read back by their type hints, so decoding checks every value: a malformed message or an
unknown kind raises ProtocolError rather than building a half-valid object.

API → engine: add, abort, shutdown. Engine → API: ready, outputs, heartbeat, error.
"""

import asyncio
import dataclasses
import enum
import functools
import json
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

from enduro.config import EngineConfig
from enduro.outputs import EngineCoreOutput
from enduro.sampling_params import SamplingParams

HEADER = struct.Struct(">I")
# Far above any real message (a step's outputs with top-20 logprobs for every request); a
# larger length means a corrupt stream, and reading it would allocate that much.
MAX_FRAME_BYTES = 64 << 20
# Upper bounds (seconds) of the engine's step-time histogram buckets, a +Inf bucket after
# them: a tiny model's decode step takes a millisecond, a long prefill chunk on CPU seconds.
STEP_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine loaded, sent once in `ready`."""

    source: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_dir: str | None
    num_blocks: int
    block_size: int
    dtype: str  # the weights' and KV cache's torch dtype, resolved ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineStats:
    """One heartbeat. Counters run from the end of warm-up; times are the engine's
    time.monotonic() (CLOCK_MONOTONIC, shared by the processes of one host)."""

    time: float  # when the heartbeat was sent
    num_steps: int
    last_step_time: float | None  # end of the latest step; None before the first
    num_running: int
    num_waiting: int
    num_used_blocks: int  # referenced by a request
    num_cached_blocks: int  # unreferenced prefix-cache blocks, evicted on demand
    num_free_blocks: int  # neither, in allocated segments
    num_blocks: int  # in allocated segments
    max_num_blocks: int
    num_segments: int  # allocated
    max_num_segments: int
    num_segments_grown: int
    num_segments_released: int
    num_compaction_moves: int  # blocks moved by compaction
    num_evictions: int  # cached blocks evicted
    num_preemptions: int
    num_prefix_queries: int  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int  # of those, tokens served from it
    num_prompt_tokens: int  # prompt tokens of the requests received
    num_prefill_tokens: int  # prompt tokens computed (recomputes included)
    num_generation_tokens: int
    kv_cache_fragmentation: float  # BlockPool.fragmentation
    kv_cache_bytes: int  # the KV pool's allocated segments
    pool_violations: list[str]  # broken pool invariants (KVCacheManager.check_invariants)
    python_heap_bytes: int | None  # observability/process_memory.py; None if unreadable
    # malloc's callers hold / malloc keeps (process_memory.MallocStats); None if unreadable.
    malloc_allocated_bytes: int | None
    malloc_held_bytes: int | None
    num_allocator_purges: int  # freed pages handed back to the kernel (engine/page_purge.py)
    # The engine's RssAnon + VmSwap, read together with the malloc figures: a purge between
    # two readings taken apart would make the kept pages and the RSS disagree.
    memory_bytes: int | None
    # Steps per bucket of STEP_SECONDS_BUCKETS, then the +Inf bucket (not cumulative), and
    # the sum of their durations in seconds.
    step_seconds_counts: list[int]
    step_seconds_sum: float


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    model_info: ModelInfo


@dataclass(frozen=True)
class StepOutputs:
    outputs: list[EngineCoreOutput]


@dataclass(frozen=True)
class Heartbeat:
    stats: EngineStats


@dataclass(frozen=True)
class EngineCommand:
    """A narrow action or query for the engine (engine/commands.py lists them). Arguments
    and results are JSON text: small, schema-free maps, and never pickle."""

    command_id: int
    name: str
    args_json: str


@dataclass(frozen=True)
class CommandResult:
    command_id: int
    ok: bool
    result_json: str  # the result map, or {"error": message} when not ok


@dataclass(frozen=True)
class ErrorReport:
    """The engine failed (load or step) and is about to exit non-zero."""

    message: str


Message = (
    AddRequest
    | AbortRequests
    | Shutdown
    | Ready
    | StepOutputs
    | Heartbeat
    | ErrorReport
    | EngineCommand
    | CommandResult
)

MESSAGE_KINDS: dict[str, type[Message]] = {
    "add": AddRequest,
    "abort": AbortRequests,
    "shutdown": Shutdown,
    "ready": Ready,
    "outputs": StepOutputs,
    "heartbeat": Heartbeat,
    "error": ErrorReport,
    "command": EngineCommand,
    "result": CommandResult,
}
_KIND_OF = {kind: name for name, kind in MESSAGE_KINDS.items()}


# ---- messages -------------------------------------------------------------------------------


def encode_message(message: Message) -> bytes:
    body = {"type": _KIND_OF[type(message)], **to_wire(message)}
    return msgpack.packb(body, use_bin_type=True)


def decode_message(data: bytes) -> Message:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"not a msgpack message ({type(e).__name__}: {e})") from e
    if not isinstance(body, dict):
        raise ProtocolError(f"a message is a map, not {type(body).__name__}")
    kind = body.pop("type", None)
    if not isinstance(kind, str) or kind not in MESSAGE_KINDS:
        raise ProtocolError(f"unknown message type {kind!r}")
    message: Message = from_wire(MESSAGE_KINDS[kind], body, kind)
    return message


def pack_frame(message: Message) -> bytes:
    body = encode_message(message)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("the stream ended inside a frame header") from e
        return None
    try:
        return await reader.readexactly(_frame_size(header))
    except asyncio.IncompleteReadError as e:
        raise ProtocolError("the stream ended inside a frame") from e


def read_frame_sync(stream: BinaryIO) -> bytes | None:
    """Blocking read_frame over a buffered binary stream (e.g. socket.makefile("rb"))."""
    header = stream.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise ProtocolError("the stream ended inside a frame header")
    size = _frame_size(header)
    body = stream.read(size)
    if len(body) < size:
        raise ProtocolError("the stream ended inside a frame")
    return body


def _frame_size(header: bytes) -> int:
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
    return int(size)


# ---- engine config (a command-line argument of the engine process) --------------------------


def encode_config(config: EngineConfig) -> str:
    return json.dumps(to_wire(config))


def decode_config(text: str) -> EngineConfig:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"engine config is not JSON: {e}") from e
    config: EngineConfig = from_wire(EngineConfig, data, "config")
    return config


# ---- dataclasses <-> plain maps, checked against type hints ---------------------------------


def to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [to_wire(item) for item in value]
    return value


def from_wire(hint: Any, value: Any, where: str) -> Any:
    """Rebuild a value of type `hint` from its wire form; ProtocolError if it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return _union_from_wire(typing.get_args(hint), value, where)
    if origin is list or origin is tuple:
        (item_hint, *_) = typing.get_args(hint)  # list[X] or tuple[X, ...]
        _expect(isinstance(value, list), where, "a list", value)
        items = [from_wire(item_hint, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{where}: {e}") from e
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass_from_wire(hint, value, where)
    return _scalar_from_wire(hint, value, where)


def _union_from_wire(options: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and types.NoneType in options:
        return None
    candidates = [option for option in options if option is not types.NoneType]
    for option in candidates[:-1]:
        try:
            return from_wire(option, value, where)
        except ProtocolError:
            continue
    return from_wire(candidates[-1], value, where)  # its error says what was expected


def _scalar_from_wire(hint: Any, value: Any, where: str) -> Any:
    # bool is an int in Python but never stands for a count or a float on the wire.
    accepted: dict[Any, tuple[type, ...]] = {
        int: (int,),
        float: (int, float),
        str: (str,),
        bool: (bool,),
        types.NoneType: (types.NoneType,),
    }
    if hint not in accepted:
        raise TypeError(f"no wire form for {hint}")  # a programming error, not bad input
    ok = isinstance(value, accepted[hint]) and (hint is bool or not isinstance(value, bool))
    _expect(ok, where, hint.__name__, value)
    return value


def _dataclass_from_wire(cls: type, value: Any, where: str) -> Any:
    _expect(isinstance(value, dict), where, f"a {cls.__name__} map", value)
    hints = _field_hints(cls)
    unknown = [key for key in value if key not in hints]
    if unknown:
        raise ProtocolError(f"{where}: unknown field {unknown[0]!r} for {cls.__name__}")
    fields = {name: from_wire(hints[name], item, f"{where}.{name}") for name, item in value.items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:  # a missing field, or the class's own validation
        raise ProtocolError(f"{where}: {e}") from e


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        raise ProtocolError(f"{where}: expected {expected}, got {type(value).__name__}")
