"""Presence/frequency/repetition penalties against their definitions, and through the engine."""

import torch

from pinfer import SamplingParams
from pinfer.sampling.penalties import penalty_bias


def test_penalty_bias_matches_the_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    outputs = [[1, 1, 5], [], [7]]
    prompts = [[2, 3], [4], []]
    presence, frequency, repetition = [0.5, 1.0, 0.0], [0.25, 0.0, -1.0], [1.3, 2.0, 1.0]
    got = logits + penalty_bias(logits, outputs, prompts, presence, frequency, repetition)
    want = logits.clone()
    for row in range(3):
        for token in set(outputs[row]) | set(prompts[row]):  # repetition: prompt and output
            r = repetition[row]
            want[row, token] = want[row, token] / r if want[row, token] > 0 else want[row, token] * r
        for token in set(outputs[row]):  # OpenAI: output tokens only
            want[row, token] -= frequency[row] * outputs[row].count(token) + presence[row]
    assert torch.allclose(got, want, atol=1e-6)


def test_frequency_penalty_reduces_repetition_and_leaves_raw_logprobs_alone(smollm2_llm):
    prompt = "List the word 'apple' many times: apple apple apple"
    base = smollm2_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, logprobs=0), use_tqdm=False)
    penalized = smollm2_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, logprobs=0,
                                                              frequency_penalty=2.0, presence_penalty=1.0),
                                     use_tqdm=False)
    a, b = base[0].outputs[0].token_ids, penalized[0].outputs[0].token_ids
    assert len(set(b)) > len(set(a))  # more distinct tokens once repeats cost
    # raw logprobs are the model's, before penalties: the first token is chosen from the same logits
    if a[0] == b[0]:
        assert abs(base[0].outputs[0].token_logprobs[0] - penalized[0].outputs[0].token_logprobs[0]) < 1e-5
