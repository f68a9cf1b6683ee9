"""SchedulerOutput (plain data) → the tensors of one forward pass."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from enduro.core.scheduler import SchedulerOutput
from enduro.models.attention_metadata import AttentionMetadata
from enduro.runner.attention_inputs import build_attention_metadata


@dataclass(frozen=True)
class PromptLogprobsSpan:
    """Flat rows whose logits score prompt tokens: row i predicts `target_token_ids[i]`."""

    request_id: str
    first_position: int  # prompt position of the first target token
    rows: list[int]
    target_token_ids: list[int]


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [S] flat row of the last token of each request that samples
    sample_request_ids: list[str]


def build_model_inputs(
    output: SchedulerOutput,
    block_size: int,
    windows: Iterable[int | None],
    device: torch.device,
) -> ModelInputs:
    scheduled = output.scheduled
    token_ids = [token for entry in scheduled for token in entry.token_ids]
    query_lens = [len(entry.token_ids) for entry in scheduled]
    seq_lens = [entry.num_computed_tokens + len(entry.token_ids) for entry in scheduled]
    attn, positions = build_attention_metadata(
        query_lens, seq_lens, [entry.block_ids for entry in scheduled], block_size, windows, device
    )
    ends = torch.cumsum(torch.tensor(query_lens), 0) - 1
    sampling = [i for i, entry in enumerate(scheduled) if entry.sample]
    return ModelInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=positions,
        attn=attn,
        sample_rows=ends[sampling].to(device),
        sample_request_ids=[scheduled[i].request_id for i in sampling],
    )


def prompt_logprobs_spans(
    output: SchedulerOutput, prompts: dict[str, list[int]], done: dict[str, int]
) -> list[PromptLogprobsSpan]:
    """For requests that want prompt logprobs, the rows of this step that score prompt tokens
    not yet scored (`done[request_id]` positions are)."""
    spans = []
    row = 0
    for entry in output.scheduled:
        prompt = prompts.get(entry.request_id)
        start = entry.num_computed_tokens
        if prompt is not None:
            # The token at position p scores position p + 1.
            first = max(start + 1, done[entry.request_id], 1)
            last = min(start + len(entry.token_ids), len(prompt) - 1)
            if first <= last:
                rows = list(range(row + first - 1 - start, row + last - start))
                spans.append(
                    PromptLogprobsSpan(entry.request_id, first, rows, prompt[first : last + 1])
                )
        row += len(entry.token_ids)
    return spans
