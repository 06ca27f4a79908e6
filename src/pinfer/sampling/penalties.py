"""Presence, frequency and repetition penalties as an additive logit bias.

OpenAI semantics for presence/frequency (on generated tokens only):
    logit -= frequency_penalty * count(token in output) + presence_penalty * (count > 0)
HF/vLLM semantics for repetition (on prompt and generated tokens):
    logit = logit / r if logit > 0 else logit * r
Expressed as a bias on the raw logits, so raw logprobs stay untouched and the
sampler applies it to the distribution it samples from ("processed").
"""

from __future__ import annotations

import torch


def _token_mask_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 count of each token id in each row's list."""
    rows = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    # pad with an extra column (vocab_size) that is dropped afterwards
    padded = torch.full((rows, width), vocab_size, dtype=torch.long, device=device)
    for row, tokens in enumerate(token_lists):
        if tokens:
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def penalty_bias(
    logits: torch.Tensor,  # [B, V] float32 raw logits
    output_tokens: list[list[int]],
    prompt_tokens: list[list[int]],
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:  # [B, V] float32, to add to the logits
    batch, vocab = logits.shape
    device = logits.device
    counts = _token_mask_counts(output_tokens, vocab, device)
    as_column = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)[:, None]  # noqa: E731
    bias = -as_column(frequency) * counts - as_column(presence) * (counts > 0)
    if any(r != 1.0 for r in repetition):
        seen = (counts > 0) | (_token_mask_counts(prompt_tokens, vocab, device) > 0)
        r = as_column(repetition)
        penalized = torch.where(logits > 0, logits / r, logits * r)
        bias = bias + torch.where(seen, penalized - logits, torch.zeros_like(logits))
    return bias
