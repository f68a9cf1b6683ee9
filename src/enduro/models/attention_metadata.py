"""The tensors one forward pass needs to read and write the paged KV cache.

Built once per step by `runner/input_batch.py` and handed to the model explicitly (never a
module global). A step holds R requests and T new tokens in total, flattened in request order:
request r owns flat tokens `query_start_loc[r] : query_start_loc[r + 1]`.

A step that mixes decode requests (one new token) with prompt chunks attends in two parts
(`parts`), each with metadata of its own requests: padded into one layout, every one-token
query would take the longest chunk's rows (16 decode requests beside one 128-token chunk:
2,048 padded query rows for 143 real ones, ≈10 ms a layer on the default model).
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    # [T] flat slot (block_id * block_size + offset) where each new token's K/V is written.
    slot_mapping: torch.Tensor
    # Per sliding window (None = full attention): [R, num_blocks] block ids each request's
    # layers of that window read, from the first block its window reaches; padding entries
    # are masked out.
    block_tables: dict[int | None, torch.Tensor]
    # [R] tokens in each request's context after this step (cached + new).
    seq_lens: torch.Tensor
    # [R + 1] prefix sums of the new tokens per request.
    query_start_loc: torch.Tensor
    # [T] index of each flat token in the padded [R * max_query_len] layout attention uses.
    padded_index: torch.Tensor
    # The longest query of the step rounded up to a `layers.row_bucket`: the padded layout's
    # query length (1 exactly when every request adds one token).
    max_query_len: int
    # Boolean masks [R, 1, max_query_len, num_blocks * block_size] over the keys of the same
    # window's block tables, True = may attend, keyed by sliding window (None = full causal).
    # Padding query rows attend to the first key so softmax never sees an all-masked row.
    masks: dict[int | None, torch.Tensor]
    # Per sliding window, [R]: the position of the key in slot 0 of each request's table, and
    # the first key a request's last token attends (what a decode step's attention reads
    # without the masks: keys key_starts[r] .. seq_lens[r] - 1).
    table_starts: dict[int | None, torch.Tensor]
    key_starts: dict[int | None, torch.Tensor]
    # A mixed step's parts: (decode requests, prompt-chunk requests). Then the fields above
    # from block_tables to key_starts are empty (padded_index too): only the parts are read.
    parts: tuple["AttentionPart", ...] = field(default=())

    @property
    def num_requests(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(frozen=True)
class AttentionPart:
    """Some of a step's requests, attended in one call: `tokens` [T_part] are the flat rows of
    their new tokens (in request order) and `metadata` describes them alone."""

    tokens: torch.Tensor
    metadata: AttentionMetadata
