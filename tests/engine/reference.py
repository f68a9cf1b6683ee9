"""transformers as the reference: greedy continuations and logprobs, no KV cache involved."""

import torch


@torch.inference_mode()
def hf_greedy(
    model: torch.nn.Module, prompt: list[int], num_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logprob of each, recomputing the full sequence every step."""
    ids = list(prompt)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(num_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return tokens, logprobs


@torch.inference_mode()
def hf_prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> list[float]:
    """Logprob of each prompt token after the first, given the tokens before it."""
    logits = model(torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)
    return logprobs.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()
