"""Asymmetric min-max integer quantization in groups: KIVI and per-token intN.

One quantizer with parameters. A group is ``group`` consecutive channels of one token
(``axis="token"``) or ``group`` consecutive tokens of one channel (``axis="channel"``).
Per group: zero = min (fp16, exact for fp16 input), scale = (max - min) / (2**bits - 1)
rounded up to fp16, q = round((x - zero) / scale) in [0, 2**bits - 1]; every value is then
within scale / 2 of its fp16 rounding. Stored: ``bits`` a value, bit-packed, plus an fp16
scale and an fp16 zero a group.

- KIVI (Liu et al. 2024): K per channel, V per token, group 32, a 128-token fp16 residual
  (the harness's buffer).
- transformers' quantized cache: K and V per token, group 64, residual 128.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..codec.quantize import round_up_fp16
from ..methods import Roundtrip

AXES = ("token", "channel")
META_BYTES = 4  # fp16 scale + fp16 zero a group


def _grouped(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """View ``[b, h, t, d]`` as ``[..., n_groups, group]`` (a copy for ``axis="channel"``)."""
    b, h, t, d = x.shape
    if axis == "token":
        return x.reshape(b, h, t, d // group, group)
    return x.transpose(2, 3).reshape(b, h, d, t // group, group)


def _ungrouped(g: torch.Tensor, shape: torch.Size, axis: str) -> torch.Tensor:
    b, h, t, d = shape
    if axis == "token":
        return g.reshape(b, h, t, d)
    return g.reshape(b, h, d, t).transpose(2, 3)


def check_groups(x: torch.Tensor, axis: str, group: int) -> None:
    """Raise ``ValueError`` unless ``x: [b, h, t, d]`` splits into groups along ``axis``."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if x.dim() != 4:
        raise ValueError(f"expected [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    size = x.shape[-1] if axis == "token" else x.shape[-2]
    if group < 1 or size % group:
        raise ValueError(f"group {group} does not divide the {'head_dim' if axis == 'token' else 'tokens'} {size}")


def quantize_groups(x: torch.Tensor, bits: int, axis: str, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x: [b, h, t, d]``.

    Returns:
        ``q`` int32 ``[..., n_groups, group]`` (see :func:`_grouped`), and ``scale`` and
        ``zero``, fp16 ``[..., n_groups]``.
    """
    check_groups(x, axis, group)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    g = _grouped(x.to(torch.float16).float(), axis, group)
    lo, hi = g.amin(-1), g.amax(-1)
    zero = lo.to(torch.float16)
    scale = round_up_fp16((hi - lo) / (2**bits - 1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0, exact
    q = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 2**bits - 1)
    return q.to(torch.int32), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size, axis: str) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: fp32 of ``shape``."""
    g = zero.float().unsqueeze(-1) + q.float() * scale.float().unsqueeze(-1)
    return _ungrouped(g, shape, axis)


def group_quant_nbytes(numel: int, bits: int, group: int) -> int:
    """Bytes stored for ``numel`` values: bit-packed payload plus fp16 scale and zero a group."""
    return math.ceil(numel * bits / 8) + numel // group * META_BYTES


class GroupQuant:
    """K and V each quantized by :func:`quantize_groups` with their own axis."""

    def __init__(self, family: str, bits: int, k_axis: str, v_axis: str, group: int, block_size: int = 64) -> None:
        self.family = family
        self.bits, self.k_axis, self.v_axis, self.group = bits, k_axis, v_axis, group
        self.block_size = block_size
        self.label = f"{family}-{bits}"

    def settings(self) -> dict[str, Any]:
        return {"bits": self.bits, "k_axis": self.k_axis, "v_axis": self.v_axis, "group": self.group}

    def _side(self, x: torch.Tensor, axis: str) -> tuple[torch.Tensor, int]:
        q, scale, zero = quantize_groups(x, self.bits, axis, self.group)
        x_hat = dequantize_groups(q, scale, zero, x.shape, axis).to(x.dtype)
        return x_hat, group_quant_nbytes(x.numel(), self.bits, self.group)

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> Roundtrip:
        k_hat, k_bytes = self._side(k, self.k_axis)
        v_hat, v_bytes = self._side(v, self.v_axis)
        return Roundtrip(k_hat, v_hat, k_bytes, v_bytes)


def kivi(bits: int) -> GroupQuant:
    """KIVI-``bits``: K per channel, V per token, groups of 32."""
    return GroupQuant("kivi", bits, "channel", "token", 32)


def per_token_int(bits: int) -> GroupQuant:
    """Per-token int``bits`` with groups of 64 channels for K and V (transformers' quantized cache)."""
    method = GroupQuant("int", bits, "token", "token", 64)
    method.label = f"int{bits}-g64"
    return method
