import math

import pytest

from enduro.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ("",)}, "stop strings"),
        ({"stop": tuple("x" * 17)}, "at most 16"),
    ],
)
def test_invalid_values_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_a_single_stop_string_becomes_a_tuple() -> None:
    params = SamplingParams(stop="END")  # type: ignore[arg-type]
    assert params.stop == ("END",)
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams().has_penalties
