"""Block tables and lengths → the tensors attention needs (`AttentionMetadata`) and positions."""

import itertools
from collections.abc import Iterable, Sequence

import torch

from enduro.models.attention_metadata import AttentionMetadata, AttentionPart
from enduro.models.layers import row_bucket


def build_attention_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    windows: Iterable[int | None],
    device: torch.device | str = "cpu",
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for one step and the position of every new token (flat, request order).

    Request r computes its last `query_lens[r]` tokens out of `seq_lens[r]`; their K/V go to
    the slots its block table names for those positions. For a sliding window, each request's
    table starts at the block of the oldest key its first new token can still see, so a
    window layer reads about `window` keys per request however long the context is. A step
    mixing one-token queries with longer ones is split into two `parts`.
    """
    windows = set(windows)
    decode = [r for r, length in enumerate(query_lens) if length == 1]
    if not 0 < len(decode) < len(query_lens):
        return _one_part(query_lens, seq_lens, block_tables, block_size, windows, device)
    prompt = [r for r, length in enumerate(query_lens) if length > 1]
    query_start = [0, *itertools.accumulate(query_lens)]
    positions = torch.empty(query_start[-1], dtype=torch.long)
    slot_mapping = torch.empty(query_start[-1], dtype=torch.long)
    parts = []
    for rows in (decode, prompt):
        metadata, part_positions = _one_part(
            [query_lens[r] for r in rows],
            [seq_lens[r] for r in rows],
            [block_tables[r] for r in rows],
            block_size,
            windows,
            device,
        )
        tokens = torch.cat([torch.arange(query_start[r], query_start[r + 1]) for r in rows])
        positions[tokens] = part_positions.cpu()
        slot_mapping[tokens] = metadata.slot_mapping.cpu()
        parts.append(AttentionPart(tokens.to(device), metadata))
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        block_tables={},
        seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(query_start, dtype=torch.long, device=device),
        padded_index=torch.empty(0, dtype=torch.long, device=device),
        max_query_len=row_bucket(max(query_lens)),
        masks={},
        table_starts={},
        key_starts={},
        parts=tuple(parts),
    )
    return metadata, positions.to(device)


def _one_part(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    windows: set[int | None],
    device: torch.device | str,
) -> tuple[AttentionMetadata, torch.Tensor]:
    """build_attention_metadata for requests attended in one call (one padded layout)."""
    num_requests = len(query_lens)
    # The padded query length is rounded up like a matmul's rows: the CPU attention kernel
    # keeps a compiled micro-kernel for every query length (tail) it sees, live memory that
    # grew by tens of MiB over a soak as prefill chunks of new lengths came in
    # (benchmarks/README.md, "Memory"). Padding rows are masked and cost little.
    max_query_len = row_bucket(max(query_lens))
    max_num_blocks = max(len(table) for table in block_tables)
    positions = torch.cat(
        [
            torch.arange(s - q, s, dtype=torch.long)
            for q, s in zip(query_lens, seq_lens, strict=True)
        ]
    )
    tables = torch.zeros((num_requests, max_num_blocks), dtype=torch.long)
    for r, table in enumerate(block_tables):
        tables[r, : len(table)] = torch.tensor(table, dtype=torch.long)
    query_lens_t = torch.tensor(query_lens, dtype=torch.long)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.long)
    request_of_token = torch.repeat_interleave(torch.arange(num_requests), query_lens_t)
    query_start_loc = torch.zeros(num_requests + 1, dtype=torch.long)
    query_start_loc[1:] = torch.cumsum(query_lens_t, 0)
    offset_in_request = torch.arange(len(positions)) - query_start_loc[request_of_token]
    block_ids = tables[request_of_token, positions // block_size]
    slot_mapping = block_ids * block_size + positions % block_size
    padded_index = request_of_token * max_query_len + offset_in_request

    # Query positions in the padded layout; padding rows get -1 and are fixed up below.
    query_pos = torch.full((num_requests * max_query_len,), -1, dtype=torch.long)
    query_pos[padded_index] = positions
    query_pos = query_pos.view(num_requests, 1, max_query_len, 1)
    padding_rows = query_pos < 0
    first_query_pos = seq_lens_t - query_lens_t
    num_context_blocks = (seq_lens_t + block_size - 1) // block_size
    window_tables: dict[int | None, torch.Tensor] = {}
    masks: dict[int | None, torch.Tensor] = {}
    table_starts: dict[int | None, torch.Tensor] = {}
    key_starts: dict[int | None, torch.Tensor] = {}
    for window in windows:
        if window is None:
            first_block = torch.zeros(num_requests, dtype=torch.long)
        else:
            first_block = (first_query_pos - window + 1).clamp(min=0) // block_size
        width = int((num_context_blocks - first_block).max())
        # [R, width] block indices into `tables`; past a request's own blocks they read
        # padding (block 0), which the mask hides.
        index = (first_block.view(-1, 1) + torch.arange(width)).clamp(max=max_num_blocks - 1)
        window_tables[window] = tables.gather(1, index).to(device)
        # [R, 1, 1, width * block_size]: the position of each key slot the table reads.
        key_pos = (first_block.view(-1, 1) * block_size + torch.arange(width * block_size)).view(
            num_requests, 1, 1, -1
        )
        mask = (key_pos <= query_pos) & (key_pos < seq_lens_t.view(-1, 1, 1, 1))
        if window is not None:
            mask &= key_pos > query_pos - window
        # Padding query rows attend to their first key so softmax never sees an all-masked row.
        first_key = torch.arange(width * block_size).view(1, 1, 1, -1) == 0
        masks[window] = (mask | (padding_rows & first_key)).to(device)
        table_starts[window] = (first_block * block_size).to(device)
        # A request's last token sees the `window` keys before it (all of them without one).
        last_key_start = (
            (seq_lens_t - window).clamp(min=0)
            if window is not None
            else torch.zeros_like(seq_lens_t)
        )
        key_starts[window] = last_key_start.to(device)
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        block_tables=window_tables,
        seq_lens=seq_lens_t.to(device),
        query_start_loc=query_start_loc.to(device),
        padded_index=padded_index.to(device),
        max_query_len=max_query_len,
        masks=masks,
        table_starts=table_starts,
        key_starts=key_starts,
    )
    return metadata, positions.to(device)
