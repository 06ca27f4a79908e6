"""Helpers for the tiny random checkpoints the model tests build with transformers and
compare pinfer against."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_checkpoint(model, directory: Path, tokenizer_dir: Path) -> None:
    """A transformers model saved as a safetensors folder, with SmolLM2's tokenizer files."""
    model.save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 log_softmax of transformers' logits for one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def prompt_logprob_table(output) -> torch.Tensor:
    """[len-1] logprobs pinfer gave each prompt token after the first."""
    return torch.tensor([e[tok].logprob for e, tok in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])])


def decode_logprob_diff(model, prompt: list[int], completion) -> float:
    """Checks pinfer's greedy completion is transformers' argmax at every step, and returns
    the max abs difference of its raw logprobs from a forward pass over the whole sequence."""
    ref = hf_logprobs(model, prompt + completion.token_ids)[len(prompt) - 1 : -1]
    assert completion.token_ids == ref.argmax(-1).tolist()
    theirs = ref.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    return (torch.tensor(completion.token_logprobs) - theirs).abs().max().item()
