"""The engine wire format: exact round trips, framing, and malformed input refused cleanly."""

import asyncio
import io
import math
from typing import Any

import msgpack
import pytest

from enduro.config import EngineConfig
from enduro.outputs import EngineCoreOutput, TokenLogprobs
from enduro.request import FinishReason
from enduro.sampling_params import SamplingParams
from enduro.server.ipc import (
    HEADER,
    MAX_FRAME_BYTES,
    AbortRequests,
    AddRequest,
    CommandResult,
    EngineCommand,
    EngineStats,
    ErrorReport,
    Heartbeat,
    Message,
    ModelInfo,
    ProtocolError,
    Ready,
    Shutdown,
    StepOutputs,
    decode_config,
    decode_message,
    encode_config,
    encode_message,
    pack_frame,
    read_frame,
    read_frame_sync,
)

PARAMS = SamplingParams(
    max_tokens=None,
    temperature=0.7,
    top_p=0.85,
    top_k=40,
    min_p=0.05,
    frequency_penalty=0.2,
    repetition_penalty=1.1,
    seed=1234,
    stop=("</answer>", "\n\n"),
    stop_token_ids=(2, 7),
    logprobs=3,
    prompt_logprobs=0,
    include_stop_str_in_output=True,
)
LOGPROBS = TokenLogprobs(
    token_id=42,
    logprob=-0.123456789012345,
    rank=2,
    top_token_ids=[7, 42],
    top_logprobs=[-0.1, -math.inf],
)
OUTPUTS = [
    EngineCoreOutput("a", new_token_ids=[42], new_logprobs=[LOGPROBS], num_cached_tokens=16),
    EngineCoreOutput("b", new_prompt_logprobs=[LOGPROBS, LOGPROBS]),
    EngineCoreOutput("c", new_token_ids=[2], finish_reason=FinishReason.STOP),
    EngineCoreOutput("d", finish_reason=FinishReason.ERROR, error="prompt too long"),
    EngineCoreOutput("e", new_token_ids=[7], first_scheduled_time=1234.000125),
]
STATS = EngineStats(
    time=12.5,
    num_steps=3,
    last_step_time=None,
    num_running=1,
    num_waiting=2,
    num_used_blocks=5,
    num_cached_blocks=4,
    num_free_blocks=123,
    num_blocks=128,
    max_num_blocks=256,
    num_segments=4,
    max_num_segments=8,
    num_segments_grown=5,
    num_segments_released=1,
    num_compaction_moves=12,
    num_evictions=3,
    num_preemptions=0,
    num_prefix_queries=40,
    num_prefix_hits=16,
    num_prompt_tokens=40,
    num_prefill_tokens=24,
    num_generation_tokens=9,
    kv_cache_fragmentation=0.375,
    kv_cache_bytes=1 << 20,
    pool_violations=["3 blocks hold references no live request accounts for"],
    python_heap_bytes=None,
    malloc_allocated_bytes=400_000_000,
    malloc_held_bytes=None,
    num_allocator_purges=3,
    memory_bytes=1_000_000_000,
    step_seconds_counts=[0, 1, 2, *[0] * 14, 1],
    step_seconds_sum=20.25,
)
MESSAGES: list[Message] = [
    AddRequest("req-1", [1, 5, 17, 42], PARAMS),
    AddRequest("req-2", [3], SamplingParams()),
    AbortRequests(["req-1", "req-2"]),
    Shutdown(),
    EngineCommand(7, "trim", '{"keep_fraction": 0.5}'),
    CommandResult(7, True, '{"evicted_blocks": 3}'),
    CommandResult(8, False, '{"error": "unknown engine command"}'),
    Ready(ModelInfo("/models/tiny", 1024, 512, (2, 106), "/models/tiny", 128, 4, "float32")),
    Ready(ModelInfo("/models/x.gguf", 2048, 512, (), None, 64, 16, "bfloat16")),
    StepOutputs(OUTPUTS),
    StepOutputs([]),
    Heartbeat(STATS),
    ErrorReport("Traceback (most recent call last): ..."),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_is_exact(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


def test_each_finish_reason_survives() -> None:
    for reason in FinishReason:
        message = StepOutputs([EngineCoreOutput("r", finish_reason=reason)])
        decoded = decode_message(encode_message(message))
        assert isinstance(decoded, StepOutputs)
        assert decoded.outputs[0].finish_reason is reason


def test_messages_are_plain_msgpack_maps() -> None:
    body = msgpack.unpackb(encode_message(AbortRequests(["x"])))
    assert body == {"type": "abort", "request_ids": ["x"]}
    add = msgpack.unpackb(encode_message(MESSAGES[0]))
    assert add["params"]["stop"] == ["</answer>", "\n\n"]
    out = msgpack.unpackb(encode_message(StepOutputs(OUTPUTS[2:3])))
    assert out["outputs"][0]["finish_reason"] == "stop"


def test_engine_config_round_trip() -> None:
    config = EngineConfig.from_kwargs(
        model="/m", dtype="float32", block_size=4, num_blocks=128, max_num_seqs=3, seed=9
    )
    assert decode_config(encode_config(config)) == config
    assert decode_config(encode_config(EngineConfig())) == EngineConfig()


def test_frames_over_a_stream_sync() -> None:
    stream = io.BytesIO(b"".join(pack_frame(m) for m in MESSAGES))
    frames = iter(lambda: read_frame_sync(stream), None)
    assert [decode_message(frame) for frame in frames] == MESSAGES


def test_frames_over_a_stream_async() -> None:
    async def read_all(data: bytes) -> list[Message]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        messages = []
        while (frame := await read_frame(reader)) is not None:
            messages.append(decode_message(frame))
        return messages

    data = b"".join(pack_frame(m) for m in MESSAGES)
    assert asyncio.run(read_all(data)) == MESSAGES
    with pytest.raises(ProtocolError, match="inside a frame"):
        asyncio.run(read_all(data[:-1]))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (pack_frame(Shutdown())[:2], "inside a frame header"),
        (pack_frame(Shutdown())[:-1], "inside a frame"),
        (HEADER.pack(MAX_FRAME_BYTES + 1), "limit"),
    ],
)
def test_broken_frames_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        read_frame_sync(io.BytesIO(data))


def _packed(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


ADD = {"type": "add", "request_id": "r", "prompt_token_ids": [1, 2], "params": {}}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xc1", "not a msgpack message"),  # 0xc1 is never used in msgpack
        (b"\x92\x01", "not a msgpack message"),  # truncated array
        (_packed([1, 2]), "a message is a map"),
        (_packed({"request_ids": []}), "unknown message type None"),
        (_packed({"type": "launch_missiles"}), "unknown message type 'launch_missiles'"),
        (_packed({"type": ["abort"]}), "unknown message type"),
        (_packed({1: 2}), "not a msgpack message"),  # non-string map keys
        (_packed({"type": "abort"}), "request_ids"),  # a required field is missing
        (_packed({"type": "abort", "request_ids": "r"}), "expected a list"),
        (_packed({"type": "abort", "request_ids": [1]}), r"request_ids\[0\]: expected str"),
        (_packed({"type": "shutdown", "now": True}), "unknown field 'now'"),
        (_packed({**ADD, "prompt_token_ids": [1, True]}), "expected int, got bool"),
        (_packed({**ADD, "prompt_token_ids": [1.5]}), "expected int, got float"),
        (_packed({**ADD, "params": {"temperature": -1.0}}), "temperature must be >= 0"),
        (_packed({**ADD, "params": {"max_tokens": "9"}}), "params.max_tokens"),
        (_packed({**ADD, "params": {"stop": [3]}}), r"params.stop\[0\]: expected str"),
        (_packed({**ADD, "params": {"evil": 1}}), "unknown field 'evil'"),
        (_packed({**ADD, "params": msgpack.ExtType(1, b"x")}), "expected a SamplingParams"),
        (
            _packed({"type": "outputs", "outputs": [{"request_id": "r", "finish_reason": "x"}]}),
            "'x' is not a valid FinishReason",
        ),
        (
            _packed({"type": "outputs", "outputs": [{"request_id": "r", "new_logprobs": [{}]}]}),
            r"outputs\[0\].new_logprobs\[0\]",
        ),
    ],
)
def test_malformed_messages_raise_protocol_error(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_message(data)


def test_bad_engine_config_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_config("{")
    with pytest.raises(ProtocolError, match="dtype must be one of"):
        decode_config('{"model": {"dtype": "float8"}}')
