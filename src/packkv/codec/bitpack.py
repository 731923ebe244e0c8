"""Bit-packing of packs into 32-bit bit planes with per-channel widths.

A pack holds ``pack_size`` tokens of one head. For channel c it stores the pack
minimum m_c and width w_c = bit_length(max_t(q[t, c] - m_c)); the values u = q - m_c are
stored as w_c bit planes: plane b holds bit b of u for every token of the pack, token j
at bit (j mod 32) of word (j // 32). The planes of a pack are laid out channel after
channel, plane after plane, so channel c starts at word ``sum(w[:c]) * pack_size / 32``
of its pack: a kernel finds it with a prefix sum of the widths, not a search. Every pack
starts on a 16-byte boundary (its word count is padded to a multiple of 4).
"""

from __future__ import annotations

import torch

WORD_BITS = 32
PACK_ALIGN_WORDS = 4
MAX_WIDTH = 15  # widths are stored as 4-bit codes


def bit_length(u: torch.Tensor) -> torch.Tensor:
    """Bits needed for non-negative integers ``u`` (< 2**24): 0 for 0, 3 for 4..7."""
    return torch.frexp(u.float()).exponent.to(torch.uint8)


def pack_mins_widths(q: torch.Tensor, min_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pack, per-channel minimum and bit width.

    Args:
        q: ``[..., pack_size, head_dim]`` non-negative int32.
        min_bits: bits of a stored minimum; larger minima are clamped, which stays exact
            (u = q - m is then just wider).

    Returns:
        ``mins`` and ``widths``, uint8 ``[..., head_dim]``.
    """
    cap = (1 << min_bits) - 1
    mins = q.amin(dim=-2).clamp(max=cap)
    widths = bit_length((q - mins.unsqueeze(-2)).amax(dim=-2))
    return mins.to(torch.uint8), widths


def pack_planes(u: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-pack packs.

    Args:
        u: ``[n_packs, pack_size, head_dim]`` int32, ``0 <= u < 2**widths``.
        widths: ``[n_packs, head_dim]`` uint8, at most 15.

    Returns:
        ``words`` int32 ``[n_words]`` (all packs, each padded to a multiple of 4 words) and
        ``offsets`` int64 ``[n_packs]``, the first word of each pack.
    """
    n_packs, pack_size, head_dim = u.shape
    wpp = pack_size // WORD_BITS  # words a plane
    if n_packs == 0:
        return u.new_zeros(0), u.new_zeros(0, dtype=torch.int64)
    max_width = int(widths.max()) if widths.numel() else 0
    shifts = torch.arange(WORD_BITS, device=u.device, dtype=torch.int64)
    ut = u.transpose(1, 2).reshape(n_packs, head_dim, wpp, WORD_BITS).long()
    # Plane b: bit b of 32 tokens folded into one word; [n, D, planes, wpp].
    planes = [(((ut >> b) & 1) << shifts).sum(-1) for b in range(max_width)]
    words64 = torch.stack(planes, 2) if planes else ut.new_zeros(n_packs, head_dim, 0, wpp)
    # Two's complement: values >= 2**31 become the negative int32 with the same bits.
    words = torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)
    bits = torch.arange(max_width, device=u.device, dtype=torch.int32)
    keep = bits.view(1, 1, -1, 1) < widths.to(torch.int32).view(n_packs, head_dim, 1, 1)
    keep = keep.expand(-1, -1, -1, wpp).reshape(n_packs, -1)
    used = keep.sum(dim=1)
    pad = (-used) % PACK_ALIGN_WORDS
    pad_cols = torch.arange(PACK_ALIGN_WORDS - 1, device=u.device).view(1, -1) < pad.view(-1, 1)
    words = torch.cat([words.reshape(n_packs, -1), torch.zeros_like(pad_cols, dtype=torch.int32)], 1)
    flat = words[torch.cat([keep, pad_cols], dim=1)]
    sizes = used + pad
    offsets = torch.cumsum(sizes, 0) - sizes
    return flat, offsets


def unpack_planes(
    words: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor, pack_size: int
) -> torch.Tensor:
    """Inverse of :func:`pack_planes`.

    Args:
        words: int32 ``[n_words]``.
        offsets: ``[n_packs]`` first word of each pack.
        widths: uint8 ``[n_packs, head_dim]``.
        pack_size: tokens a pack.

    Returns:
        ``u`` int32 ``[n_packs, pack_size, head_dim]``.
    """
    n_packs, head_dim = widths.shape
    wpp = pack_size // WORD_BITS
    if n_packs == 0:
        return torch.zeros(0, pack_size, head_dim, dtype=torch.int32, device=words.device)
    w = widths.long()
    channel_start = torch.cumsum(w, dim=1) - w  # planes before channel c, [n, D]
    u = torch.zeros(n_packs, head_dim, wpp, WORD_BITS, dtype=torch.int32, device=words.device)
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    word_in_plane = torch.arange(wpp, device=words.device)
    max_width = int(w.max()) if w.numel() else 0
    for b in range(max_width):
        has = (b < w).unsqueeze(-1)  # [n, D, 1]
        idx = offsets.long().view(-1, 1, 1) + (channel_start + b).unsqueeze(-1) * wpp + word_in_plane
        plane = torch.where(has, words[torch.where(has, idx, 0)], 0)  # [n, D, wpp]
        u |= ((plane.unsqueeze(-1) >> shifts) & 1) << b
    return u.view(n_packs, head_dim, pack_size).transpose(1, 2).contiguous()


def pack_nibbles(x: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte: ``[..., 2n]`` uint8 (< 16) to ``[..., n]``, even index low."""
    x = x.to(torch.uint8)
    return x[..., 0::2] | (x[..., 1::2] << 4)


def unpack_nibbles(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., n]`` uint8 to ``[..., 2n]``."""
    return torch.stack([x & 15, x >> 4], dim=-1).flatten(-2)


def pack_mins(mins: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Stored form of per-channel minima: nothing, nibbles or bytes."""
    if min_bits == 0:
        return mins[..., :0]
    return pack_nibbles(mins) if min_bits == 4 else mins.to(torch.uint8)


def unpack_mins(stored: torch.Tensor, min_bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_mins`: uint8 ``[..., head_dim]``."""
    if min_bits == 0:
        return torch.zeros(*stored.shape[:-1], head_dim, dtype=torch.uint8, device=stored.device)
    return unpack_nibbles(stored) if min_bits == 4 else stored
