"""Plain PyTorch references of the fused kernels: decode the packed cache, then fp32 math.

Any device. Token order is the packed order of the cache (see docs/format.md); query head
``h`` reads KV head ``h // group`` (transformers' ``repeat_kv``).
"""

from __future__ import annotations

import math

import torch

from ..codec import PackedKV, PackedTensor, decode_tensor


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[batch, kv_heads, ...]`` to ``[batch, kv_heads * group, ...]``, each KV head repeated."""
    return x.repeat_interleave(group, dim=1)


def qk_reference(q: torch.Tensor, k: PackedTensor) -> torch.Tensor:
    """Unscaled scores of one query token against the packed K.

    Args:
        q: ``[batch, q_heads, head_dim]`` fp16/bf16, q_heads a multiple of K's heads.
        k: packed K, ``n_tokens`` packed tokens.

    Returns:
        fp32 ``[batch, q_heads, n_tokens]``: ``q . K^T`` in packed token order.
    """
    keys = _expand_heads(decode_tensor(k), q.shape[1] // k.heads)
    return torch.einsum("bhd,bhtd->bht", q.float(), keys)


def pv_reference(p: torch.Tensor, v: PackedTensor) -> torch.Tensor:
    """Weighted sum of the packed V rows.

    Args:
        p: ``[batch, q_heads, n_tokens]`` float weights in packed token order.
        v: packed V.

    Returns:
        fp32 ``[batch, q_heads, head_dim]``: ``p . V``.
    """
    values = _expand_heads(decode_tensor(v), p.shape[1] // v.heads)
    return torch.einsum("bht,bhtd->bhd", p.float(), values)


def decode_attention_reference(
    q: torch.Tensor, kv: PackedKV, sm_scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one query token over a packed cache and its fp16 tail.

    Args:
        q: ``[batch, q_heads, head_dim]`` fp16/bf16.
        kv: the packed layer (blocks in packed order, then the tail).
        sm_scale: score multiplier, ``1 / sqrt(head_dim)`` when None.
        mask: optional bool ``[batch, 1 or kv_heads, n_tokens]``, True where a token is
            attended, in packed order (the tail in its own order after the blocks).

    Returns:
        ``[batch, q_heads, head_dim]`` in q's dtype; zeros for a row that attends nothing.
    """
    group = q.shape[1] // kv.k.heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    keys = torch.cat([decode_tensor(kv.k), kv.k_tail.float()], dim=2)
    values = torch.cat([decode_tensor(kv.v), kv.v_tail.float()], dim=2)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), _expand_heads(keys, group)) * scale
    if mask is not None:
        scores = scores.masked_fill(~_expand_heads(mask.expand(-1, kv.k.heads, -1), group), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bht,bhtd->bhd", probs, _expand_heads(values, group))
    return out.to(q.dtype)
