"""Weighted sum of packed V rows, unpacked in registers: ``p . V``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_probs, n_splits, use_triton
from .planes import pack_meta, packed_args, tile_tokens, v_word_product
from .reference import pv_reference


@triton.jit
def _pv_kernel(
    p_ptr, part_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_pb, s_ph, s_pt, s_partb, s_parth, s_parts,
    heads, n_blocks, blocks_per_split,
    GROUP: tl.constexpr, D: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
    MIN_BITS: tl.constexpr, TOKEN_GROUPED: tl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program writes its split's partial sum ``[GROUP, D]``."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    PACKS_PER_BLOCK: tl.constexpr = BLOCK // PACK
    rows = tl.arange(0, 16)
    tt = tile_tokens()
    chan = tl.arange(0, D)
    widths_bh = widths_ptr + b * s_wb + h * s_wh
    mins_bh = mins_ptr + b * s_mb + h * s_mh
    scale_bh = scale_ptr + b * s_sb + h * s_sh
    zero_bh = zero_ptr + b * s_zb + h * s_zh
    p_rows = p_ptr + b * s_pb + (h * GROUP + rows[:, None]) * s_ph
    acc = tl.zeros([16, D], dtype=tl.float32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        for j in range(0, PACKS_PER_BLOCK):
            pack = block * PACKS_PER_BLOCK + j
            base = tl.load(offsets_ptr + b * s_ob + h * s_oh + pack * s_op).to(tl.int64)
            w, m, starts, max_w = pack_meta(widths_bh, mins_bh, pack, s_wp, s_wc, s_mp, s_mc, D, MIN_BITS)
            for i in tl.static_range(WPP):
                cols = pack * PACK + i * 32 + tt
                p = tl.load(p_rows + cols[None, :] * s_pt, mask=rows[:, None] < GROUP, other=0.0).to(tl.float32)
                acc += v_word_product(
                    p, words_ptr, s_word, base, w, m, starts, max_w, i,
                    scale_bh, zero_bh, block, j * PACK + i * 32 + tt, s_sn, s_sx, s_zn, s_zx,
                    WPP, D, TOKEN_GROUPED,
                )
    out = part_ptr + b * s_partb + (h * GROUP + rows[:, None]) * s_parth + split * s_parts + chan[None, :]
    tl.store(out, acc, mask=rows[:, None] < GROUP)


def pv_triton(p: torch.Tensor, v: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Triton :func:`pv` (inputs already validated)."""
    batch, q_heads, _ = p.shape
    group = q_heads // v.heads
    n_blocks = v.n_tokens // v.block_size
    if n_blocks == 0:
        return torch.zeros(batch, q_heads, v.head_dim, dtype=torch.float32, device=p.device)
    per_split = -(-n_blocks // n_splits(batch * v.heads, n_blocks, p.device, splits))
    n_split = -(-n_blocks // per_split)
    partial = torch.empty(batch, q_heads, n_split, v.head_dim, dtype=torch.float32, device=p.device)
    _pv_kernel[(batch * v.heads, n_split)](
        p, partial, *packed_args(v), *p.stride(), *partial.stride()[:3],
        v.heads, n_blocks, per_split,
        GROUP=group, D=v.head_dim, PACK=v.pack_size, BLOCK=v.block_size,
        MIN_BITS=v.min_bits, TOKEN_GROUPED=v.grouping == "token",
        num_warps=_common.NUM_WARPS,
    )
    return partial.sum(dim=2)


def pv(p: torch.Tensor, v: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Weighted sum of packed V rows.

    Args:
        p: ``[batch, q_heads, v.n_tokens]`` float weights in packed token order; q_heads a
            multiple of V's heads (query head h reads KV head ``h // group``).
        v: packed V, head_dim 64 or 128.
        splits: chunks of the sequence (whole blocks) per (batch, KV head); None picks enough to fill the GPU.

    Returns:
        fp32 ``[batch, q_heads, head_dim]``. Triton on CUDA (and on the CPU under
        ``TRITON_INTERPRET=1``), else :func:`pv_reference`.
    """
    check_packed(v, "v")
    check_probs(p, v)
    if not use_triton(p.device):
        return pv_reference(p, v)
    return pv_triton(p, v, splits)
