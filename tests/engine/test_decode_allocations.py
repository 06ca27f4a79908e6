"""The steady-state decode step allocates a small fixed set of tensors: the same ones
every step, nothing that grows with the step number, nothing the size of the context's
K/V or of the pool (the K/V gather goes into the paged backend's workspace), and the
step's input tensors live in the runner's preallocated buffers."""

from __future__ import annotations

from collections import Counter

import torch

from pinfer import LLM, SamplingParams
from pinfer.tools.alloc_counter import AllocationCounter


def test_counter_sees_new_tensors_not_views_or_out():
    x = torch.zeros(4, 8)
    out = torch.empty(4, 8)
    with AllocationCounter() as counter:
        x.view(8, 4).transpose(0, 1)[1:]  # views: nothing new
        x.add_(1)  # in place
        torch.add(x, 1, out=out)  # into an existing tensor
    assert counter.count == 0
    with AllocationCounter() as counter:
        y = x + 1
        torch.tensor([1, 2, 3])
    assert counter.count == 2 and counter.nbytes == y.numel() * 4 + 3 * 8
    assert counter.signatures[("aten::add", (4, 8), "torch.float32")] == 1


def _shape_free(signatures: Counter) -> Counter:
    # (op, rank, dtype): what stays fixed when the context grows (the mask's length may change)
    return Counter({(op, len(shape), dtype): n for (op, shape, dtype), n in signatures.items()})


def test_steady_decode_allocates_a_fixed_small_set(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory="64MiB", block_size=4)
    engine = llm.engine
    batch, vocab = 4, engine.model_config.vocab_size
    # Plain temperature sampling: top-p/top-k widen their candidate sets in data-dependent rounds.
    params = SamplingParams(max_tokens=64, temperature=0.8, seed=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([1, 9690, 198, *range(1000 + i, 1010 + 3 * i)], params)
    for _ in range(3):  # prefill, then warm decode steps
        engine.step()

    runner = engine.runner
    input_storage = {name: buf.untyped_storage().data_ptr() for name, buf in runner.buffers.host.items()}
    model_inputs = []
    real_forward = runner.model.forward

    def spy(input_ids, positions, kv_caches, meta, backend):
        model_inputs.append((input_ids, positions, meta))
        return real_forward(input_ids, positions, kv_caches, meta, backend)

    runner.model.forward = spy
    steps = []
    counter = AllocationCounter()
    for _ in range(12):  # contexts ~16-25 -> ~28-37 tokens: crosses three 4-token blocks
        counter.reset()
        workspace, zeroed = runner.backend._workspace, runner.blocks_zeroed
        with counter:
            assert len(engine.step()) == batch
        grew = runner.backend._workspace is not workspace
        steps.append((counter.count, counter.nbytes, Counter(counter.signatures), grew,
                      runner.blocks_zeroed != zeroed))
    runner.model.forward = real_forward

    workspace_growths = [i for i, step in enumerate(steps) if step[3]]
    # Steps that grow the gather workspace or zero a first-used pool block make a few more tensors.
    steady = [step[:4] for step in steps if not step[3] and not step[4]]
    assert len(steady) >= 4
    # The gather workspace grows geometrically (with headroom), not every step or every block.
    assert len(workspace_growths) <= 3, workspace_growths
    counts = {count for count, _, _, _ in steady}
    assert len(counts) == 1, counts  # the same number of tensors every step
    assert len({frozenset(_shape_free(sigs).items()) for _, _, sigs, _ in steady}) == 1
    # Nothing the size of a K/V gather or of the pool: the biggest tensor is the logits.
    logits_bytes = batch * vocab * 4
    for _, _, sigs, _ in steady:
        for _, shape, dtype in sigs:
            numel = torch.Size(shape).numel()
            assert numel * torch.empty(0, dtype=getattr(torch, dtype[6:])).element_size() <= logits_bytes, shape
        assert not any(op == "aten::index_select" for op, _, _ in sigs)  # gathered K/V: in the workspace
    # What the context's growth adds over the run is tiny (the attention mask's length), far below
    # one layer's K/V gather growing by the same number of tokens.
    cfg = engine.model_config
    grown_tokens = 12
    one_layer_gather = 2 * batch * grown_tokens * cfg.num_kv_heads * cfg.head_dim * 4
    assert steady[-1][1] - steady[0][1] < one_layer_gather
    # The inputs are views of the preallocated buffers, every step.
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    for input_ids, positions, meta in model_inputs:
        assert ptr(input_ids) == input_storage["input_ids"] and ptr(positions) == input_storage["positions"]
        assert ptr(meta.block_tables) == input_storage["block_tables"]
        assert ptr(meta.slot_mapping) == input_storage["slot_mapping"]
        assert ptr(meta.context_lens) == input_storage["context_lens"]
    # Only the sampler's per-step parameter tensors are still made from Python lists (fixed: [B] each).
    fresh = {shape for _, _, sigs, _ in steady for op, shape, _ in sigs if op == "aten::lift_fresh"}
    assert fresh <= {(batch,)}, fresh
