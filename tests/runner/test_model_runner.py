from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from enduro import LLM
from enduro.config import ModelConfig


def test_threads_sets_the_engine_torch_threads(tiny_model_dir: Callable[[str], Path]) -> None:
    before = torch.get_num_threads()
    try:
        LLM(str(tiny_model_dir("llama")), threads=1, num_blocks=16)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ModelConfig(threads=0)
