"""Continuous batching: each step picks which sequences run and how many of
their tokens, under a sequence cap and a token budget.

Running sequences go first (a decode is one token; an unfinished prefill gets
its next chunk). Waiting sequences are then admitted in arrival order while
budget, sequence slots and KV blocks last; a prompt longer than the remaining
budget is prefilled in chunks over several steps. When a running sequence
needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue, keeping
the tokens it generated; they are recomputed (often from the prefix cache)
when it is readmitted, so its result does not change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pinfer.engine.block_manager import BlockManager
from pinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes

    @property
    def completes_prefill(self) -> bool:
        """After this step all of seq's tokens are computed, so its next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        # 1) running sequences, oldest first
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()  # newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                index += 1

        # 2) admit waiting sequences (not in a step that had to preempt: the pool is full)
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(hits) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.can_allocate(seq, num_new, hits):
                break
            self.waiting.popleft()
            self.block_manager.allocate_prefix(seq, hits)
            allocated = self.block_manager.allocate_slots(seq, num_new)
            assert allocated
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence from whichever queue holds it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
