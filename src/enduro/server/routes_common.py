"""OpenAPI declarations the routes share, so the schema lists every status a route can answer
and describes the SSE stream (schemathesis holds the app to both)."""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from enduro.server.protocol import (
    ChatCompletionChunk,
    CompletionResponse,
    ErrorResponse,
    error_responses,
)

# Any route: bad input, bad key, body or headers too big, and the last-resort 500.
COMMON_ERRORS = (400, 401, 413, 431, 500)
MODEL_RESPONSES = error_responses(*COMMON_ERRORS, 404)
# Models that appear only inside SSE events, so FastAPI would not list them by itself.
STREAM_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionChunk,
    CompletionResponse,
    ErrorResponse,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: `data` is a JSON chunk, an error envelope, or `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


def generation_responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    stream = {"text/event-stream": {"schema": sse_event_schema(chunk)}}
    description = (
        "The response; with `stream: true`, server-sent events: one JSON chunk per event "
        "(an error envelope if generation fails midway), then `[DONE]`."
    )
    responses = error_responses(*COMMON_ERRORS, 404, 503)
    responses[200] = {"description": description, "content": stream}
    return responses


def customize_openapi(app: FastAPI) -> None:
    """Make the schema say what the app does: FastAPI's 422 entries go (validation errors are
    400s here), and the models that appear only inside SSE events join the components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI caches it; the cached dict is fixed up once
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if ChatCompletionChunk.__name__ not in components:
            _drop_422(schema, components)
            _, definitions = models_json_schema(
                [(model, "serialization") for model in STREAM_MODELS],
                ref_template="#/components/schemas/{model}",
            )
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault(name, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_422(schema: dict[str, Any], components: dict[str, Any]) -> None:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
