"""schemathesis against the app's own OpenAPI schema: generated requests, valid and not, never
get a 500 or a response the schema does not describe."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.fakes import tiny_app, tiny_engine

KEY = "sk-schema"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir: Callable[[str], Path]) -> Iterator[schemathesis.BaseSchema]:
    # A short context keeps each generated request to a few engine steps.
    engine = tiny_engine(tiny_model_dir("llama"), max_model_len=256)
    app = tiny_app(engine, max_n=2, max_queue=8, api_key=KEY)
    # An invalid body may also be too large (a random one over the 1 MiB limit): 413 is as
    # right a rejection as 400 or 422, and the schema lists it.
    config = SchemathesisConfig.from_dict(
        {
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
                }
            }
        }
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH, config=config)
    engine.close()


# The generation routes and the rest; a test below keeps this list equal to the schema's.
OPERATIONS = [
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /tokenize",
    "POST /detokenize",
    "GET /v1/models",
    "GET /health",
    "GET /ready",
    "GET /version",
]
WITH_BODY = [label for label in OPERATIONS if label.startswith("POST")]
GENERATION = OPERATIONS[:2]


def test_the_schema_has_these_operations(api_schema: schemathesis.BaseSchema) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}  # type: ignore[union-attr]
    assert labels == set(OPERATIONS)


def runnable(case: schemathesis.Case, stream: bool) -> schemathesis.Case:
    """Most fuzzed generation requests are rightly refused (a random model name, a prompt
    longer than the context, max_tokens 10^5); this variant keeps the fuzzed sampling fields
    but makes the rest servable, so streams, logprobs and chat answers get checked too."""
    body = case.body
    if isinstance(body, dict):
        body.pop("model", None)
        scoring = body.get("echo") is True and body.get("max_tokens") == 0
        body["max_tokens"] = 0 if scoring else 4
        body.pop("max_completion_tokens", None)
        n = body.get("n", 1)
        body["n"] = min(n, 2) if isinstance(n, int) else 1
        body["stream"] = stream
        if "prompt" in body:
            body["prompt"] = "Hello world"
        if isinstance(body.get("messages"), list):
            body["messages"] = [{"role": "user", "content": "Hi"}]
    return case


def run_cases(
    schema: schemathesis.BaseSchema, label: str, mode: GenerationMode, servable: bool = False
) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None
    cases = operation.as_strategy(generation_mode=mode)

    # schemathesis' own pytest integration (from_fixture) breaks on pytest 9, so the cases come
    # from the operation's hypothesis strategy instead.
    @given(case=st.builds(runnable, cases, st.booleans()) if servable else cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    check()


@pytest.mark.parametrize("label", OPERATIONS)
def test_valid_requests_conform(api_schema: schemathesis.BaseSchema, label: str) -> None:
    run_cases(api_schema, label, GenerationMode.POSITIVE)


@pytest.mark.parametrize("label", GENERATION)
def test_servable_generation_requests_conform(
    api_schema: schemathesis.BaseSchema, label: str
) -> None:
    run_cases(api_schema, label, GenerationMode.POSITIVE, servable=True)


@pytest.mark.parametrize("label", WITH_BODY)
def test_invalid_requests_are_rejected_and_conform(
    api_schema: schemathesis.BaseSchema, label: str
) -> None:
    run_cases(api_schema, label, GenerationMode.NEGATIVE)
