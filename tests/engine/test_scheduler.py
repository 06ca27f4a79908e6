"""Scheduler: token budget, chunked prefill, sequence cap, preemption of the newest."""

from pinfer.engine.block_manager import BlockManager
from pinfer.engine.scheduler import Scheduler
from pinfer.engine.sequence import Sequence, SequenceStatus
from pinfer.sampling_params import SamplingParams


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    tokens = [1000 * seq_id + i for i in range(num_tokens)]  # distinct: no prefix hits
    return Sequence(seq_id=seq_id, request_id=str(seq_id), sample_index=0, prompt_len=num_tokens,
                    token_ids=tokens, params=SamplingParams(), seed=0)


def run_step(scheduler: Scheduler, new_token: int = 7):
    """Schedule, then pretend the model ran: advance computed tokens and append a sample where due."""
    out = scheduler.schedule()
    for item in out.scheduled:
        completes = item.completes_prefill
        item.seq.num_computed_tokens += item.num_new_tokens
        if completes:
            item.seq.token_ids.append(new_token)
    return out


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    seq = make_seq(0, 25)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        out = run_step(sched)
        chunks.append(out.scheduled[0].num_new_tokens)
    assert chunks == [10, 10, 5]
    assert run_step(sched).scheduled[0].num_new_tokens == 1  # then decode


def test_running_decodes_go_first_and_waiting_fill_the_rest_of_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12)
    a, b = make_seq(0, 6), make_seq(1, 20)
    sched.add(a)
    run_step(sched)  # a prefilled
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 11)]
    assert out.num_tokens == 12


def test_max_num_seqs_caps_the_running_set():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1]
    assert seqs[2].status == SequenceStatus.WAITING


def test_out_of_blocks_preempts_the_newest_and_it_resumes_with_its_tokens():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_seq(0, 8), make_seq(1, 7)  # 2 blocks each: the pool is full after both prefill
    sched.add(old)
    sched.add(new)
    run_step(sched)
    assert bm.num_free_blocks == 0
    # old's 9th token needs a third block: new (the newest) is preempted
    out = run_step(sched)
    assert out.preempted == [new] and new.status == SequenceStatus.WAITING
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert new.token_ids[-1] == 7 and new.num_output_tokens == 1  # generated token kept
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    assert sched.num_preemptions == 1


def test_preempting_itself_when_alone_then_readmitted():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = make_seq(0, 8)
    sched.add(seq)
    run_step(sched)  # 8 tokens, 2 blocks, pool full; one token sampled
    out = run_step(sched)  # the 9th token needs a third block: nothing to preempt but itself
    assert out.preempted == [seq] and out.scheduled == []
    assert bm.num_free_blocks == 2
