"""Block manager: allocation, free, ref counts, prefix hits, LRU eviction, no leaks."""

from pinfer.engine.block_manager import BlockManager
from pinfer.engine.sequence import Sequence
from pinfer.sampling_params import SamplingParams

BS = 4


def make_seq(seq_id: int, tokens: list[int], prompt_logprobs: int | None = None) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=str(seq_id), sample_index=0, prompt_len=len(tokens),
                    token_ids=list(tokens), params=SamplingParams(prompt_logprobs=prompt_logprobs), seed=0)


def admit(bm: BlockManager, seq: Sequence) -> None:
    hits = bm.match_prefix(seq)
    bm.allocate_prefix(seq, hits)
    assert bm.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(0, list(range(10)))  # 10 tokens -> 3 blocks
    admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_decode_allocates_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(0, list(range(7)))
    admit(bm, seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(100)  # 8th token fits block 2
    assert bm.allocate_slots(seq, 1)
    seq.num_computed_tokens += 1
    assert len(seq.block_table) == 2
    seq.token_ids.append(101)  # 9th token needs block 3
    assert bm.allocate_slots(seq, 1)
    assert len(seq.block_table) == 3


def test_allocation_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(0, list(range(12)))  # needs 3 blocks
    assert not bm.allocate_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_hits_and_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 108))  # two full blocks
    a = make_seq(0, prefix + [1, 2, 3])
    b = make_seq(1, prefix + [7, 8])
    admit(bm, a)
    hits = bm.match_prefix(b)
    assert [h.block_id for h in hits] == a.block_table[:2]
    admit(bm, b)
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_prefix_hit_survives_free_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, list(range(8)))
    admit(bm, a)
    bm.free(a)  # cached but unused now
    again = make_seq(1, list(range(8)))  # identical prompt: only the first block may be reused
    hits = bm.match_prefix(again)
    assert len(hits) == 1
    admit(bm, again)
    assert again.num_cached_tokens == 4 and bm.prefix_hit_rate > 0


def test_hash_hit_verifies_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(0, [1, 2, 3, 4, 5])
    admit(bm, a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # simulate a hash collision: same hash, other tokens
    assert bm.match_prefix(make_seq(1, [1, 2, 3, 4, 5])) == []


def test_prompt_logprobs_requests_bypass_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit(bm, make_seq(0, list(range(9))))
    assert bm.match_prefix(make_seq(1, list(range(9)), prompt_logprobs=1)) == []


def test_lru_eviction_evicts_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=3, block_size=BS)
    old = make_seq(0, [1, 1, 1, 1, 0])
    new = make_seq(1, [2, 2, 2, 2, 0])
    admit(bm, old)
    bm.free(old)
    admit(bm, new)
    bm.free(new)
    # The pool is 3 blocks; a 1-block request must take a block with no cached contents
    # first, then the least recently freed cached block (old's), keeping new's.
    filler = make_seq(2, [5, 5])
    admit(bm, filler)
    filler2 = make_seq(3, [6, 6])
    admit(bm, filler2)
    assert bm.match_prefix(make_seq(4, [1, 1, 1, 1, 0])) == []  # evicted
    assert len(bm.match_prefix(make_seq(5, [2, 2, 2, 2, 0]))) == 1  # still cached


def test_reviving_a_cached_free_block_takes_it_off_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, list(range(5)))
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq(1, list(range(5)))
    admit(bm, b)
    assert bm.num_free_blocks == 2  # revived cached block + one new
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_reset_prefix_cache_forgets_contents():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(0, list(range(9)))
    admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(make_seq(1, list(range(9)))) == []


def test_sliding_window_returns_blocks_behind_every_window():
    """Window 8, blocks of 4: once the next token's window starts past a block, the block goes back."""
    bm = BlockManager(num_blocks=8, block_size=BS, sliding_window=8)
    seq = make_seq(0, list(range(10)))
    admit(bm, seq)  # positions 0..9 computed: 3 blocks, the next token (10) sees keys 3..10
    assert len(seq.block_table) == 3 and seq.num_released_blocks == 0
    live = []
    for token in range(10, 30):
        seq.token_ids.append(token)
        assert bm.allocate_slots(seq, 1)
        # the token at position p reads keys p-7..p: blocks before (p-7)//4 are free
        p = seq.num_computed_tokens
        assert seq.num_released_blocks == max(0, p - 7) // BS
        assert all(bm.blocks[b].ref_count == 0 for b in seq.block_table[: seq.num_released_blocks])
        assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table[seq.num_released_blocks :])
        live.append(len(seq.block_table) - seq.num_released_blocks)
        seq.num_computed_tokens += 1
    assert max(live) == 3  # 8 keys + the new one never span more than 3 blocks of 4
    assert len(seq.block_table) == 8  # 30 positions, though the pool of 8 also holds free blocks
    bm.free(seq)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_released_window_blocks_stay_in_the_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=BS, sliding_window=4)
    first = make_seq(0, list(range(17)))
    admit(bm, first)
    first.token_ids.append(99)
    assert bm.allocate_slots(first, 1)  # position 17 reads 14..17: blocks 0..2 go back, cached
    assert first.num_released_blocks == 3
    second = make_seq(1, list(range(17)) + [5])
    hits = bm.match_prefix(second)
    assert [b.block_id for b in hits] == first.block_table[:4]  # the whole chain, released blocks too
    bm.allocate_prefix(second, hits)
    assert bm.allocate_slots(second, second.num_tokens - second.num_computed_tokens)
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)


def test_untouched_last_reuses_used_blocks_before_touching_new_ones():
    """A CPU pool's pages cost memory once first written: with untouched_last, a second
    request evicts the first one's cached blocks (LRU) instead of taking never-used ones,
    and never-used blocks are taken only when no used one is free."""
    bm = BlockManager(num_blocks=8, block_size=BS, untouched_last=True)
    first = make_seq(0, list(range(8)))  # 2 full blocks
    admit(bm, first)
    used = set(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 8
    second = make_seq(1, [7] * 8)
    admit(bm, second)
    assert set(second.block_table) == used  # the same two blocks again
    assert bm.match_prefix(make_seq(2, list(range(8)))) == []  # first's contents were evicted
    third = make_seq(3, [5] * 12)  # needs 3 blocks, none used and free: untouched ones now
    admit(bm, third)
    assert not set(third.block_table) & used
    bm.free(second)
    bm.free(third)
    assert bm.num_free_blocks == 8


def test_default_order_keeps_cached_blocks_while_untouched_ones_remain():
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = make_seq(0, list(range(8)))
    admit(bm, first)
    bm.free(first)
    admit(bm, make_seq(1, [7] * 8))
    assert len(bm.match_prefix(make_seq(2, list(range(8))))) == 1  # still cached (hit leaves the last token)
