"""Scores of one query token against packed K, unpacked in registers: ``q . K^T``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_query, n_splits, use_triton
from .planes import k_block_query, k_word_scores, load_query_tile, pack_meta, packed_args, split_rows, tile_tokens
from .reference import qk_reference


@triton.jit
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
    """Grid (batch * kv_heads, splits); a program scores its blocks for the whole GQA group."""
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    PACKS_PER_BLOCK: tl.constexpr = BLOCK // PACK
    q = load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D)
    q_hi, q_lo, q_norm = split_rows(q)
    q_sum = tl.sum(q, axis=1)
    rows = tl.arange(0, 16)
    tt = tile_tokens()
    widths_bh = widths_ptr + b * s_wb + h * s_wh
    mins_bh = mins_ptr + b * s_mb + h * s_mh
    scale_bh = scale_ptr + b * s_sb + h * s_sh
    zero_bh = zero_ptr + b * s_zb + h * s_zh
    out_rows = out_ptr + b * s_outb + (h * GROUP + rows[:, None]) * s_outh
    first = tl.program_id(1) * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        a_hi, a_lo, a_norm, bias = k_block_query(
            q, q_hi, q_lo, q_norm, scale_bh, zero_bh, block, s_sn, s_sx, s_zn, s_zx, D, TOKEN_GROUPED)
        for j in range(0, PACKS_PER_BLOCK):
            pack = block * PACKS_PER_BLOCK + j
            base = tl.load(offsets_ptr + b * s_ob + h * s_oh + pack * s_op).to(tl.int64)
            w, m, starts, max_w = pack_meta(widths_bh, mins_bh, pack, s_wp, s_wc, s_mp, s_mc, D, MIN_BITS)
            for i in tl.static_range(WPP):
                scores = k_word_scores(
                    a_hi, a_lo, a_norm, bias, q_sum,
                    words_ptr, s_word, base, w, m, starts, max_w, i,
                    scale_bh, zero_bh, block, j * PACK + i * 32 + tt, s_sn, s_sx, s_zn, s_zx,
                    WPP, D, TOKEN_GROUPED,
                )
                cols = pack * PACK + i * 32 + tt
                tl.store(out_rows + cols[None, :] * s_outt, scores, mask=rows[:, None] < GROUP)


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
        num_warps=_common.NUM_WARPS,
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
