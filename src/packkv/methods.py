"""The interface every KV compression method of the study implements, and PackKV's adapter.

A method maps a span of full blocks of K and V to what attention would read back
(compressed then decompressed) and reports the bytes it stores for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .codec import compress_kv, decompress_kv
from .config import PackKVConfig


@dataclass(frozen=True)
class Roundtrip:
    """What a method returns for a span of blocks.

    Attributes:
        k, v: decompressed K and V, the input's shape ``[batch, heads, tokens, head_dim]``,
            dtype and token order.
        k_nbytes, v_nbytes: bytes stored for K and for V (payload and every scale, zero
            point, width or offset it needs to decode).
    """

    k: torch.Tensor
    v: torch.Tensor
    k_nbytes: int
    v_nbytes: int


class KVMethod(Protocol):
    """A KV compression method: ``family`` ("kivi"), ``label`` ("kivi-2"), its ``settings``
    (JSON-able) and the ``block_size`` it compresses at a time."""

    family: str
    label: str
    block_size: int

    def settings(self) -> dict[str, Any]: ...

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> Roundtrip:
        """Compress and decompress ``k, v: [batch, heads, tokens, head_dim]``, tokens a multiple of ``block_size``."""
        ...


def fp16_nbytes(x: torch.Tensor) -> int:
    """Bytes ``x`` takes in fp16."""
    return x.numel() * 2


class PackKVMethod:
    """PackKV through the reference codec (``compress_kv`` / ``decompress_kv``).

    The codec returns blocks in packed (repacked) token order; the permutation is undone
    here so that the result drops into a cache whose masks depend on token position (as
    sliding-window layers do). Full attention gives the same result either way.
    """

    family = "packkv"

    def __init__(self, config: PackKVConfig, label: str | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.label = label or (
            f"packkv k{config.k_grouping[0]}{config.k_rel:g} v{config.v_grouping[0]}{config.v_rel:g} "
            f"p{config.pack_size} b{config.block_size} m{config.min_bits} {config.repack}"
        )

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> Roundtrip:
        packed, perm = compress_kv(k, v, self.config, return_permutation=True)
        k_hat, v_hat = decompress_kv(packed)
        full = perm.shape[-1]
        index = perm.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        k_out, v_out = k_hat.clone(), v_hat.clone()
        k_out[:, :, :full] = torch.empty_like(k_hat[:, :, :full]).scatter_(2, index, k_hat[:, :, :full])
        v_out[:, :, :full] = torch.empty_like(v_hat[:, :, :full]).scatter_(2, index, v_hat[:, :, :full])
        return Roundtrip(k_out, v_out, packed.k_nbytes, packed.v_nbytes)
