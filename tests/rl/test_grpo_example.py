"""examples/grpo_arithmetic.py, tiny: the engine and the trainer agree before every update,
and update_weights() really hands the trained weights to the engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_arithmetic.py"


@pytest.fixture(scope="module")
def grpo():
    spec = importlib.util.spec_from_file_location("grpo_arithmetic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_reward_rules(grpo):
    bonus = grpo.FORMAT_BONUS
    assert grpo.reward(" 42", 42) == 1.0 + bonus
    assert grpo.reward(" 42.", 42) == 1.0 + bonus
    assert grpo.reward(" 42, because 40 + 2", 42) == 1.0
    assert grpo.reward(" 41", 42) == bonus  # a bare number, wrong
    assert grpo.reward(" 40 + 2 = 42", 42) == 0.0  # the first integer counts
    assert grpo.reward(" forty-two", 42) == 0.0


def test_pack_equals_one_forward_per_sequence(grpo, hf_smollm2):
    prompts = [[1, 9690, 198, 4093, 28], [1, 9690, 198]]
    completions = [[[253, 17, 30], [2033]], [[11, 12, 13, 14], [99, 98]]]
    with torch.no_grad():
        packed = grpo.completion_logprobs(hf_smollm2, list(zip(prompts, completions)))
        single = [grpo.completion_logprobs(hf_smollm2, [(p, [c])])[0] for p, cs in zip(prompts, completions)
                  for c in cs]
    assert [len(x) for x in packed] == [3, 1, 4, 2]
    assert max((a - b).abs().max().item() for a, b in zip(packed, single)) < 1e-4


def teacher_forced(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_tiny_grpo_run_keeps_engine_and_trainer_in_sync(grpo, smollm2_hf_dir, hf_smollm2, tmp_path):
    argv = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-tokens", "12",
            "--lr", "1e-5", "--hf-dir", str(smollm2_hf_dir), "--json-out", str(tmp_path / "log.json"), "--quiet"]
    result = grpo.main(argv)
    logs, engine, policy, tokenizer = result.logs, result.engine, result.policy, result.tokenizer

    assert len(logs) == 2 and (tmp_path / "log.json").is_file()
    for i, log in enumerate(logs):
        print(f"step {i}: max |ratio - 1| {log.ratio_dev_max:.2e}, reward {log.mean_reward:.3f}, "
              f"update_weights {log.update_seconds:.3f} s")
        assert log.ratio_dev_max < 1e-3  # measured before that step's update
        assert log.weight_version == i + 1  # one update per step
        assert 0.0 <= log.mean_reward <= 1.0 + grpo.FORMAT_BONUS
    assert engine.weight_version == 2

    # The engine now computes the updated trainer's logprobs (a plain forward, no packing)...
    prompt = grpo.prompt_ids(tokenizer, grpo.Problem("What is 7 + 5? Answer with just the number.", "7 + 5 =", 12))
    completion = tokenizer.encode(" 12, since seven plus five is twelve.", add_special_tokens=False)
    engine_lp = engine.score([prompt], [completion])[0]
    trainer_lp = teacher_forced(policy, prompt, completion)
    moved = (trainer_lp - teacher_forced(hf_smollm2, prompt, completion)).abs().max().item()
    diff = (engine_lp - trainer_lp).abs().max().item()
    print(f"after training: max |engine - trainer| = {diff:.2e}; the trainer moved by {moved:.2e} from the start")
    assert diff < 1e-4
    # ...and that is not because nothing changed: the same check against the initial weights fails.
    assert moved > 1e-3
