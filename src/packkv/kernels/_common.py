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
# pv and the decode attention on CUDA use their Gluon kernels where these serve the format
# (pv_gluon.py, attention_gluon.py); False: the Triton kernels everywhere.
GLUON = True

# Measured on an H100 (docs/notes/kernels.md, v5, T = 32K, Llama-3.1-8B and SmolLM2 shapes):
# (tile words, programs per multiprocessor, register cap or None) by kernel and head_dim.
# A cap of 128 lets 4 programs of the products share a multiprocessor without spills;
# attention keeps its registers (a cap spills it and costs up to 1.6x). The programs per
# multiprocessor are those one multiprocessor holds at once, so that the splits make one
# wave (docs/notes/kernels.md, "Splits: one wave"): what the registers allow with Triton
# 3.6 on an H100 (the products 128 a thread; attention 255 x 4 warps at head_dim 128, 246
# x 2 at 64). A launch counts them on the kernel it compiled (count_resident), and later
# launches of that kernel use the count.
DEFAULTS = {
    ("qk", 64): (2, 8, 128), ("qk", 128): (2, 4, 128),
    ("pv", 64): (2, 8, 128), ("pv", 128): (2, 4, 128),
    ("attention", 64): (2, 4, None), ("attention", 128): (4, 2, None),
}
# Programs one multiprocessor holds at once, by kernel key (see programs_per_sm).
_RESIDENT: dict[tuple, int] = {}


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

    As many chunks as give every multiprocessor ``programs_per_sm`` programs over the
    ``work_items`` (batch, KV head) pairs, rounded down (so that a whole wave, plus the short
    programs of the fp16 tail, starts at once); at least one, and each chunk keeps at
    least one tile. ``requested`` (tests, tuning) overrides the heuristic.
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
        wanted = max(1, min(n_tiles, programs_per_sm * sms // max(work_items, 1)))
    per_split = -(-n_tiles // wanted)
    return per_split, -(-n_tiles // per_split)


def resident_programs(compiled, props) -> int | None:
    """Programs of a compiled Triton kernel that one multiprocessor holds at once, bound by
    registers, threads and shared memory; None if the kernel does not say.

    ``props``: the device's properties (``torch.cuda.get_device_properties``); a field it
    lacks takes the value of recent NVIDIA GPUs, or drops its bound.
    """
    regs, meta = getattr(compiled, "n_regs", 0), getattr(compiled, "metadata", None)
    warps = getattr(meta, "num_warps", 0)
    if not regs or not warps:
        return None
    # Registers are given to a warp in units of 256 (8 a thread).
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (-(-regs // 8) * 8 * 32 * warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    shared, shared_sm = getattr(meta, "shared", 0), getattr(props, "shared_memory_per_multiprocessor", 0)
    by_shared = shared_sm // shared if shared and shared_sm else by_threads
    return max(1, min(by_regs, by_threads, by_shared))


def programs_per_sm(default: int, key: tuple) -> int:
    """The programs a multiprocessor the split heuristic aims for: the PROGRAMS_PER_SM
    override, else those counted on a kernel compiled for ``key`` (the kernel's name,
    device, constexprs and launch options: what sets its registers), else ``default``."""
    if PROGRAMS_PER_SM is not None:
        return PROGRAMS_PER_SM
    return _RESIDENT.get(key, default)


def count_resident(key: tuple, compiled, device: torch.device) -> None:
    """Remember how many programs of ``compiled`` (what a CUDA launch returned) one
    multiprocessor holds at once, for the launches after it with the same ``key``."""
    if key not in _RESIDENT and device.type == "cuda":
        resident = resident_programs(compiled, torch.cuda.get_device_properties(device))
        if resident is not None:
            _RESIDENT[key] = resident
