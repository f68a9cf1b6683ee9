"""enduro: an LLM inference server built to run for weeks without slowing down or growing."""

from typing import TYPE_CHECKING, Any

from enduro.sampling_params import SamplingParams

if TYPE_CHECKING:
    from enduro.engine.llm import LLM
    from enduro.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so the pure-Python core can be imported without loading torch.
    if name == "LLM":
        from enduro.engine.llm import LLM

        return LLM
    if name in ("CompletionOutput", "RequestOutput"):
        from enduro import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
