"""fp8 e4m3 KV cache with one scale per stored tensor, as vLLM's fp8 cache.

vLLM keeps one static scale per layer for K and one for V; here each span handed to the
method (one layer's K or V block) gets its own scale amax / 448, stored as fp32, which is
at least as accurate and costs 4 bytes a span.
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods import Roundtrip

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4


def fp8_roundtrip(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` through e4m3 with a per-tensor scale: (decoded, bytes stored = numel + 4)."""
    amax = x.float().abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x.float() / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype), x.numel() + SCALE_BYTES


class Fp8PerTensor:
    """fp8 e4m3 for K and V, one fp32 scale per stored block of one layer."""

    family = "fp8"
    label = "fp8-e4m3"
    block_size = 64

    def settings(self) -> dict[str, Any]:
        return {"format": "e4m3", "scale": "per tensor (fp32)"}

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> Roundtrip:
        k_hat, k_bytes = fp8_roundtrip(k)
        v_hat, v_bytes = fp8_roundtrip(v)
        return Roundtrip(k_hat, v_hat, k_bytes, v_bytes)
