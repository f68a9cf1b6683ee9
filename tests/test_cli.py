import pytest
from typer.testing import CliRunner

from enduro import LLM, SamplingParams
from enduro.cli import app


@pytest.mark.slow
def test_generate_streams_the_greedy_continuation() -> None:
    prompt = "The capital of France is"
    args = ["generate", prompt, "--max-tokens", "8", "--temperature", "0", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = LLM(None, dtype="float32").generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0)
    )[0]
    assert result.stdout.rstrip("\n").endswith(prompt + expected.outputs[0].text)


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "generate" in result.output
    assert "bench" in result.output
