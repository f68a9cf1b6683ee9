import json
import random
from typing import Any

import pytest
from pydantic import ValidationError

from enduro.bench.workloads import (
    SYSTEM_PROMPT,
    TOKENS_PER_WORD,
    AgentSession,
    Session,
    Workload,
    WorkloadRequest,
    bad_request,
    chat_request,
    long_request,
    prefill_request,
    text_of_tokens,
)
from enduro.server.protocol import ChatCompletionRequest, CompletionRequest


def drain(session: Session, reply: str = '<answer>do(action="Back")</answer>') -> list[Any]:
    requests = []
    while (request := session.next_request()) is not None:
        requests.append((request.endpoint, request.body, request.stream, request.expect_error))
        session.add_reply(reply, None)
    return requests


def chat_text(messages: list[dict[str, str]]) -> str:
    return "".join(
        f"<{message['role']}>{message['content']}</{message['role']}>" for message in messages
    )


def validate(request: WorkloadRequest) -> None:
    """As the server's schema does (it answers 400 when this raises)."""
    schema = ChatCompletionRequest if request.endpoint == "chat" else CompletionRequest
    schema.model_validate_json(json.dumps(request.body))


def test_text_has_the_word_count_of_its_token_budget() -> None:
    text = text_of_tokens(random.Random(0), 128)
    assert len(text.split()) == round(128 / TOKENS_PER_WORD)
    assert text[0].isupper() and text.endswith(".")


def test_workloads_are_deterministic_for_a_seed() -> None:
    def sessions(seed: int) -> list[Any]:
        workload = Workload("mixed", seed=seed)
        return [drain(workload.next_session()) for _ in range(50)]

    assert sessions(7) == sessions(7)
    assert sessions(7) != sessions(8)


def test_chat_and_long_shapes() -> None:
    chat = chat_request(random.Random(0))
    long = long_request(random.Random(0))
    assert chat.endpoint == "chat" and chat.body["max_tokens"] == 128
    assert len(chat.body["messages"][0]["content"].split()) == round(128 / TOKENS_PER_WORD)
    assert long.endpoint == "completions" and long.body["max_tokens"] == 64
    assert len(long.body["prompt"].split()) == round(1024 / TOKENS_PER_WORD)
    validate(chat)
    validate(long)


def test_prefill_is_a_512_token_completion_of_one_token() -> None:
    request = prefill_request(random.Random(0))
    assert request.endpoint == "completions" and request.body["max_tokens"] == 1
    assert len(request.body["prompt"].split()) == round(512 / TOKENS_PER_WORD)
    validate(request)
    first = Workload("prefill", seed=1).next_session().next_request()
    assert first is not None and first.body["max_tokens"] == 1


def test_agent_prompts_grow_by_one_turn_over_a_shared_prefix() -> None:
    session = AgentSession(random.Random(3), num_steps=6)
    previous: dict[str, Any] | None = None
    for step in range(1, 7):
        request = session.next_request()
        assert request is not None and request.stream and request.endpoint == "chat"
        messages = request.body["messages"]
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert len(messages) == 2 * step  # system, then (user, assistant) per step, new user
        assert f"Step {step}. Current app:" in messages[-1]["content"]
        assert "** Screen Info **" in messages[-1]["content"]
        if previous is not None:
            before_last_user = previous["messages"][:-1]
            assert chat_text(messages).startswith(chat_text(before_last_user))
            # The previous user turn is now its first line (with the task on step 1).
            stripped = messages[len(before_last_user)]["content"]
            assert previous["messages"][-1]["content"].startswith(stripped)
            assert "** Screen Info **" not in stripped
            assert messages[len(before_last_user) + 1] == {
                "role": "assistant",
                "content": f"reply {step - 1}",
            }
        session.add_reply(f"reply {step}", None)
        previous = request.body
    assert session.next_request() is None
    assert previous is not None and previous["messages"][1]["content"].startswith("Task: open ")


def test_agent_sampling_follows_the_phone_agent() -> None:
    request = AgentSession(random.Random(0), num_steps=1).next_request()
    assert request is not None
    body = request.body
    assert (body["temperature"], body["top_p"], body["frequency_penalty"]) == (0.0, 0.85, 0.2)
    assert 60 <= body["max_tokens"] <= 200
    for action in ("Tap", "Type", "Swipe", "Long Press", "Launch", "Back", "Finish"):
        assert f'do(action="{action}"' in SYSTEM_PROMPT
    assert "<think>" in SYSTEM_PROMPT and "<answer>" in SYSTEM_PROMPT
    validate(request)


def test_agent_session_stops_before_the_context_is_full() -> None:
    session = AgentSession(random.Random(0), num_steps=30, max_model_len=4096)
    assert session.next_request() is not None
    session.add_reply("ok", prompt_tokens=2000)
    assert session.next_request() is not None
    session.add_reply("ok", prompt_tokens=4096 - AgentSession.CONTEXT_RESERVE + 1)
    assert session.next_request() is None


def test_a_joining_agent_session_starts_mid_task_with_made_up_turns() -> None:
    session = AgentSession(random.Random(5), num_steps=10)
    session.join_at(4)
    request = session.next_request()
    assert request is not None
    messages = request.body["messages"]
    # system, then (user, assistant) for the three made-up steps, then the live step's screen.
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "Step 4. Current app:" in messages[-1]["content"]
    assert "** Screen Info **" in messages[-1]["content"]
    assert all("** Screen Info **" not in m["content"] for m in messages[1:-1])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert all(r.startswith("<think>") and r.endswith(")</answer>") for r in replies)
    assert len(drain(session)) == 7  # steps 4 .. 10
    validate(request)


def test_joining_sessions_are_caught_at_random_steps_of_longer_sessions() -> None:
    workload = Workload("agent", seed=1)
    steps = []
    for _ in range(400):
        session = workload.next_session(joining=True)
        assert isinstance(session, AgentSession)
        steps.append(session.num_done + 1)
    # Length-biased sessions (odds ∝ n over 4..30) at an even step: mean of (n + 1) / 2
    # weighted by n is ≈10.8; sessions that start fresh are all at step 1.
    assert 9.5 < sum(steps) / len(steps) < 12.5
    assert min(steps) == 1 and max(steps) >= 25


def test_joining_keeps_the_made_up_context_inside_the_model() -> None:
    workload = Workload("agent", seed=2, max_model_len=4096)
    for _ in range(100):
        session = workload.next_session(joining=True)
        assert isinstance(session, AgentSession)
        # ≈140 tokens per made-up step; 4096 - 1200 reserve - 1000 leaves room for 13.
        assert session.num_done + 1 <= 13


@pytest.mark.parametrize("seed", range(12))
def test_bad_requests_fail_the_server_schema(seed: int) -> None:
    request = bad_request(random.Random(seed))
    assert request.expect_error and not request.stream
    with pytest.raises(ValidationError):
        validate(request)


def test_mixed_has_every_kind_of_request() -> None:
    workload = Workload("mixed", seed=0)
    requests = [r for _ in range(2000) for r in [workload.next_session().next_request()] if r]
    bad = [r for r in requests if r.expect_error]
    assert 0.03 < len(bad) / len(requests) < 0.07
    assert {r.endpoint for r in requests} == {"chat", "completions"}
    assert {r.stream for r in requests} == {True, False}
    aborts = [r for r in requests if r.abort_after_tokens is not None]
    assert aborts and all(r.stream and 1 <= r.abort_after_tokens <= 16 for r in aborts)  # type: ignore[operator]
    assert any(len(r.body.get("messages", [])) > 1 for r in requests)  # agent sessions
    for request in requests:
        if not request.expect_error:
            validate(request)
