"""Encode-aware repacking: one token permutation per block, shared by K and V.

Attention sums over tokens, so reordering the K and V rows of a block alike changes no
score or output; packs of similar tokens get narrower per-channel widths.
"""

from __future__ import annotations

import torch

from .bitpack import PACK_ALIGN_WORDS, WORD_BITS, bit_length


def pack_cost(q: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Summed per-channel bit widths of packs ``q: [..., pack_size, channels]``: ``[...]``."""
    cap = (1 << min_bits) - 1
    mins = q.amin(dim=-2).clamp(max=cap)
    return bit_length(q.amax(dim=-2) - mins).long().sum(-1)


def _greedy(q: torch.Tensor, pack_size: int, min_bits: int) -> torch.Tensor:
    """Grow each pack by the token that least increases its summed widths.

    Each pack is seeded with the remaining token nearest (L1) to the remaining tokens'
    mean. Vectorized over groups; ``q: [groups, block, channels]``; returns ``[groups, block]``.
    """
    groups, block, _ = q.shape
    cap = (1 << min_bits) - 1
    big = torch.iinfo(torch.int64).max
    free = torch.ones(groups, block, dtype=torch.bool, device=q.device)
    rows = torch.arange(groups, device=q.device)
    order = []
    for _ in range(block // pack_size):
        mean = (q * free.unsqueeze(-1)).sum(1, keepdim=True) / free.sum(1).view(-1, 1, 1)
        dist = (q - mean).abs().sum(-1)
        seed = torch.where(free, dist, torch.inf).argmin(1)
        free[rows, seed] = False
        order.append(seed)
        hi = q[rows, seed]
        lo = hi.clone()
        for _ in range(pack_size - 1):
            cand_hi = torch.maximum(hi.unsqueeze(1), q)
            cand_lo = torch.minimum(lo.unsqueeze(1), q).clamp(max=cap)
            cost = bit_length(cand_hi - cand_lo).long().sum(-1)
            pick = torch.where(free, cost, big).argmin(1)
            free[rows, pick] = False
            order.append(pick)
            hi = torch.maximum(hi, q[rows, pick])
            lo = torch.minimum(lo, q[rows, pick])
    return torch.stack(order, 1)


def _median(q_v: torch.Tensor) -> torch.Tensor:
    """Sort tokens by the median of their V integers (PackKV's cheap key)."""
    return torch.argsort(q_v.median(dim=-1).values, dim=-1, stable=True)


def repack_permutation(
    q_k: torch.Tensor, q_v: torch.Tensor, pack_size: int, method: str, min_bits: int
) -> torch.Tensor:
    """The token order of every block.

    Args:
        q_k, q_v: ``[..., block_size, head_dim]`` quantized K and V of the same blocks.
        pack_size: tokens a pack.
        method: ``"greedy"``, ``"median"`` or ``"none"``.
        min_bits: as in :class:`PackKVConfig`; the cost counts the widths actually stored.

    Returns:
        int64 ``[..., block_size]``: position j of a block holds original token perm[j].
        A block keeps its original order where the method's order would pack wider, so
        repacking never makes the packed data larger than ``"none"``.
    """
    lead = q_k.shape[:-2]
    block = q_k.shape[-2]
    identity = torch.arange(block, device=q_k.device).expand(*lead, block)
    if method == "none" or q_k.numel() == 0:
        return identity.clone()
    q = torch.cat([q_k, q_v], dim=-1).reshape(-1, block, q_k.shape[-1] + q_v.shape[-1])
    if method == "greedy":
        perm = _greedy(q, pack_size, min_bits).view(*lead, block)
    else:
        perm = _median(q_v)

    def cost(order: torch.Tensor) -> torch.Tensor:
        # Words actually stored, each pack padded as bitpack pads it, K and V apart.
        total = 0
        for side in (q_k, q_v):
            idx = order.unsqueeze(-1).expand(*order.shape, side.shape[-1])
            packs = torch.gather(side, -2, idx).view(*lead, block // pack_size, pack_size, side.shape[-1])
            words = pack_cost(packs, min_bits) * (pack_size // WORD_BITS)
            total = total + (-(-words // PACK_ALIGN_WORDS) * PACK_ALIGN_WORDS).sum(-1)
        return total

    worse = cost(perm) > cost(identity)
    return torch.where(worse.unsqueeze(-1), identity, perm)
