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
# Overrides for benchmarks and tuning, read at each launch; None keeps the per-kernel
# defaults of launch_settings.
NUM_WARPS: int | None = None  # warps a program
TILE_WORDS: int | None = None  # 32-token words a program unpacks per step
PROGRAMS_PER_SM: int | None = None  # programs the split heuristic aims for, per multiprocessor
MAX_REGISTERS: int | None = None  # register cap a thread (Triton's maxnreg)

# Measured on an H100 (docs/notes/kernels.md, v5, T = 32K, Llama-3.1-8B and SmolLM2 shapes):
# (tile words, programs per multiprocessor, register cap or None) by kernel and head_dim.
# A cap of 128 lets 4 programs of the products share a multiprocessor without spills;
# attention keeps its registers (a cap spills it and costs up to 1.6x).
DEFAULTS = {
    ("qk", 64): (2, 16, 128), ("qk", 128): (2, 16, 128),
    ("pv", 64): (2, 8, 128), ("pv", 128): (2, 8, 128),
    ("attention", 64): (2, 8, None), ("attention", 128): (4, 8, None),
}


def use_triton(device: torch.device) -> bool:
    """Triton on CUDA tensors; on the CPU only under the Triton interpreter (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def use_asm(device: torch.device) -> bool:
    """Whether the kernels may use inline PTX: compiled for a GPU, not interpreted."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def launch_settings(kernel: str, head_dim: int, block_size: int, channel_grouped: bool) -> dict:
    """Tile words, programs per multiprocessor, and Triton launch options of a decode kernel.

    ``kernel``: "qk", "pv" or "attention"; ``head_dim`` 64 or 128. One thread a channel of
    each unpacked word, so head_dim / 32 warps. A larger tile spreads the per-step costs
    (metadata, prefix sums, barriers) over more values but takes registers; channel
    grouping keeps a tile inside one block (its scales are per block).
    """
    tw, pps, cap = DEFAULTS[kernel, head_dim]
    tw = TILE_WORDS or tw
    if channel_grouped:
        tw = min(tw, block_size // 32)
    options = {"num_warps": NUM_WARPS or head_dim // 32}
    cap = MAX_REGISTERS or cap
    if cap:
        options["maxnreg"] = cap
    return {"tile_words": tw, "programs_per_sm": PROGRAMS_PER_SM or pps, "options": options}


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


def tile_splits(
    work_items: int, n_words: int, tile_words: int, device: torch.device, requested: int | None, programs_per_sm: int
) -> tuple[int, int]:
    """How a (batch, KV head)'s ``n_words`` packed words are cut into chunks of whole tiles
    of ``tile_words`` words: ``(tiles_per_split, splits)``, ``splits`` 0 when there is no word.

    Enough chunks for ``programs_per_sm`` programs on every multiprocessor over the
    ``work_items`` (batch, KV head) pairs; each chunk keeps at least one tile. ``requested``
    (tests, tuning) overrides the heuristic.
    """
    n_tiles = -(-n_words // tile_words)
    if n_tiles == 0:
        return 1, 0
    if requested is not None:
        if requested < 1:
            raise ValueError(f"n_splits must be >= 1, got {requested}")
        wanted = min(requested, n_tiles)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        wanted = max(1, min(n_tiles, -(-programs_per_sm * sms // max(work_items, 1))))
    per_split = -(-n_tiles // wanted)
    return per_split, -(-n_tiles // per_split)
