"""Scores of one query token against packed K, unpacked in registers: ``q . K^T``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_query, count_resident, programs_per_sm, tile_splits, use_asm, use_triton
from .planes import (
    fetch_meta, high_tile, load_query_tile, packed_args, planes_to_tile, pow2_rows, side_pointers, split_halves, split_tiles,
    stage_tile, tile_tokens,
)
from .reference import qk_reference

try:  # Gluon is experimental: a Triton without it, or with another API, keeps the Triton kernel
    from . import qk_gluon as _gluon
except Exception:  # noqa: BLE001 (any failure of the import means: not available)
    _gluon = None


@triton.jit
def k_query(q):
    """The folded query for token-grouped K, from q fp32 ``[16, D]``: fp16 ``a = q / pw``
    (exact: ``pw`` is a power of two a row), ``pw [16]`` and ``qsum = sum(q) [16]``."""
    pw = pow2_rows(q)
    return (q / pw[:, None]).to(tl.float16), pw, tl.sum(q, axis=1)


@triton.jit
def k_tile_scores(q, a, pw, qsum, ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, scale, zero,
                  tile, word_end, s_word, WPP: tl.constexpr, TOKEN_GROUPED: tl.constexpr, WIDE: tl.constexpr,
                  ASM: tl.constexpr):
    """Raw scores ``q . K^T`` of one tile (state from planes.stage_tile): fp32
    ``[16, TW * 32]`` in :func:`tile_tokens` order, and which columns are real tokens.

    Token grouping (``K[t, c] = zero_t + scale_t (m_c + u_tc)``): with ``a, pw, qsum`` from
    :func:`k_query`, ``score_t = zero_t qsum + scale_t pw (a . (m + u_t))``; the dot is exact
    (fp16 operands that hold q and the integers exactly, fp32 accumulation). Channel
    grouping (the block's ``scale_c``, ``zero_c``): ``score_t = sum(q zero) + (q scale) . (m + u_t)``,
    the fp32 ``q scale`` split into two fp16 halves for two tensor-core products.
    ``WIDE``: some width may exceed 8 bits (PackedTensor.width_bound); else that path is
    not compiled (it would cost registers even when not taken).
    """
    NT: tl.constexpr = x0.shape[0] * 32
    tok = tile * NT + tile_tokens(NT)
    on = tok < word_end * 32
    low = planes_to_tile(x0, x1, x2, x3, x4, x5, x6, x7, m, max_w, 0, ASM)
    if TOKEN_GROUPED:
        dot = tl.dot(a, low)
        if WIDE and max_w > 8:
            dot += 256.0 * tl.dot(a, high_tile(ptrs, w, max_w, s_word, WPP, ASM))
        scores = zero.to(tl.float32)[None, :] * qsum[:, None] + scale.to(tl.float32)[None, :] * (pw[:, None] * dot)
    else:
        qs = q * scale.to(tl.float32)[None, :]
        qs_pw = pow2_rows(qs)
        a_hi, a_lo = split_halves(qs / qs_pw[:, None], tl.float16)
        dot = tl.dot(a_hi, low) + tl.dot(a_lo, low)
        if WIDE and max_w > 8:
            high = high_tile(ptrs, w, max_w, s_word, WPP, ASM)
            dot += 256.0 * (tl.dot(a_hi, high) + tl.dot(a_lo, high))
        scores = tl.sum(q * zero.to(tl.float32)[None, :], axis=1)[:, None] + qs_pw[:, None] * dot
    return scores, on


# Batch/head strides and counts change as a cache grows; specializing on them (== 1,
# divisible by 16) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_outb', 's_outh', 'heads', 'n_words', 'tiles_per_split'])
def _qk_kernel(
    q_ptr, out_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_qb, s_qh, s_qd, s_outb, s_outh, s_outt,
    heads, n_words, tiles_per_split,
    GROUP: tl.constexpr, D: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
    MIN_BITS: tl.constexpr, TOKEN_GROUPED: tl.constexpr, TW: tl.constexpr, WIDE: tl.constexpr, ASM: tl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program scores its tiles for the whole GQA group.

    A software pipeline: while tile i is unpacked and multiplied, the planes and scales of
    tile i+1 and the metadata of tile i+2 are in flight.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    rows = tl.arange(0, 16)
    offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh = side_pointers(
        offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr, b, h, s_ob, s_oh, s_wb, s_wh, s_mb, s_mh, s_sb, s_sh, s_zb, s_zh)
    q = load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D)
    a, pw, qsum = k_query(q)
    out_rows = out_ptr + b * s_outb + (h * GROUP + rows[:, None]) * s_outh
    first, last, word_end = split_tiles(tl.program_id(1), tiles_per_split, n_words, TW)
    f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, first, word_end, s_op, s_wp, s_wc, s_mp, s_mc, TW, WPP, D, MIN_BITS)
    ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, sc, ze = stage_tile(
        words_ptr, scale_bh, zero_bh, f0, wb, mb, first, word_end, s_word, s_sn, s_sx, s_zn, s_zx,
        TW, WPP, BLOCK, MIN_BITS, TOKEN_GROUPED)
    f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, first + 1, word_end, s_op, s_wp, s_wc, s_mp, s_mc, TW, WPP, D, MIN_BITS)
    for tile in range(first, last):
        n_ptrs, n_w, n_m, n_max_w, n_x0, n_x1, n_x2, n_x3, n_x4, n_x5, n_x6, n_x7, n_sc, n_ze = stage_tile(
            words_ptr, scale_bh, zero_bh, f0, wb, mb, tile + 1, word_end, s_word, s_sn, s_sx, s_zn, s_zx,
            TW, WPP, BLOCK, MIN_BITS, TOKEN_GROUPED)
        f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, tile + 2, word_end, s_op, s_wp, s_wc, s_mp, s_mc,
                                TW, WPP, D, MIN_BITS)
        scores, on = k_tile_scores(q, a, pw, qsum, ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, sc, ze,
                                   tile, word_end, s_word, WPP, TOKEN_GROUPED, WIDE, ASM)
        tok = tile * TW * 32 + tile_tokens(TW * 32)
        tl.store(out_rows + tok[None, :] * s_outt, scores, mask=(rows[:, None] < GROUP) & on[None, :])
        ptrs, w, m, max_w, sc, ze = n_ptrs, n_w, n_m, n_max_w, n_sc, n_ze
        x0, x1, x2, x3, x4, x5, x6, x7 = n_x0, n_x1, n_x2, n_x3, n_x4, n_x5, n_x6, n_x7


def qk_triton(q: torch.Tensor, k: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Triton :func:`qk` (inputs already validated)."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.heads
    out = torch.empty(batch, q_heads, k.n_tokens, dtype=torch.float32, device=q.device)
    n_words = k.n_tokens // 32
    if n_words == 0:
        return out
    settings = _common.launch_settings("qk", k.head_dim, k.block_size, k.grouping == "channel")
    tw = settings["tile_words"]
    constexprs = dict(
        GROUP=group, D=head_dim, PACK=k.pack_size, BLOCK=k.block_size,
        MIN_BITS=k.min_bits, TOKEN_GROUPED=k.grouping == "token", TW=tw, WIDE=k.width_bound > 8, ASM=use_asm(q.device),
    )
    key = ("qk", q.device, tuple(constexprs.items()), tuple(settings["options"].items()))
    per_sm = programs_per_sm(settings["programs_per_sm"], key)
    per_split, n_split = tile_splits(batch * k.heads, n_words, tw, q.device, splits, per_sm)
    grid = (batch * k.heads, n_split)
    compiled = _qk_kernel[grid](
        q, out, *packed_args(k), *q.stride(), *out.stride(), k.heads, n_words, per_split,
        **constexprs, **settings["options"],
    )
    count_resident(key, compiled, q.device)
    return out


def qk(q: torch.Tensor, k: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Unscaled scores of one query token against packed K.

    Args:
        q: ``[batch, q_heads, head_dim]`` fp16/bf16; q_heads a multiple of K's heads (GQA:
            query head h reads KV head ``h // group``), head_dim 64 or 128.
        k: packed K.
        splits: chunks of the sequence (whole tiles of packs) per (batch, KV head); None
            picks one wave: as many programs as the GPU holds at once.

    Returns:
        fp32 ``[batch, q_heads, k.n_tokens]``, in packed token order. On CUDA, the Gluon
        kernel of qk_gluon.py where it serves the format (the defaults), else Triton (also
        on the CPU under ``TRITON_INTERPRET=1``); else :func:`qk_reference`.
    """
    check_packed(k, "k")
    group = check_query(q, k)
    if not use_triton(q.device):
        return qk_reference(q, k)
    if _common.GLUON and _gluon is not None and _gluon.supported(k, group, q.device):
        return _gluon.qk_gluon(q, k, splits)
    return qk_triton(q, k, splits)
