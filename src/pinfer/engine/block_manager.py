"""The paged KV cache's bookkeeping: which block holds which tokens of whom.

The pool is `num_blocks` fixed-size blocks. Each sequence owns a block table
(list of block ids). Blocks are reference counted so that sequences sharing a
prompt prefix share its blocks.

Prefix caching: a *full* block is keyed by a hash chained over the token ids
of every block up to and including it (so equal hashes mean equal prefixes);
on a hit the stored token ids are compared too, so a hash collision can never
serve wrong K/V. A block whose ref count drops to 0 keeps its contents and its
hash: it is "cached but unused" and sits in the free list, least recently
freed first, so allocation evicts in LRU order.

Untouched blocks last (`untouched_last`, the engine's choice for a CPU pool, whose pages cost
memory only once a step first writes them): allocation takes a block that held something
before, evicting cached contents in LRU order, and touches a never-used block only when
none is free. The resident pool then follows the peak number of blocks in use rather than
growing with every new prompt until the whole pool is resident; the price is that cached
contents are evicted while untouched capacity remains.

Sliding window (every layer attends to the last W tokens only, as in Mistral):
a running sequence's leading blocks that lie wholly before the window of the
next token it computes are never read again, so they go back to the pool while
it runs (keeping their prefix-cache entry). Their block-table entries stay as
stale ids: attention masks those positions, so reading whatever a stale block
now holds changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from pinfer.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, untouched_last: bool = False):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # set only when *every* layer has this window
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (oldest first). Values unused; OrderedDict gives O(1) removal on a cache hit.
        # With untouched_last, the never-used blocks wait apart and are taken only when it is empty.
        self.free_blocks: OrderedDict[int, None] = OrderedDict() if untouched_last else \
            OrderedDict((i, None) for i in range(num_blocks))
        self.untouched_blocks: deque[int] = deque(range(num_blocks) if untouched_last else ())
        self.hash_to_block: dict[int, int] = {}
        # hashes of each sequence's full blocks, in order (the chain)
        self.seq_block_hashes: dict[int, list[int]] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ---- stats ----------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.untouched_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # ---- allocation -------------------------------------------------------------

    def _take_free_block(self) -> Block:
        if self.free_blocks:
            block_id, _ = self.free_blocks.popitem(last=False)  # least recently freed
        else:
            block_id = self.untouched_blocks.popleft()
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def _ref(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_blocks[block.block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> list[Block]:
        """Cached blocks holding a prefix of seq's tokens (at least one token is left to compute)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hits: list[Block] = []
        parent: int | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(self.blocks[block_id])
            parent = h
        return hits

    def allocate_prefix(self, seq: Sequence, hits: list[Block]) -> None:
        """Give a newly admitted sequence the cached blocks of its prefix."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in hits:
            self._ref(block)
            seq.block_table.append(block.block_id)
        self.seq_block_hashes[seq.seq_id] = [b.hash for b in hits]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None) -> int:
        hits = hits or []
        cached_tokens = len(hits) * self.block_size
        total = seq.num_blocks_needed(seq.num_computed_tokens + cached_tokens + num_new_tokens, self.block_size)
        have = len(seq.block_table) + len(hits)
        # reusing a cached-but-free block also takes it off the free list
        revived = sum(1 for b in hits if b.ref_count == 0)
        return max(0, total - have) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[Block] | None = None) -> bool:
        return self.num_new_blocks_needed(seq, num_new_tokens, hits) <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Ensure blocks for seq's next num_new_tokens tokens; register blocks they fill.

        Returns False (allocating nothing) when the pool is short.
        """
        self._release_out_of_window(seq)
        total_blocks = seq.num_blocks_needed(seq.num_computed_tokens + num_new_tokens, self.block_size)
        missing = total_blocks - len(seq.block_table)
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_table.append(self._take_free_block().block_id)
        # Blocks filled by this step become prefix-cache entries now: their K/V is
        # written in this step's forward, before any attention reads it.
        self._register_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_block_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def _release_out_of_window(self, seq: Sequence) -> None:
        if self.sliding_window is None:
            return
        # The next token computed sits at position num_computed_tokens and sees keys > position - W.
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        num_out = min(max(0, first_needed) // self.block_size, len(seq.block_table))
        for block_id in seq.block_table[seq.num_released_blocks : num_out]:
            self._unref(block_id)
        seq.num_released_blocks = max(seq.num_released_blocks, num_out)

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None  # most recently used end
            if block.hash is None:
                self.free_blocks.move_to_end(block_id, last=False)  # no cached content: reuse first

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; tail blocks first so shared prefixes stay cached longest."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks :]):
            self._unref(block_id)
        seq.block_table.clear()
        seq.num_released_blocks = 0
        seq.num_computed_tokens = 0
        self.seq_block_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget all cached contents (e.g. after a weight update)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()
        for hashes in self.seq_block_hashes.values():
            hashes.clear()
