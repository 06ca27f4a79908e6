"""The engine survives failures: a failed step or request fails only those
requests, frees their blocks, and the engine keeps serving. Streams never show
part of a stop string."""

from __future__ import annotations

import pytest

from pinfer import SamplingParams


def run_until_done(engine, request_ids):
    finished = {}
    while len(finished) < len(request_ids):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(smollm2_llm, monkeypatch):
    engine = smollm2_llm.engine
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real_execute(batch)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    rid = engine.add_request("Tell me a story.", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    out = run_until_done(engine, [rid])[rid]
    assert out.error == "engine step failed: RuntimeError: simulated kernel failure"
    assert out.outputs[0].finish_reason == "error" and len(out.outputs[0].token_ids) == 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    monkeypatch.setattr(engine.runner, "execute", real_execute)
    ok = smollm2_llm.generate("Tell me a story.", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                              use_tqdm=False)
    assert ok[0].error is None and len(ok[0].outputs[0].token_ids) == 8


def test_a_failing_request_does_not_disturb_its_batch(smollm2_llm):
    engine = smollm2_llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    good = engine.add_request("The sky is", params)
    bad = engine.add_request("The sea is", params)

    def broken(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")

    engine.requests[bad].detokenizers[0].add = broken
    outs = run_until_done(engine, [good, bad])
    assert outs[bad].error.startswith("UnicodeDecodeError") and outs[bad].outputs[0].finish_reason == "error"
    assert outs[good].error is None and len(outs[good].outputs[0].token_ids) == 6
    alone = smollm2_llm.generate("The sky is", params, use_tqdm=False)[0]
    assert outs[good].outputs[0].token_ids == alone.outputs[0].token_ids
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_streamed_text_never_shows_part_of_a_stop_string(smollm2_llm):
    engine = smollm2_llm.engine
    base = smollm2_llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    stop = base[8:12]
    assert len(stop) == 4 and stop in base
    rid = engine.add_request("Count: 1, 2, 3,", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts.extend(o.outputs[0].text for o in engine.step() if o.request_id == rid)
    final = texts[-1]
    assert final == base[: base.index(stop)]
    assert all(final.startswith(t) for t in texts)  # every streamed state is a prefix of the final text


def test_a_final_only_request_is_returned_once_when_it_finishes(smollm2_llm):
    engine = smollm2_llm.engine
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    final_only = engine.add_request("The sky is", params, final_only=True)
    streamed = engine.add_request("The sky is", params)
    returned = {final_only: [], streamed: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            returned[out.request_id].append(out)
    assert [o.finished for o in returned[final_only]] == [True]
    assert [o.finished for o in returned[streamed]] == [False] * 4 + [True]
    assert returned[final_only][0].outputs[0].token_ids == returned[streamed][-1].outputs[0].token_ids
    assert len(returned[final_only][0].outputs[0].token_ids) == 5


def test_abort_returns_partial_output_and_frees_blocks(smollm2_llm):
    engine = smollm2_llm.engine
    # ignore_eos: a sample that happened to end within the 5 steps would not be aborted
    rid = engine.add_request("Write a long essay about rivers.", SamplingParams(max_tokens=200, n=2, ignore_eos=True))
    for _ in range(5):
        engine.step()
    out = engine.abort_request(rid)
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert all(0 < len(c.token_ids) < 200 for c in out.outputs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.abort_request(rid) is None  # unknown now: no error


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_other_attention_backends_give_the_same_greedy_tokens(smollm2_gguf, smollm2_llm, backend):
    from pinfer import LLM

    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = smollm2_llm.generate(prompts, params, use_tqdm=False)
    other = LLM(str(smollm2_gguf), dtype="float32", attention_backend=backend, block_size=8)
    outs = other.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
