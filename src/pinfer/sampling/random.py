"""Counter-based random numbers for sampling.

A draw is a pure function of (seed, step, token id): there is no generator
state, so a request's tokens do not depend on which other requests share its
batch, on its row, on the batch size, or on whether the sampler drew noise for
the whole vocabulary or only for a few candidate tokens. This gives per-request
reproducible seeds, and is what a deterministic RL rollout relies on.

Construction, on 32-bit words:
  key(seed, step) = absorb the four 32-bit halves of step and seed, one
                    `lowbias32` round each, into one 32-bit key per row
  bits(key, tok)  = lowbias32(key ^ lowbias32(tok ^ GOLDEN)), without the
                    final xorshift (see below)
  uniform         = (2 * m + 1) * 2**-24 with m the 23 high bits of `bits`:
                    every value is exact in float32 and lies in
                    [2**-24, 1 - 2**-24], so never 0 and never 1.

`lowbias32` is Chris Wellons' two-multiply integer mixer (hash-prospector),
a bijection on 32 bits with very low avalanche bias. Its last step,
x ^= x >> 16, only folds the high half into the low half; the per-token
numbers skip it and take the high bits, where the last multiply has already
mixed every input bit: a quarter less work on the [B, V] grid.

The [B, V] part is computed on int32 tensors holding the 32-bit pattern (int64
costs three times as much on CPU). Two details make this exact:
  * right shifts of int32 are arithmetic, so each `x >> s` is masked to the
    low 32 - s bits, which makes it the logical shift the hash needs;
  * multiplication wraps modulo 2**32 (two's complement), as it does in
    PyTorch's CPU and CUDA kernels; tests/sampling/test_sampler.py checks the
    results bit for bit against a pure-Python reference, so a platform that
    did otherwise would fail loudly rather than sample badly.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _int32(value: int) -> int:
    """The signed int32 with the same 32-bit pattern as `value`."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


_C1 = _int32(0x7FEB352D)
_C2 = _int32(0x846CA68B)
_GOLDEN = _int32(0x9E3779B9)
# Distinct constants absorbed with each input word, so zero words do not hit
# lowbias32's fixed point at 0 and the order of the words matters.
_SALTS = tuple(_int32(s) for s in (0x68E31DA4, 0xB5297A4D, 0x1B56C4E9, 0x2F3C6A75))


def lowbias32(x: torch.Tensor, finish: bool = True) -> torch.Tensor:
    """Mix 32-bit words held in an int32 tensor, in place; returns x.
    finish=False skips the final xorshift (for callers using the high bits only)."""
    assert x.dtype == torch.int32
    tmp = torch.empty_like(x)
    for shift, multiplier in ((16, _C1), (15, _C2), (16, None)):
        if multiplier is None and not finish:
            break
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (32 - shift)) - 1  # arithmetic -> logical shift
        x ^= tmp
        if multiplier is not None:
            x *= multiplier  # wraps modulo 2**32
    return x


def _words(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of int64 values, as int32 bit patterns."""
    values = values.to(torch.int64)
    low = ((values & _MASK32) ^ 0x80000000) - 0x80000000  # sign-extend: exact in int32
    high = values >> 32  # arithmetic shift keeps it in int32 range
    return low.to(torch.int32), high.to(torch.int32)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from int64 seeds and steps (any values): [B] int32."""
    step_low, step_high = _words(steps)
    seed_low, seed_high = _words(seeds)
    key = torch.zeros_like(step_low)
    for word, salt in zip((step_low, step_high, seed_low, seed_high), _SALTS):
        key ^= word
        key ^= salt
        lowbias32(key)
    return key


def random_bits(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor | int) -> torch.Tensor:
    """Random bits for every (row, token), as an int32 bit pattern: [B, N]. Use the high ones.

    token_ids: [B, N] token ids per row, or an int V meaning ids 0..V-1 for every row.
    """
    key = row_keys(seeds, steps)
    if isinstance(token_ids, int):
        tokens = torch.arange(token_ids, dtype=torch.int32, device=key.device).unsqueeze(0)
    else:
        tokens = token_ids.to(torch.int32)
    token_hash = lowbias32(tokens ^ _GOLDEN)
    return lowbias32(key.unsqueeze(1) ^ token_hash, finish=False)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor | int) -> torch.Tensor:
    """Uniform float32 in the open interval (0, 1) for every (row, token): [B, N]."""
    bits = random_bits(seeds, steps, token_ids)
    # The 23 high bits as the mantissa of a float f in [1, 2), in place; then
    # f - (1 - 2**-24) == (2m + 1) * 2**-24 is representable, so exact.
    bits >>= 9
    bits &= 0x7FFFFF
    bits |= 0x3F800000
    return bits.view(torch.float32).sub_(1.0 - 2.0**-24)


def gumbel(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor | int) -> torch.Tensor:
    """Standard Gumbel float32, -log(-log u), for every (row, token): [B, N], all finite."""
    return uniform(seeds, steps, token_ids).log_().neg_().log_().neg_()


def add_gumbel(
    values: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor | int
) -> torch.Tensor:
    """values + gumbel(seeds, steps, token_ids), as a new tensor, one pass fewer."""
    log_e = uniform(seeds, steps, token_ids).log_().neg_().log_()
    return torch.sub(values, log_e, out=log_e)
