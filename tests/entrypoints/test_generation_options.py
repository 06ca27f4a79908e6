"""Sampling options through the whole engine on the real model: seeds, n samples,
stop strings across token boundaries, stop tokens, min_tokens, ignore_eos,
logprob modes, prefix sharing, chat."""

from __future__ import annotations

import math


from pinfer import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"


def generate_one(llm, prompt=PROMPT, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_fixed_seed_gives_the_same_completion_twice(smollm2_llm):
    a = generate_one(smollm2_llm, max_tokens=24, temperature=1.0, seed=1234)
    b = generate_one(smollm2_llm, max_tokens=24, temperature=1.0, seed=1234)
    c = generate_one(smollm2_llm, max_tokens=24, temperature=1.0, seed=4321)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids


def test_seeded_request_does_not_depend_on_its_batch(smollm2_llm):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    alone = smollm2_llm.generate([PROMPT], params, use_tqdm=False)[0]
    others = SamplingParams(max_tokens=20, temperature=1.0)
    batch = smollm2_llm.generate(["Hello there", PROMPT, "1, 2, 3,"], [others, params, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_n_samples_differ_and_share_the_prompt_blocks(smollm2_llm):
    long_prompt = PROMPT * 6  # several full blocks
    out = generate_one(smollm2_llm, long_prompt, n=4, max_tokens=12, temperature=1.0, seed=3)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert out.metrics.num_cached_tokens >= 16  # later samples reused the first one's full prompt blocks
    bm = smollm2_llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_top_k_1_is_greedy(smollm2_llm):
    greedy = generate_one(smollm2_llm, max_tokens=16, temperature=0)
    top1 = generate_one(smollm2_llm, max_tokens=16, temperature=1.3, top_k=1, seed=5)
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_string_spanning_tokens_is_cut_from_the_text(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    base = generate_one(smollm2_llm, max_tokens=32, temperature=0, ignore_eos=True).outputs[0]
    pieces = [tokenizer.decode([t]) for t in base.token_ids]
    # a stop string made of the end of token 5 and the start of token 6
    i = next(i for i in range(5, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 1)
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    prefix = "".join(pieces[:i]) + pieces[i][:-2]
    assert stop not in prefix and prefix + stop in base.text
    out = generate_one(smollm2_llm, max_tokens=32, temperature=0, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.text == prefix and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[: i + 2]
    kept = generate_one(smollm2_llm, max_tokens=32, temperature=0, ignore_eos=True, stop=[stop],
                        include_stop_str_in_output=True).outputs[0]
    assert kept.text == prefix + stop


def test_stop_token_ids_and_lengths(smollm2_llm):
    base = generate_one(smollm2_llm, max_tokens=10, temperature=0, ignore_eos=True).outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    stop_token = base.token_ids[3]
    out = generate_one(smollm2_llm, max_tokens=10, temperature=0, stop_token_ids=[stop_token]).outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_token) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_min_tokens_forbids_eos_and_ignore_eos_runs_past_it(smollm2_llm):
    chat = smollm2_llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    short = smollm2_llm.generate([chat], SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == 2
    at_least = len(short.token_ids) + 5
    longer = smollm2_llm.generate([chat], SamplingParams(max_tokens=64, temperature=0, min_tokens=at_least),
                                  use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= at_least and 2 not in longer.token_ids[:at_least]
    ignored = smollm2_llm.generate([chat], SamplingParams(max_tokens=at_least, temperature=0, ignore_eos=True),
                                   use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == at_least and ignored.finish_reason == "length"
    assert ignored.token_ids[: len(short.token_ids)] == short.token_ids  # it did generate EOS, and went on


def test_logprobs_raw_and_processed(smollm2_llm):
    raw = generate_one(smollm2_llm, max_tokens=12, temperature=0.7, top_k=20, seed=11, logprobs=3).outputs[0]
    processed = generate_one(smollm2_llm, max_tokens=12, temperature=0.7, top_k=20, seed=11, logprobs=3,
                             logprobs_mode="processed").outputs[0]
    assert raw.token_ids == processed.token_ids  # the mode changes what is reported, not what is sampled
    for entry_raw, entry_proc, token, lp_raw in zip(raw.logprobs, processed.logprobs, raw.token_ids,
                                                    raw.token_logprobs):
        assert entry_raw[token].logprob == lp_raw
        # sharpened (T < 1) and truncated to 20 tokens: the sampled distribution puts more mass on the top token
        top_raw = min(entry_raw.values(), key=lambda lp: lp.rank)
        top_proc = min(entry_proc.values(), key=lambda lp: lp.rank)
        assert top_proc.logprob >= top_raw.logprob
        assert all(lp.logprob <= 0 for lp in entry_proc.values())
        assert len([lp for lp in entry_raw.values() if lp.rank <= 3]) >= 3
    assert math.isclose(raw.cumulative_logprob, sum(raw.token_logprobs), rel_tol=1e-6)


def test_chat_applies_the_template_and_answers(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
                           SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    assert "4" in out.outputs[0].text
    assert out.prompt_token_ids[:1] == [1]  # <|im_start|>


def test_text_equals_decoding_the_tokens(smollm2_llm):
    out = generate_one(smollm2_llm, "Unicode: café, naïve, 東京, emoji 🎉. Continue:", max_tokens=40,
                       temperature=1.0, seed=2).outputs[0]
    tokenizer = smollm2_llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_top_k_5_on_the_model_only_ever_samples_its_5_most_likely_tokens(smollm2_llm):
    out = generate_one(smollm2_llm, n=64, max_tokens=1, temperature=1.5, top_k=5, seed=0, logprobs=5)
    top5 = {t for t, lp in out.outputs[0].logprobs[0].items() if lp.rank <= 5}  # raw ranks of the model
    sampled = {c.token_ids[0] for c in out.outputs}
    assert len(top5) == 5 and sampled <= top5 and len(sampled) > 1


def test_top_p_on_the_model_samples_only_inside_the_nucleus(smollm2_llm):
    out = generate_one(smollm2_llm, n=64, max_tokens=1, temperature=1.0, top_p=0.5, seed=0, logprobs=20)
    ranked = sorted(out.outputs[0].logprobs[0].items(), key=lambda kv: kv[1].rank)
    nucleus, mass = set(), 0.0
    for token, lp in ranked:  # smallest set of most likely tokens whose probability reaches top_p
        nucleus.add(token)
        mass += math.exp(lp.logprob)
        if mass >= 0.5:
            break
    assert mass >= 0.5 and {c.token_ids[0] for c in out.outputs} <= nucleus
