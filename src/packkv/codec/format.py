"""The packed data: dataclasses of tensors and their exact byte accounting.

See docs/format.md for the layout. Every tensor here is stored; ``nbytes`` adds up their
sizes, nothing is estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..config import PackKVConfig
from .bitpack import MAX_WIDTH


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class PackedTensor:
    """The compressed blocks of K or of V for ``[batch, heads, n_blocks * block_size, head_dim]``.

    Attributes:
        words: int32 ``[n_words]``, the bit planes of every pack (see bitpack.py).
        offsets: int32 ``[batch, heads, n_packs]``, first word of each pack in ``words``.
        widths: uint8 ``[batch, heads, n_packs, head_dim // 2]``, 4-bit width codes,
            channel 2i in the low nibble.
        mins: uint8 ``[batch, heads, n_packs, head_dim * min_bits // 8]``, pack minima
            (nibbles for min_bits 4, bytes for 8, empty for 0).
        scale, zero: fp16 ``[batch, heads, n_blocks, block_size]`` (token grouping, in
            packed token order) or ``[batch, heads, n_blocks, head_dim]`` (channel grouping).
        grouping, block_size, pack_size, min_bits: how it was encoded.
        width_bound: an upper bound on every width code, known when the data is encoded
            (the quantizer never exceeds ``round(1 / rel)``: :func:`codec.quantize.level_bits`);
            the decode kernels compile their path for values wider than 8 bits only when it
            is above 8. Validation checks the widths against it.
    """

    words: torch.Tensor
    offsets: torch.Tensor
    widths: torch.Tensor
    mins: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grouping: str
    block_size: int
    pack_size: int
    min_bits: int
    width_bound: int = MAX_WIDTH

    @property
    def batch(self) -> int:
        return self.offsets.shape[0]

    @property
    def heads(self) -> int:
        return self.offsets.shape[1]

    @property
    def n_packs(self) -> int:
        return self.offsets.shape[2]

    @property
    def head_dim(self) -> int:
        return self.widths.shape[-1] * 2

    @property
    def n_tokens(self) -> int:
        return self.n_packs * self.pack_size

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        """Bytes stored: payload words, offsets, widths, minima, scales and zero points."""
        return sum(_tensor_bytes(t) for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "PackedTensor":
        return replace(self, **{k: t.to(device) for k, t in self.tensors().items()})


@dataclass(frozen=True)
class PackedKV:
    """A compressed KV cache of one layer.

    Attributes:
        k, v: the packed full blocks of K and V (tokens permuted alike inside each block).
        k_tail, v_tail: fp16 ``[batch, heads, tail, head_dim]``, the last tokens that do
            not fill a block, kept exact.
        config: the settings it was compressed with.
        dtype: the dtype of the original K/V, restored by decompression.
    """

    k: PackedTensor
    v: PackedTensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    config: PackKVConfig
    dtype: torch.dtype

    @property
    def n_tokens(self) -> int:
        return self.k.n_tokens + self.k_tail.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, heads, tokens, head_dim)`` of the original K (and V)."""
        return (self.k.batch, self.k.heads, self.n_tokens, self.k.head_dim)

    @property
    def k_nbytes(self) -> int:
        return self.k.nbytes + _tensor_bytes(self.k_tail)

    @property
    def v_nbytes(self) -> int:
        return self.v.nbytes + _tensor_bytes(self.v_tail)

    @property
    def nbytes(self) -> int:
        """Bytes stored for K and V together."""
        return self.k_nbytes + self.v_nbytes

    @property
    def fp16_nbytes(self) -> int:
        """Bytes the same K and V take in fp16."""
        b, h, t, d = self.shape
        return 2 * 2 * b * h * t * d

    def to(self, device: torch.device | str) -> "PackedKV":
        return replace(
            self, k=self.k.to(device), v=self.v.to(device),
            k_tail=self.k_tail.to(device), v_tail=self.v_tail.to(device),
        )
