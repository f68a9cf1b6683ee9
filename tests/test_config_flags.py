from dataclasses import fields

import pytest
from typer.testing import CliRunner

from enduro.cli import SERVE_CONFIGS, app
from enduro.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from enduro.config_flags import config_parameters, field_docs, split_by_class


def test_every_field_is_documented_and_becomes_one_flag() -> None:
    names = [f.name for cls in SERVE_CONFIGS for f in fields(cls)]
    assert len(names) == len(set(names)), "two config sections share a field name"
    for cls in SERVE_CONFIGS:
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in fields(cls)}, cls.__name__
    parameters = config_parameters(*SERVE_CONFIGS)
    assert [p.name for p in parameters] == names
    assert field_docs(CacheConfig)["block_size"] == "Tokens per KV block."


def test_flag_values_route_back_to_their_section() -> None:
    model, cache, scheduler = split_by_class(
        {"dtype": "float32", "block_size": 8, "max_num_seqs": 2},
        ModelConfig,
        CacheConfig,
        SchedulerConfig,
    )
    assert (model, cache, scheduler) == (
        {"dtype": "float32"},
        {"block_size": 8},
        {"max_num_seqs": 2},
    )


def test_engine_config_rejects_unknown_options() -> None:
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(colour="blue")


def test_serve_help_lists_derived_flags() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0
    for flag in ("--max-num-batched-tokens", "--kv-cache-max", "--max-queue", "--api-key"):
        assert flag in result.output
    assert "--prefix-cache" in result.output and "--guard" in result.output


def test_serve_reports_invalid_values_as_bad_parameters() -> None:
    result = CliRunner().invoke(app, ["serve", "--block-size", "0"])
    assert result.exit_code != 0
    assert "block_size must be at least 1" in result.output
