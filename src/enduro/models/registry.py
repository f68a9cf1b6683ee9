"""Registry key → model class, and `build_model`.

`ArchConfig.from_hf_config` maps config.json `architectures` / `model_type` names to the
registry key (`arch_config.ARCHITECTURE_KEYS`); this maps the key to the class that runs it.
"""

from collections.abc import Callable

import torch

from enduro.models.arch_config import ArchConfig
from enduro.models.base import CausalLM
from enduro.models.gemma3 import Gemma3ForCausalLM
from enduro.models.glm import Glm4ForCausalLM
from enduro.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, Callable[[ArchConfig, torch.dtype], CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "glm4": Glm4ForCausalLM,
}


def build_model(arch: ArchConfig, dtype: torch.dtype) -> CausalLM:
    """The model for `arch` on the meta device: it holds no memory until `load_weights`."""
    model_class = MODEL_CLASSES.get(arch.architecture)
    if model_class is None:
        raise ValueError(f"no model for {arch.architecture!r}; known: {sorted(MODEL_CLASSES)}")
    with torch.device("meta"):
        return model_class(arch, dtype).eval()
