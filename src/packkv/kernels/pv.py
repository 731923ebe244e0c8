"""Weighted sum of packed V rows, unpacked in registers: ``p . V``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.format import PackedTensor
from . import _common
from ._common import check_packed, check_probs, count_resident, programs_per_sm, tile_splits, use_asm, use_triton
from .planes import (
    fetch_meta, high_tile, packed_args, planes_to_tile, pow2_rows, side_pointers, split_tiles, stage_tile, tile_tokens,
)
from .reference import pv_reference

try:  # Gluon is experimental: a Triton without it, or with another API, keeps the Triton kernel
    from . import pv_gluon as _gluon
except Exception:  # noqa: BLE001 (any failure of the import means: not available)
    _gluon = None


@triton.jit
def v_tile_sum(p, ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, scale, zero, s_word,
               WPP: tl.constexpr, TOKEN_GROUPED: tl.constexpr, NORMALIZE: tl.constexpr, WIDE: tl.constexpr,
               ASM: tl.constexpr):
    """``p . V`` over one tile (state from planes.stage_tile), for weights ``p`` fp32
    ``[16, TW * 32]`` in :func:`tile_tokens` order (0 past the last token).

    Returns the sum without the token minima, fp32 ``[16, D]``, and their part ``[16]``,
    which is the same for every channel (kept apart so that a caller adds it once).
    Token grouping (``V[t, c] = zero_t + scale_t (m_c + u_tc)``): the weights ``p scale``
    go to the tensor cores in fp16, like FlashAttention's probabilities (about 2**-12
    relative a weight), after dividing each row by a power of two when ``NORMALIZE`` (for
    weights that may be tiny; softmax weights of at most 1 need not). Channel grouping
    (the block's steps and minima): ``scale_c (p . (m + u)) + zero_c sum(p)``. ``WIDE`` as in
    :func:`qk.k_tile_scores`.
    """
    if TOKEN_GROUPED:
        weights = p * scale.to(tl.float32)[None, :]
        z = tl.sum(p * zero.to(tl.float32)[None, :], axis=1)
    else:
        weights = p
        z = tl.zeros([16], dtype=tl.float32)
    if NORMALIZE:
        pw = pow2_rows(weights)
        weights = weights / pw[:, None]
    a = weights.to(tl.float16)
    out = tl.dot(a, tl.trans(planes_to_tile(x0, x1, x2, x3, x4, x5, x6, x7, m, max_w, 0, ASM)))
    if WIDE and max_w > 8:
        out += 256.0 * tl.dot(a, tl.trans(high_tile(ptrs, w, max_w, s_word, WPP, ASM)))
    if NORMALIZE:
        out = out * pw[:, None]
    if not TOKEN_GROUPED:
        out = out * scale.to(tl.float32)[None, :] + zero.to(tl.float32)[None, :] * tl.sum(p, axis=1)[:, None]
    return out, z


@triton.jit
def _load_weights(p_rows, tile, word_end, s_pt, GROUP: tl.constexpr, TW: tl.constexpr):
    """Issue the loads of a tile's weights ``[16, TW * 32]`` (rows >= GROUP and tokens past ``word_end``: 0)."""
    tok = tile * TW * 32 + tile_tokens(TW * 32)
    rows = tl.arange(0, 16)
    return tl.load(p_rows + tok[None, :] * s_pt, mask=(rows[:, None] < GROUP) & (tok < word_end * 32)[None, :], other=0.0)


# Batch/head strides and counts change as a cache grows; specializing on them (== 1,
# divisible by 16) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_pb', 's_ph', 's_partb', 's_parth', 'heads', 'n_words', 'tiles_per_split'])
def _pv_kernel(
    p_ptr, part_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_pb, s_ph, s_pt, s_partb, s_parth, s_parts,
    heads, n_words, tiles_per_split,
    GROUP: tl.constexpr, D: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr,
    MIN_BITS: tl.constexpr, TOKEN_GROUPED: tl.constexpr, TW: tl.constexpr, WIDE: tl.constexpr, ASM: tl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program writes its split's partial sum ``[GROUP, D]``.

    The software pipeline of qk.py: while tile i is summed, the planes, scales and weights
    of tile i+1 and the metadata of tile i+2 are in flight.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    WPP: tl.constexpr = PACK // 32
    rows = tl.arange(0, 16)
    chan = tl.arange(0, D)
    offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh = side_pointers(
        offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr, b, h, s_ob, s_oh, s_wb, s_wh, s_mb, s_mh, s_sb, s_sh, s_zb, s_zh)
    p_rows = p_ptr + b * s_pb + (h * GROUP + rows[:, None]) * s_ph
    acc = tl.zeros([16, D], dtype=tl.float32)
    z_acc = tl.zeros([16], dtype=tl.float32)
    first, last, word_end = split_tiles(split, tiles_per_split, n_words, TW)
    f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, first, word_end, s_op, s_wp, s_wc, s_mp, s_mc, TW, WPP, D, MIN_BITS)
    ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, sc, ze = stage_tile(
        words_ptr, scale_bh, zero_bh, f0, wb, mb, first, word_end, s_word, s_sn, s_sx, s_zn, s_zx,
        TW, WPP, BLOCK, MIN_BITS, TOKEN_GROUPED)
    p = _load_weights(p_rows, first, word_end, s_pt, GROUP, TW)
    f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, first + 1, word_end, s_op, s_wp, s_wc, s_mp, s_mc, TW, WPP, D, MIN_BITS)
    for tile in range(first, last):
        n_ptrs, n_w, n_m, n_max_w, n_x0, n_x1, n_x2, n_x3, n_x4, n_x5, n_x6, n_x7, n_sc, n_ze = stage_tile(
            words_ptr, scale_bh, zero_bh, f0, wb, mb, tile + 1, word_end, s_word, s_sn, s_sx, s_zn, s_zx,
            TW, WPP, BLOCK, MIN_BITS, TOKEN_GROUPED)
        n_p = _load_weights(p_rows, tile + 1, word_end, s_pt, GROUP, TW)
        f0, wb, mb = fetch_meta(offsets_bh, widths_bh, mins_bh, tile + 2, word_end, s_op, s_wp, s_wc, s_mp, s_mc,
                                TW, WPP, D, MIN_BITS)
        out, z = v_tile_sum(p.to(tl.float32), ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, sc, ze, s_word,
                            WPP, TOKEN_GROUPED, True, WIDE, ASM)
        acc += out
        z_acc += z
        ptrs, w, m, max_w, sc, ze, p = n_ptrs, n_w, n_m, n_max_w, n_sc, n_ze, n_p
        x0, x1, x2, x3, x4, x5, x6, x7 = n_x0, n_x1, n_x2, n_x3, n_x4, n_x5, n_x6, n_x7
    acc += z_acc[:, None]
    out_ptrs = part_ptr + b * s_partb + (h * GROUP + rows[:, None]) * s_parth + split * s_parts + chan[None, :]
    tl.store(out_ptrs, acc, mask=rows[:, None] < GROUP)


def pv_triton(p: torch.Tensor, v: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Triton :func:`pv` (inputs already validated)."""
    batch, q_heads, _ = p.shape
    group = q_heads // v.heads
    n_words = v.n_tokens // 32
    if n_words == 0:
        return torch.zeros(batch, q_heads, v.head_dim, dtype=torch.float32, device=p.device)
    settings = _common.launch_settings("pv", v.head_dim, v.block_size, v.grouping == "channel")
    tw = settings["tile_words"]
    constexprs = dict(
        GROUP=group, D=v.head_dim, PACK=v.pack_size, BLOCK=v.block_size,
        MIN_BITS=v.min_bits, TOKEN_GROUPED=v.grouping == "token", TW=tw, WIDE=v.width_bound > 8, ASM=use_asm(p.device),
    )
    key = ("pv", p.device, tuple(constexprs.items()), tuple(settings["options"].items()))
    per_sm = programs_per_sm(settings["programs_per_sm"], key)
    per_split, n_split = tile_splits(batch * v.heads, n_words, tw, p.device, splits, per_sm)
    partial = torch.empty(batch, q_heads, n_split, v.head_dim, dtype=torch.float32, device=p.device)
    compiled = _pv_kernel[(batch * v.heads, n_split)](
        p, partial, *packed_args(v), *p.stride(), *partial.stride()[:3], v.heads, n_words, per_split,
        **constexprs, **settings["options"],
    )
    count_resident(key, compiled, p.device)
    return partial.sum(dim=2)


def pv(p: torch.Tensor, v: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """Weighted sum of packed V rows.

    Args:
        p: ``[batch, q_heads, v.n_tokens]`` float weights in packed token order; q_heads a
            multiple of V's heads (query head h reads KV head ``h // group``).
        v: packed V, head_dim 64 or 128.
        splits: chunks of the sequence (whole tiles of packs) per (batch, KV head); None
            picks one wave: as many programs as the GPU holds at once.

    Returns:
        fp32 ``[batch, q_heads, head_dim]``. The kernel multiplies in fp16 on the tensor
        cores: each weight (times its token's step) is rounded to fp16 after scaling its
        row by a power of two, about 2**-12 relative, as FlashAttention rounds its
        probabilities. On CUDA, the Gluon kernel of pv_gluon.py where it serves the format
        (the defaults), else Triton (also on the CPU under ``TRITON_INTERPRET=1``); else
        :func:`pv_reference`.
    """
    check_packed(v, "v")
    group = check_probs(p, v)
    if not use_triton(p.device):
        return pv_reference(p, v)
    if _common.GLUON and _gluon is not None and _gluon.supported(v, group, p.device):
        return _gluon.pv_gluon(p, v, splits)
    return pv_triton(p, v, splits)
