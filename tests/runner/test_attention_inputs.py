import torch

from enduro.runner.attention_inputs import build_attention_metadata

BLOCK_SIZE = 4


def test_slots_positions_and_padded_layout() -> None:
    # Request 0 prefills 3 tokens; request 1 decodes its 7th token (6 already computed).
    attn, positions = build_attention_metadata([3, 1], [3, 7], [[5], [2, 9]], BLOCK_SIZE, [None])
    assert positions.tolist() == [0, 1, 2, 6]
    assert attn.slot_mapping.tolist() == [20, 21, 22, 9 * 4 + 2]
    assert attn.padded_index.tolist() == [0, 1, 2, 3]
    assert attn.query_start_loc.tolist() == [0, 3, 4]
    assert attn.block_tables[None].tolist() == [[5, 0], [2, 9]]
    mask = attn.masks[None]
    assert mask.shape == (2, 1, 3, 8)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
    ]
    # Request 1's one query sees keys 0..6; its padding rows see the first key only.
    assert mask[1, 0].int().tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_window_tables_start_at_the_first_block_the_window_reaches() -> None:
    # Window 6. Request 0 decodes position 17 (keys 12..17 visible: blocks 3, 4 of its table);
    # request 1 computes positions 6..8 (keys from 1: blocks 0..2); request 2 is short.
    tables = [[10, 11, 12, 13, 14], [20, 21, 22], [30]]
    attn, _ = build_attention_metadata([1, 3, 2], [18, 9, 2], tables, BLOCK_SIZE, [6, None])
    assert attn.block_tables[None].tolist() == [
        [10, 11, 12, 13, 14],
        [20, 21, 22, 0, 0],
        [30, 0, 0, 0, 0],
    ]
    # Width 3 = request 1's three blocks; request 0 reads from its block 3, padded with its
    # table's padding (index clamped to the last column).
    assert attn.block_tables[6].tolist() == [[13, 14, 14], [20, 21, 22], [30, 0, 0]]
    mask = attn.masks[6]
    assert mask.shape == (3, 1, 3, 12)
    # Request 0's key slots hold positions 12..23: it sees 12..17.
    assert mask[0, 0, 0].int().tolist() == [1] * 6 + [0] * 6
    # Request 1's query at position 8 sees 3..8; at position 6, 1..6.
    assert mask[1, 0, 2].int().tolist() == [0, 0, 0] + [1] * 6 + [0] * 3
    assert mask[1, 0, 0].int().tolist() == [0] + [1] * 6 + [0] * 5
    # The full-attention mask of request 0 covers all 18 keys.
    assert attn.masks[None][0, 0, 0].int().tolist() == [1] * 18 + [0] * 2


def test_window_gather_reads_the_same_keys_as_the_full_table() -> None:
    """The visible keys under the window's table equal those under the full table."""
    cache = torch.arange(15 * BLOCK_SIZE).view(15, BLOCK_SIZE)  # slot value = slot id
    tables = [[3, 7, 1, 12, 9], [4, 8]]
    attn, _ = build_attention_metadata([2, 1], [19, 6], tables, BLOCK_SIZE, [5, None])
    for r in range(2):
        for q in range(2 if r == 0 else 1):
            full = cache[attn.block_tables[None][r]].flatten()[attn.masks[None][r, 0, q]]
            windowed = cache[attn.block_tables[5][r]].flatten()[attn.masks[5][r, 0, q]]
            assert windowed.tolist() == full.tolist()[-5:]
