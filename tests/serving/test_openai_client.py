"""The official `openai` client talks to `pinfer serve` unchanged: completions and
chat, streaming, n, logprobs, echo, stop, seeds, penalties, vLLM extensions;
greedy output over HTTP equals LLM.generate / LLM.chat in-process."""

from __future__ import annotations

import math

import pytest

from pinfer import SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0)


def extra(obj, name):
    """A field the openai client does not know (vLLM extensions such as token_ids)."""
    return (obj.model_extra or {})[name]


def test_models_lists_the_served_name(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


@pytest.mark.parametrize("as_token_ids", [False, True], ids=["text", "token_ids"])
def test_greedy_completion_equals_llm_generate(client, smollm2_llm, as_token_ids, model_name):
    expected = smollm2_llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    prompt = expected.prompt_token_ids if as_token_ids else PROMPT
    response = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, **GREEDY,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert extra(choice, "token_ids") == expected.outputs[0].token_ids
    assert extra(choice, "prompt_token_ids") == expected.prompt_token_ids
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason == "length"
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == model_name
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24


def test_greedy_chat_equals_llm_chat(client, smollm2_llm, model_name):
    expected = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    response = client.chat.completions.create(model=model_name, messages=CHAT, max_completion_tokens=24,
                                              **GREEDY, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert extra(choice, "token_ids") == expected.outputs[0].token_ids
    assert extra(response, "prompt_token_ids") == expected.prompt_token_ids
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_completion_equals_non_streamed_and_reports_usage(client, model_name):
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=20, **GREEDY)
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=20, **GREEDY,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1  # it really streamed
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == full.usage.model_dump()


def test_streamed_chat_equals_non_streamed(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, **GREEDY,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_seeded_sampling_with_n2_is_reproducible(client, model_name):
    def sample(seed):
        response = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=8,
                                             temperature=1.0, n=2, seed=seed)
        assert [c.index for c in response.choices] == [0, 1]
        return [c.text for c in response.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1]  # the two samples draw different noise
    assert sample(99) != first


def test_completion_logprobs(client, smollm2_llm, model_name):
    k = 3
    expected = smollm2_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, logprobs=k),
                                    use_tqdm=False)[0].outputs[0]
    choice = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, logprobs=k,
                                       **GREEDY).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    assert lp.token_logprobs == pytest.approx(expected.token_logprobs, abs=1e-4)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert k <= len(top) <= k + 1  # the top k, plus the chosen token if it is not among them
        assert top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely


def test_echo_with_logprobs_includes_the_prompt(client, model_name):
    prompt = "Echo this prompt back, then go on:"
    response = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, logprobs=1,
                                         echo=True, **GREEDY, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    n_prompt = len(extra(choice, "prompt_token_ids"))
    assert choice.text.startswith(prompt)
    assert len(choice.logprobs.tokens) == n_prompt + 5 == response.usage.prompt_tokens + 5
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in choice.logprobs.token_logprobs[1:])
    plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, **GREEDY)
    assert choice.text == prompt + plain.choices[0].text


def test_chat_logprobs(client, model_name):
    response = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=8, logprobs=True,
                                              top_logprobs=3, **GREEDY)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    # every generated token has an entry, the end-of-sequence token included (its text is not in the content)
    assert "".join(c.token for c in content).startswith(choice.message.content)
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert all(math.isfinite(t.logprob) and t.logprob <= 0 for t in entry.top_logprobs)


def test_stop_string_ends_the_text_before_it_streaming_or_not(client, model_name):
    base = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text
    middle = len(base) // 2
    stop = base[middle:middle + 3]
    expected = base[:base.find(stop)]
    choice = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, stop=[stop, "@@@@"],
                                       **GREEDY).choices[0]
    assert (choice.text, choice.finish_reason, extra(choice, "stop_reason")) == (expected, "stop", stop)
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, stop=stop,
                                            **GREEDY, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected  # no part of the stop string leaked
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_return_token_ids_in_streams(client, model_name):
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, **GREEDY,
                                     extra_body={"return_token_ids": True}).choices[0]
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, **GREEDY,
                                            stream=True, extra_body={"return_token_ids": True}))
    assert extra(chunks[0].choices[0], "prompt_token_ids") == extra(full, "prompt_token_ids")
    assert [t for c in chunks for t in extra(c.choices[0], "token_ids")] == extra(full, "token_ids")
    chat = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=10, **GREEDY,
                                          extra_body={"return_token_ids": True})
    chat_chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=10,
                                                      **GREEDY, stream=True, extra_body={"return_token_ids": True}))
    assert extra(chat_chunks[1].choices[0], "prompt_token_ids") == extra(chat, "prompt_token_ids")
    assert [t for c in chat_chunks[1:] for t in extra(c.choices[0], "token_ids")] == \
        extra(chat.choices[0], "token_ids")


def test_penalties_are_accepted_and_change_the_output(client, model_name):
    prompt = "List of fruits: apple, banana,"  # greedy repeats " pear," over and over

    def complete(**penalties):
        return extra(client.completions.create(model=model_name, prompt=prompt, max_tokens=10, **GREEDY,
                                               extra_body={"return_token_ids": True, **penalties}).choices[0],
                     "token_ids")

    plain = complete()
    for penalties in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}):
        penalized = complete(**penalties)
        assert penalized != plain, penalties
        # a repeated token is what the penalties push down
        assert max(penalized.count(t) for t in set(penalized)) <= max(plain.count(t) for t in set(plain))


def test_several_prompts_with_n_number_choices_per_prompt(client, model_name):
    prompts = [PROMPT, "Water boils at"]
    response = client.completions.create(model=model_name, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, **GREEDY)
        assert [c.text for c in response.choices[2 * p:2 * p + 2]] == [alone.choices[0].text] * 2
        assert response.usage.prompt_tokens >= alone.usage.prompt_tokens


def test_vllm_extensions_stop_token_ids_min_tokens_ignore_eos(client, model_name):
    base = extra(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, **GREEDY,
                                           extra_body={"return_token_ids": True}).choices[0], "token_ids")
    stop_id = base[3]
    choice = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, **GREEDY,
                                       extra_body={"stop_token_ids": [stop_id], "return_token_ids": True}).choices[0]
    assert extra(choice, "token_ids") == base[:base.index(stop_id) + 1]
    assert (choice.finish_reason, extra(choice, "stop_reason")) == ("stop", stop_id)
    # a chat reply that ends early runs to max_tokens with ignore_eos, and not before min_tokens
    short = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=32, **GREEDY)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    forced = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=n + 4, **GREEDY,
                                            extra_body={"min_tokens": n + 2})
    assert forced.usage.completion_tokens >= n + 2
    ignored = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=n + 4, **GREEDY,
                                             extra_body={"ignore_eos": True})
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", n + 4)
