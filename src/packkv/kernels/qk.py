"""Scores of one query token against packed K, unpacked in registers: ``q . K^T``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_query, n_splits, use_triton
from .planes import k_query, k_word_scores, packed_args, tile_tokens, unpack_word, word_meta, word_planes
from .reference import qk_reference


# Batch/head strides and counts change as a cache grows; specializing on them (== 1,
# divisible by 16) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_outb', 's_outh', 'heads', 'n_blocks', 'blocks_per_split'])
def _qk_kernel(
    q_ptr, out_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_qb, s_qh, s_qd, s_outb, s_outh, s_outt,
    heads, n_blocks, blocks_per_split,
    GROUP: tl.constexpr, D: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
    MIN_BITS: tl.constexpr, TOKEN_GROUPED: tl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program scores its blocks for the whole GQA group.

    Its 32-token words run through the pipeline of planes.py: word i is scored while the
    planes of word i+1 and the metadata of word i+2 load.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    WPB: tl.constexpr = BLOCK // 32
    rows = tl.arange(0, 16)
    tt = tile_tokens()
    offsets_bh = offsets_ptr + b * s_ob + h * s_oh
    widths_bh = widths_ptr + b * s_wb + h * s_wh
    mins_bh = mins_ptr + b * s_mb + h * s_mh
    scale_bh = scale_ptr + b * s_sb + h * s_sh
    zero_bh = zero_ptr + b * s_zb + h * s_zh
    out_rows = out_ptr + b * s_outb + (h * GROUP + rows[:, None]) * s_outh
    first = tl.program_id(1) * blocks_per_split * WPB
    last = tl.minimum(first + blocks_per_split * WPB, n_blocks * WPB)
    # Pipeline state: word i (planes loaded) and word i+1 (metadata loaded).
    base, w, m, sc, ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, first, first < last,
                                   s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
    st, mw, x0, x1, x2, x3 = word_planes(words_ptr, s_word, base, w, first, WPP)
    n_base, n_w, n_m, n_sc, n_ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, first + 1, first + 1 < last,
                                             s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
    a_hi, a_lo, a_norm, bias = k_query(q_ptr, b, h, s_qb, s_qh, s_qd, sc, ze, GROUP, D, TOKEN_GROUPED)
    for word in range(first, last):
        n_st, n_mw, n_x0, n_x1, n_x2, n_x3 = word_planes(words_ptr, s_word, n_base, n_w, word + 1, WPP)
        f_base, f_w, f_m, f_sc, f_ze = word_meta(offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, word + 2, word + 2 < last,
                                                 s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx, WPP, BLOCK, D, MIN_BITS, TOKEN_GROUPED)
        if not TOKEN_GROUPED:
            if word % WPB == 0:  # a new block: fold its steps and minima into the query
                a_hi, a_lo, a_norm, bias = k_query(q_ptr, b, h, s_qb, s_qh, s_qd, sc, ze, GROUP, D, TOKEN_GROUPED)
        v = unpack_word(words_ptr, s_word, base, w, m, st, mw, word, x0, x1, x2, x3, WPP, D, True)
        scores = k_word_scores(a_hi, a_lo, a_norm, bias, v, sc, ze, mw, TOKEN_GROUPED)
        tl.store(out_rows + (word * 32 + tt)[None, :] * s_outt, scores, mask=rows[:, None] < GROUP)
        base, w, m, sc, ze, st, mw, x0, x1, x2, x3 = n_base, n_w, n_m, n_sc, n_ze, n_st, n_mw, n_x0, n_x1, n_x2, n_x3
        n_base, n_w, n_m, n_sc, n_ze = f_base, f_w, f_m, f_sc, f_ze


def qk_triton(q: torch.Tensor, k: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Triton :func:`qk` (inputs already validated)."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.heads
    out = torch.empty(batch, q_heads, k.n_tokens, dtype=torch.float32, device=q.device)
    n_blocks = k.n_tokens // k.block_size
    if n_blocks == 0:
        return out
    per_split = -(-n_blocks // n_splits(batch * k.heads, n_blocks, q.device, splits))
    grid = (batch * k.heads, -(-n_blocks // per_split))
    _qk_kernel[grid](
        q, out, *packed_args(k), *q.stride(), *out.stride(),
        k.heads, n_blocks, per_split,
        GROUP=group, D=head_dim, PACK=k.pack_size, BLOCK=k.block_size,
        MIN_BITS=k.min_bits, TOKEN_GROUPED=k.grouping == "token",
        num_warps=_common.num_warps("qk", head_dim),
    )
    return out


def qk(q: torch.Tensor, k: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Unscaled scores of one query token against packed K.

    Args:
        q: ``[batch, q_heads, head_dim]`` fp16/bf16; q_heads a multiple of K's heads (GQA:
            query head h reads KV head ``h // group``), head_dim 64 or 128.
        k: packed K.
        splits: chunks of the sequence (whole blocks) per (batch, KV head); None picks
            enough to fill the GPU.

    Returns:
        fp32 ``[batch, q_heads, k.n_tokens]``, in packed token order. Triton on CUDA (and
        on the CPU under ``TRITON_INTERPRET=1``), else :func:`qk_reference`.
    """
    check_packed(k, "k")
    check_query(q, k)
    if not use_triton(q.device):
        return qk_reference(q, k)
    return qk_triton(q, k, splits)
