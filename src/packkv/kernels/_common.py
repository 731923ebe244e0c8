"""Checks at the kernels' public boundary, the CPU/GPU dispatch rule, and the split heuristic."""

from __future__ import annotations

import os

import torch

from ..codec.format import PackedKV, PackedTensor

KERNEL_HEAD_DIMS = (64, 128)
QUERY_DTYPES = (torch.float16, torch.bfloat16)
# A program handles the query heads of one KV head padded to a tile of this many rows
# (tl.dot needs at least 16), so a GQA group may hold up to 16 query heads.
GROUP_TILE = 16
# Warps a program of the decode kernels: None picks num_warps()'s measured defaults; an int
# (benchmarks, tuning) overrides them for all three. Read at each launch.
NUM_WARPS: int | None = None


def use_triton(device: torch.device) -> bool:
    """Triton on CUDA tensors; on the CPU only under the Triton interpreter (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def num_warps(kernel: str, head_dim: int) -> int:
    """Warps a program for ``kernel`` ("qk", "pv" or "attention") at ``head_dim``.

    Measured on an H100 (docs/notes/kernels.md, v4, T=32K): the K product is fastest at 2.
    At head_dim 128 the V product and fused attention take 4: at 2 their [16|32, 128] tiles
    spill registers (attention 1.8x slower at batch 8; V 1.24x slower at batch 8, 1.09x
    faster at batch 1). At head_dim 64 they take 2 (attention 1.8x slower at 4).
    """
    if NUM_WARPS is not None:
        return NUM_WARPS
    return 4 if kernel != "qk" and head_dim == 128 else 2


def check_packed(packed: PackedTensor, name: str) -> None:
    """Raise unless ``packed`` is a PackedTensor the kernels can read."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"{name} must be a PackedTensor, got {type(packed).__name__}")
    if packed.head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"{name}.head_dim must be one of {KERNEL_HEAD_DIMS} for the kernels, got {packed.head_dim}")
    if packed.pack_size not in (32, 64):
        raise ValueError(f"{name}.pack_size must be 32 or 64, got {packed.pack_size}")


def check_query(q: torch.Tensor, packed: PackedTensor) -> int:
    """Validate ``q: [batch, q_heads, head_dim]`` against ``packed``; return the GQA group size."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must have shape [batch, q_heads, head_dim], got {tuple(q.shape)}")
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    batch, q_heads, head_dim = q.shape
    if head_dim != packed.head_dim:
        raise ValueError(f"q head_dim {head_dim} differs from the cache's head_dim {packed.head_dim}")
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {KERNEL_HEAD_DIMS}, got {head_dim}")
    if batch != packed.batch:
        raise ValueError(f"q batch {batch} differs from the cache's batch {packed.batch}")
    if q_heads % packed.heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {packed.heads}")
    group = q_heads // packed.heads
    if group > GROUP_TILE:
        raise ValueError(f"GQA group {group} (q_heads {q_heads} / kv_heads {packed.heads}) exceeds {GROUP_TILE}")
    if q.device != packed.words.device:
        raise ValueError(f"q is on {q.device} but the cache is on {packed.words.device}")
    return group


def check_probs(p: torch.Tensor, packed: PackedTensor) -> int:
    """Validate ``p: [batch, q_heads, n_tokens]`` against ``packed``; return the GQA group size."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"p must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 3 or not p.is_floating_point():
        raise ValueError(f"p must be a float tensor [batch, q_heads, n_tokens], got {p.dtype} {tuple(p.shape)}")
    batch, q_heads, n_tokens = p.shape
    if batch != packed.batch or n_tokens != packed.n_tokens:
        raise ValueError(
            f"p shape {tuple(p.shape)} does not match the cache: batch {packed.batch}, n_tokens {packed.n_tokens}"
        )
    if q_heads % packed.heads or q_heads // packed.heads > GROUP_TILE:
        raise ValueError(f"q_heads {q_heads} must be a multiple of kv_heads {packed.heads}, at most {GROUP_TILE}x")
    if p.device != packed.words.device:
        raise ValueError(f"p is on {p.device} but the cache is on {packed.words.device}")
    return q_heads // packed.heads


def check_attention(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None) -> int:
    """Validate a decode-attention call; return the GQA group size."""
    if not isinstance(kv, PackedKV):
        raise TypeError(f"kv must be a PackedKV, got {type(kv).__name__}")
    check_packed(kv.k, "kv.k")
    check_packed(kv.v, "kv.v")
    group = check_query(q, kv.k)
    if mask is not None:
        b, h, n = kv.shape[0], kv.shape[1], kv.n_tokens
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.dim() != 3 or mask.shape[0] != b or mask.shape[1] not in (1, h) or mask.shape[2] != n:
            raise ValueError(f"mask must have shape [{b}, 1 or {h}, {n}] (packed token order), got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    return group


def n_splits(work_items: int, n_packs: int, device: torch.device, requested: int | None) -> int:
    """Chunks the packed sequence is cut into per (batch, KV head).

    Enough programs to fill the GPU about four times over; each chunk keeps at least one
    pack. ``requested`` (tests, tuning) overrides the heuristic.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"n_splits must be >= 1, got {requested}")
        return max(1, min(requested, n_packs))
    if n_packs == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_packs, -(-4 * sms // max(work_items, 1))))
