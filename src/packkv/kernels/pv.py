"""Weighted sum of packed V rows, unpacked in registers: ``p . V``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_probs, n_splits, use_triton
from .planes import packed_args, tile_tokens, unpack_word, v_word_product, word_meta, word_planes
from .reference import pv_reference


# Batch/head strides and counts change as a cache grows; specializing on them (== 1,
# divisible by 16) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_pb', 's_ph', 's_partb', 's_parth', 'heads', 'n_blocks', 'blocks_per_split'])
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
    """Grid (batch * kv_heads, splits); a program writes its split's partial sum ``[GROUP, D]``.

    Its 32-token words run through the pipeline of planes.py: word i is summed while the
    planes and weights of word i+1 and the metadata of word i+2 load.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    WPB: tl.constexpr = BLOCK // 32
    rows = tl.arange(0, 16)
    tt = tile_tokens()
    chan = tl.arange(0, D)
    offsets_bh = offsets_ptr + b * s_ob + h * s_oh
    widths_bh = widths_ptr + b * s_wb + h * s_wh
    mins_bh = mins_ptr + b * s_mb + h * s_mh
    scale_bh = scale_ptr + b * s_sb + h * s_sh
    zero_bh = zero_ptr + b * s_zb + h * s_zh
    p_rows = p_ptr + b * s_pb + (h * GROUP + rows[:, None]) * s_ph
    acc = tl.zeros([16, D], dtype=tl.float32)
    first = split * blocks_per_split * WPB
    last = tl.minimum(first + blocks_per_split * WPB, n_blocks * WPB)
    # Pipeline state: word i (planes and weights loaded) and word i+1 (metadata loaded).
    base, w, m, sc, ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, first, first < last,
                                   s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
    st, mw, x0, x1, x2, x3 = word_planes(words_ptr, s_word, base, w, first, WPP)
    p = tl.load(p_rows + (first * 32 + tt)[None, :] * s_pt, mask=rows[:, None] < tl.where(first < last, GROUP, 0), other=0.0)
    n_base, n_w, n_m, n_sc, n_ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, first + 1, first + 1 < last,
                                             s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
    for word in range(first, last):
        n_st, n_mw, n_x0, n_x1, n_x2, n_x3 = word_planes(words_ptr, s_word, n_base, n_w, word + 1, WPP)
        n_p = tl.load(p_rows + ((word + 1) * 32 + tt)[None, :] * s_pt,
                      mask=rows[:, None] < tl.where(word + 1 < last, GROUP, 0), other=0.0)
        f_base, f_w, f_m, f_sc, f_ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, word + 2, word + 2 < last,
                                                 s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
        v = unpack_word(words_ptr, s_word, base, w, m, st, mw, word, x0, x1, x2, x3, WPP, D, False)
        acc += v_word_product(p.to(tl.float32), v, sc, ze, mw, TOKEN_GROUPED)
        base, w, m, sc, ze, st, mw, x0, x1, x2, x3, p = n_base, n_w, n_m, n_sc, n_ze, n_st, n_mw, n_x0, n_x1, n_x2, n_x3, n_p
        n_base, n_w, n_m, n_sc, n_ze = f_base, f_w, f_m, f_sc, f_ze
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
        num_warps=_common.num_warps("pv", v.head_dim),
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
