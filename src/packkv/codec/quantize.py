"""Error-bounded quantization of K or V blocks to small non-negative integers.

For every group (one token of one head, or one channel of one head over a block),
step = rel x (max - min) rounded up to fp16, zero = min, and
q = round((x - zero) / step). Dequantizing gives zero + q x step, within step / 2 of x
(plus fp32 rounding). q never exceeds 1/rel + 1/2 <= 10000, so it fits in 15 bits.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= ``x`` (fp32 input), capped at the fp16 maximum."""
    y = x.to(torch.float16)
    below = y.float() < x
    y = torch.where(below, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y.clamp(max=FP16_MAX)


def quantize_blocks(
    x: torch.Tensor, rel: float, grouping: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize blocks of K or V rows.

    Args:
        x: ``[batch, heads, n_blocks, block_size, head_dim]``, values representable in fp16.
        rel: step as a fraction of each group's range.
        grouping: ``"token"`` (a range per token) or ``"channel"`` (a range per channel
            over the block's tokens).

    Returns:
        ``q`` int32 of x's shape, and ``scale`` (the step) and ``zero`` (the minimum),
        fp16 of shape ``[batch, heads, n_blocks, block_size]`` for token grouping or
        ``[batch, heads, n_blocks, head_dim]`` for channel grouping.
    """
    xf = x.to(torch.float16).float()
    dim = -1 if grouping == "token" else -2
    lo = xf.amin(dim=dim)
    hi = xf.amax(dim=dim)
    zero = lo.to(torch.float16)  # exact: lo is an fp16 value
    step = round_up_fp16(rel * (hi - lo))
    # A constant group has range 0: any positive step gives q = 0 and an exact result.
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((xf - zero.float().unsqueeze(dim)) / step.float().unsqueeze(dim))
    return q.to(torch.int32), step, zero


def level_bits(rel: float) -> int:
    """Bits of the largest integer :func:`quantize_blocks` can produce at ``rel``.

    ``q <= round((max - min) / step)`` with ``step >= rel * (max - min)``, so ``q <= round(1 / rel)``
    (the small margin absorbs fp32 rounding of the division); a step clamped at the fp16
    maximum (ranges beyond 65504 / rel, at most 131008) gives at most 2.
    """
    return max(int(1.0 / rel + 0.5 + 1e-3), 2).bit_length()


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grouping: str
) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks`: fp32 ``zero + q x scale`` of q's shape."""
    dim = -1 if grouping == "token" else -2
    return zero.float().unsqueeze(dim) + q.float() * scale.float().unsqueeze(dim)
