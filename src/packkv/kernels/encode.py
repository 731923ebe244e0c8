"""GPU store stage: the reference codec's output from one Triton kernel.

``_encode_kernel`` (a program per (batch, head, block)) quantizes K and V, picks the median
order (or keeps the original one where that packs smaller, as the reference does), flags
values the codec rejects, places the block's packs after those of the blocks before it and
after the words a pool already uses (a decoupled look-back over the programs, advancing
that count on the device), and writes scale, zero, offsets, width nibbles, stored minima
and bit planes. Every tensor is bit-identical to :func:`packkv.compress_kv`.

The kernel writes into a :class:`PackedTensor` of buffers with spare rows (capacity along
the pack or block dimension) from a given block on and a word pool with room for the worst
case, so that :class:`packkv.store.PackedStore` appends in place without a device sync;
:func:`encode_kv_fused` gives it pools of the worst-case size, then copies the words to
pools of the exact size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..codec import check_kv, compress_kv
from ..codec.bitpack import MAX_WIDTH, PACK_ALIGN_WORDS, WORD_BITS
from ..codec.format import PackedKV, PackedTensor
from ..codec.quantize import FP16_MAX, level_bits
from ..config import PackKVConfig
from ._common import use_asm

FUSED_HEAD_DIMS = (64, 128)
# The value of a flag slot of ``counts`` while every value checked is accepted.
NO_BAD_VALUE = 2**63 - 1
_NO_BAD_VALUE = tl.constexpr(NO_BAD_VALUE)
# A look-back state (the encoder's scratch): words, and which. 0 while nothing is posted.
AGGREGATE = 1 << 61  # a program's own packs' words
INCLUSIVE = 1 << 62  # those of every program up to it, after the pool's used words
_AGGREGATE, _INCLUSIVE, _VALUE = tl.constexpr(AGGREGATE), tl.constexpr(INCLUSIVE), tl.constexpr(AGGREGATE - 1)


@triton.jit
def _round_up_fp16(x):
    """The smallest fp16 >= x (x >= 0, fp32), capped at 65504: as quantize.round_up_fp16."""
    y = x.to(tl.float16)
    up = (y.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    y = tl.where(y.to(tl.float32) < x, up, y)
    return tl.minimum(y.to(tl.float32), 65504.0)


@triton.jit
def _quantize_tile(x, lo, hi, rel, TOKEN: tl.constexpr):
    """Quantize one block ``x: [S, D]`` (fp32 of fp16 values) with its groups' ranges
    ``lo``, ``hi`` as quantize.quantize_blocks does, bit for bit: the integers and step."""
    step = _round_up_fp16(rel * (hi - lo))
    step = tl.where(step > 0, step, 1.0)
    inv = tl.math.div_rn(1.0, step)
    if TOKEN:
        lo2, step2, inv2 = lo[:, None], step[:, None], inv[:, None]
    else:
        lo2, step2, inv2 = lo[None, :], step[None, :], inv[None, :]
    # (x - lo) / step correctly rounded without a division a value: with inv = RN(1 / step),
    # q0 + (d - q0 * step) * inv rounds to RN(d / step) (Markstein's FMA correction; d and
    # the quotient are never subnormal here). Checked against IEEE division on 4e8 samples
    # around the rounding points of every fp16 step.
    d = x - lo2
    q0 = d * inv2
    y = tl.fma(tl.fma(-q0, step2, d), inv2, q0)
    # Round half to even, like torch.round: 0 <= y < 2**23, so adding 2**23 rounds y to an
    # integer (ties to even) in the low mantissa bits, and the bits are read as an int.
    return (y + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000, step


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _range(x, AXIS: tl.constexpr, COMPILED: tl.constexpr):
    """Minimum and maximum of ``x`` along AXIS, NaN where a value is NaN: compiled, a
    reduction with NaN-propagating min and max (as fast as the plain ones); under the
    interpreter (where tl.min skips NaN, and a Python combine would be slow) NaN where a
    sum of ``x * 0`` is."""
    if COMPILED:
        return tl.reduce(x, AXIS, _min_nan), tl.reduce(x, AXIS, _max_nan)
    else:
        nan = tl.sum(x * 0.0, AXIS)
        return tl.where(nan == 0, tl.min(x, AXIS), nan), tl.where(nan == 0, tl.max(x, AXIS), nan)


@triton.jit
def _load_quantize(ptr, s_t, tok, flag_ptr, token_base, bh, n_bh, rel, D: tl.constexpr, TOKEN: tl.constexpr,
                   COMPILED: tl.constexpr):
    """Rows ``tok`` of one head ``[S, D]`` (channels contiguous) quantized as
    quantize.quantize_blocks does, bit for bit: the integers, step and minimum.

    Lowers ``*flag_ptr`` to the key ``((token_base + tok) * n_bh + bh) * D + channel`` of the
    first value check_kv rejects: the ranges are taken with NaN propagating and before
    rounding to fp16, so a group's range is within +-65504 exactly when all its values are.
    """
    AXIS: tl.constexpr = 1 if TOKEN else 0
    c = tl.arange(0, D)
    x = tl.load(ptr + tok[:, None] * s_t + c[None, :]).to(tl.float32)
    lo, hi = _range(x, AXIS, COMPILED)
    if tl.min(((lo >= -65504.0) & (hi <= 65504.0)).to(tl.int32), 0) == 0:
        key = ((token_base + tok)[:, None] * n_bh + bh) * D + c[None, :]
        tl.atomic_min(flag_ptr, tl.min(tl.min(tl.where(tl.abs(x) <= 65504.0, _NO_BAD_VALUE, key), 1), 0))
    if ptr.dtype.element_ty != tl.float16:
        # Rounding is monotonic: the fp16 range is the rounded range of the input.
        x = x.to(tl.float16).to(tl.float32)
        lo = lo.to(tl.float16).to(tl.float32)
        hi = hi.to(tl.float16).to(tl.float32)
    q, step = _quantize_tile(x, lo, hi, rel, TOKEN)
    return q, step, lo


@triton.jit
def _lower_median(q, S: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """torch.median of each row of ``q: [S, D]`` (0 <= q < 2**BITS): a bisection on the
    value, counting the elements at most mid; BITS rounds (level_bits of V's rel)."""
    need = (D - 1) // 2 + 1
    lo = tl.zeros([S], tl.int32)
    hi = tl.full([S], (1 << BITS) - 1, tl.int32)
    for _ in tl.static_range(BITS):
        mid = (lo + hi) // 2
        enough = tl.sum((q <= mid[:, None]).to(tl.int32), axis=1) >= need
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return lo


@triton.jit
def _pack_stats(q, cap, bound, S: tl.constexpr, P: tl.constexpr, C: tl.constexpr):
    """Stored minima (capped at ``cap``) and widths ``[S // P, C]`` of the packs of
    consecutive rows of ``q: [S, C]`` (K's channels, then V's), and the planes each pack of
    each side stores ``[S // P, 2]``. Widths are at most ``bound`` ([C], the sides'
    level_bits), which only a rejected value can reach: it bounds what a pack writes."""
    qp = tl.reshape(q, [S // P, P, C])
    mins = tl.minimum(tl.min(qp, axis=1), cap)
    u = tl.max(qp, axis=1) - mins
    # bit_length(u): the exponent of float(u), exact below 2**24 (0 for u = 0).
    widths = tl.minimum(tl.maximum((u.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 126, 0), bound[None, :])
    return mins, widths, tl.sum(tl.reshape(widths, [S // P, 2, C // 2]), axis=2)


@triton.jit
def _read_rows(rows, order, C: tl.constexpr):
    """Rows ``order`` of a slot of integers ``[S, C]`` (``rows``: its row 0, by channel)."""
    return tl.load(rows + order[:, None] * C).to(tl.int32)


@triton.jit
def _padded(planes, WPP: tl.constexpr):
    """Words of packs of ``planes`` planes: padded to a multiple of 4 (as bitpack pads)."""
    return (planes * WPP + 3) // 4 * 4


@triton.jit
def _exclusive_prefix(state_ptr, count_ptr, ticket, last, total):
    """Words the packs of programs before ``ticket`` take in a pool, after the ``*count_ptr``
    used (read by ticket 0); ``last`` advances ``*count_ptr`` past all of them.

    A decoupled look-back (Merrill and Garland, 2016) over ``state_ptr[2 * ticket]``: a
    program posts its ``total`` (AGGREGATE), sums its predecessors' posts back to the
    nearest INCLUSIVE prefix, then posts its own. Predecessors took earlier tickets, so they
    run and never wait on it: no deadlock whatever the order programs are scheduled in.
    """
    W: tl.constexpr = 16
    if ticket == 0:
        prefix = tl.load(count_ptr)
    else:
        tl.atomic_xchg(state_ptr + 2 * ticket, total | _AGGREGATE, sem="release")
        prefix = tl.zeros([], tl.int64)
        end = ticket
        looking = ticket > 0
        while looking:
            pos = tl.arange(0, W)
            idx = end - 1 - pos  # predecessors, nearest first
            posted = tl.atomic_add(state_ptr + 2 * idx, 0, mask=idx >= 0, sem="acquire")
            posted = tl.where(idx >= 0, posted, _INCLUSIVE)  # before ticket 0: nothing
            first = tl.min(tl.where(posted >= _INCLUSIVE, pos, W), 0)  # nearest inclusive
            if tl.max(((pos < first) & (posted < _AGGREGATE)).to(tl.int32), 0) == 0:  # else: wait
                prefix += tl.sum(tl.where(pos <= first, posted & _VALUE, 0), 0)
                looking = first == W
                end -= W
    tl.atomic_xchg(state_ptr + 2 * ticket, (prefix + total) | _INCLUSIVE, sem="release")
    if last:
        tl.store(count_ptr, prefix + total)
    return prefix


@triton.jit
def _store_planes(u, widths, dest, words_ptr, PP: tl.constexpr, WPP: tl.constexpr, C: tl.constexpr,
                  FIELD: tl.constexpr):
    """Bit planes of the ``PP`` packs of ``u: [PP * WPP * 32, C]`` (rows in packed order,
    minima subtracted, below ``2**FIELD``) with ``widths [PP, C]``: plane b of channel c of
    pack p at ``words_ptr[p, c] + dest[p, c] + b * WPP`` (``dest``: its first plane)."""
    # The 32 tokens of a word in 32 / FIELD fields of an int32 (token j + i * FIELD in field
    # i), so that one shift and one mask move the bit of each field to its token's place.
    x = tl.reshape(u, [PP, WPP, 2, 32 // FIELD // 2, FIELD, C])
    lo, hi = tl.split(tl.permute(x, (0, 1, 3, 4, 5, 2)))  # tokens < 16 and >= 16
    if FIELD == 8:
        lo0, lo1 = tl.split(tl.permute(lo, (0, 1, 3, 4, 2)))
        hi0, hi1 = tl.split(tl.permute(hi, (0, 1, 3, 4, 2)))
        fields = lo0 | (lo1 << 8) | (hi0 << 16) | (hi1 << 24)
        ones = 0x01010101
    else:
        fields = tl.reshape(lo, [PP, WPP, FIELD, C]) | (tl.reshape(hi, [PP, WPP, FIELD, C]) << 16)
        ones = 0x00010001
    j = tl.arange(0, FIELD)[None, None, :, None]
    ptrs = words_ptr[:, None, :] + dest[:, None, :] + tl.arange(0, WPP)[None, :, None]
    for b in range(0, tl.max(tl.max(widths, 1), 0)):
        # Bit b of the 32 tokens, token j at bit j (the int32 sum wraps onto bit 31).
        word = tl.sum(((fields >> b) & ones) << j, axis=2)
        tl.store(ptrs + b * WPP, word, mask=(b < widths)[:, None, :])


@triton.jit
def _pad_packs(words_ptr, start, used, words):
    """Zeros after the ``used`` words of each pack at ``start`` up to its padded size
    ``words`` (all [PP]): a reused pool holds old words."""
    pad = used[:, None] + tl.arange(0, 4)[None, :]
    tl.store(words_ptr + start[:, None] + pad, tl.zeros_like(pad), mask=pad < words[:, None])


@triton.jit
def _nibbles(x, PP: tl.constexpr, C: tl.constexpr):
    """Bytes of two 4-bit codes of ``x: [PP, C]``, channel 2i low (bitpack.pack_nibbles)."""
    lo, hi = tl.split(tl.reshape(x, [PP, C // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _side_ptr(k_ptr, v_ptr, offset, is_v):
    """``offset`` into V's tensor where ``is_v``, else into K's."""
    return tl.where(is_v, v_ptr + offset, k_ptr + offset)


# Strides, counts and rows change as a cache grows; specializing on them (divisible by 16,
# == 1) would recompile the kernel for seconds in the middle of a generation. ``slot_ints``
# is not specialized for the layout it gives (see the kernel).
@triton.jit(do_not_specialize=[
    "sk_b", "sk_h", "sv_b", "sv_h", "heads", "n_blocks", "block_cap", "block_row0", "token_base", "k_rel", "v_rel",
    "slot_ints",
])
def _encode_kernel(
    k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    kw_ptr, ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr, vw_ptr, vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr,
    perm_ptr, counts_ptr, scratch_ptr, ints_ptr, slot_ints,
    heads, n_blocks, block_cap, block_row0, token_base, k_rel, v_rel,
    S: tl.constexpr, D: tl.constexpr, P: tl.constexpr, WPP: tl.constexpr, MIN_BITS: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr, MEDIAN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """One block of one (batch, head), the whole store stage: quantize K and V, choose the
    token order, place the block's packs after those of the blocks before it (in (batch,
    head, block) order, after the words the pools use) and write everything in place.

    Two phases, each in the layout its reductions want. By token: the ranges (token
    grouping) and the median need every channel of a token. By channel (K's channels, then
    V's, one a thread): the packs' minima, widths and bit planes reduce over tokens. The
    integers cross over through ``ints_ptr`` (this program's slot, written in token order
    with vector stores, read back by rows in either order with scalar loads: an offset of
    unknown alignment, ``slot_ints``, makes Triton give each thread one channel).

    Programs take blocks by ticket (``scratch[0]``) so that the look-back waits only on
    running programs; the last one to finish zeroes the scratch for the next launch.
    """
    PP: tl.constexpr = S // P
    C: tl.constexpr = 2 * D
    n = tl.num_programs(0)
    ticket = tl.atomic_add(scratch_ptr, 1)
    bh = ticket // n_blocks
    blk = ticket % n_blocks
    n_bh = n // n_blocks
    b = bh // heads
    h = bh % heads
    t = tl.arange(0, S)
    c = tl.arange(0, D)
    tok = blk * S + t
    # By token. The wrapper makes the strides multiples of 16: vector loads along a row.
    qv, v_step, v_lo = _load_quantize(v_ptr + tl.multiple_of(b * sv_b + h * sv_h, 16), sv_t, tok, counts_ptr + 3,
                                      token_base, bh, n_bh, v_rel, D, V_TOKEN, COMPILED)
    qk, k_step, k_lo = _load_quantize(k_ptr + tl.multiple_of(b * sk_b + h * sk_h, 16), sk_t, tok, counts_ptr + 2,
                                      token_base, bh, n_bh, k_rel, D, K_TOKEN, COMPILED)
    slot = ints_ptr + ticket * (S * C)
    tl.store(slot + t[:, None] * C + c[None, :], qk.to(ints_ptr.dtype.element_ty))
    tl.store(slot + t[:, None] * C + D + c[None, :], qv.to(ints_ptr.dtype.element_ty))
    rank = t
    if MEDIAN:
        # The stable argsort of the lower median of each token's V integers, as a rank.
        key = _lower_median(qv, S, D, V_BITS) * S + t
        rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    tl.debug_barrier()  # the slot's integers are visible to every thread
    # By channel.
    cc = tl.arange(0, C)
    is_v = cc >= D
    rows = ints_ptr + ticket * slot_ints + cc[None, :]
    cap = (1 << MIN_BITS) - 1
    bound = tl.where(is_v, V_BITS, K_BITS)
    if MEDIAN:
        # Row j of the median order is the token of rank j; kept unless it stores more words
        # than the original order (whose integers are read again then, not kept: registers).
        mins_id, widths_id, planes_id = _pack_stats(_read_rows(rows, t, C), cap, bound, S, P, C)
        q = _read_rows(rows, tl.sum(tl.where(rank[None, :] == t[:, None], t[None, :], 0), axis=1), C)
        mins, widths, planes = _pack_stats(q, cap, bound, S, P, C)
        if tl.sum(tl.sum(_padded(planes, WPP), 1), 0) > tl.sum(tl.sum(_padded(planes_id, WPP), 1), 0):
            q, mins, widths, planes = _read_rows(rows, t, C), mins_id, widths_id, planes_id
            rank = t
    else:
        q = _read_rows(rows, t, C)
        mins, widths, planes = _pack_stats(q, cap, bound, S, P, C)
    tl.store(perm_ptr + bh * n_blocks * S + blk * S + rank, tok)
    # Place the packs: K's and V's words after those of the programs before this one.
    k_planes, v_planes = tl.split(planes)
    k_words, v_words = tl.split(_padded(planes, WPP))
    last = ticket == n - 1
    k_start = _exclusive_prefix(scratch_ptr + 2, counts_ptr, ticket, last, tl.sum(k_words, 0).to(tl.int64))
    v_start = _exclusive_prefix(scratch_ptr + 3, counts_ptr + 1, ticket, last, tl.sum(v_words, 0).to(tl.int64))
    k_start += tl.cumsum(k_words, 0) - k_words
    v_start += tl.cumsum(v_words, 0) - v_words
    dest = bh * block_cap + block_row0 + blk
    pack_row = dest * PP + tl.arange(0, PP)
    tl.store(ko_ptr + pack_row, k_start.to(tl.int32))
    tl.store(vo_ptr + pack_row, v_start.to(tl.int32))
    # Scale and zero: token ranges at the tokens' packed positions, channel ranges in the row.
    if K_TOKEN:
        tl.store(ks_ptr + dest * S + rank, k_step.to(tl.float16))
        tl.store(kz_ptr + dest * S + rank, k_lo.to(tl.float16))
    else:
        tl.store(ks_ptr + dest * D + c, k_step.to(tl.float16))
        tl.store(kz_ptr + dest * D + c, k_lo.to(tl.float16))
    if V_TOKEN:
        tl.store(vs_ptr + dest * S + rank, v_step.to(tl.float16))
        tl.store(vz_ptr + dest * S + rank, v_lo.to(tl.float16))
    else:
        tl.store(vs_ptr + dest * D + c, v_step.to(tl.float16))
        tl.store(vz_ptr + dest * D + c, v_lo.to(tl.float16))
    # Width codes and minima of each pack, K's channels and V's in their own rows.
    half = tl.arange(0, D)  # a byte of two codes: K's D / 2, then V's
    byte_v = half >= D // 2
    nib = pack_row[:, None] * (D // 2) + half[None, :] - byte_v[None, :] * (D // 2)
    tl.store(_side_ptr(kwd_ptr, vwd_ptr, nib, byte_v[None, :]), _nibbles(widths, PP, C))
    if MIN_BITS == 4:
        tl.store(_side_ptr(kmn_ptr, vmn_ptr, nib, byte_v[None, :]), _nibbles(mins, PP, C))
    elif MIN_BITS == 8:
        byte = pack_row[:, None] * D + cc[None, :] - is_v[None, :] * D
        tl.store(_side_ptr(kmn_ptr, vmn_ptr, byte, is_v[None, :]), mins.to(tl.uint8))
    # Bit planes, then each pack's padding.
    start = tl.where(is_v[None, :], v_start[:, None], k_start[:, None])
    plane0 = tl.cumsum(widths, 1) - widths - is_v[None, :] * k_planes[:, None]
    u = q - tl.reshape(tl.broadcast_to(mins[:, None, :], [PP, P, C]), [S, C])
    FIELD: tl.constexpr = 8 if ints_ptr.dtype.element_ty == tl.uint8 else 16
    _store_planes(u, widths, start + plane0 * WPP, _side_ptr(kw_ptr, vw_ptr, 0, is_v[None, :]), PP, WPP, C, FIELD)
    _pad_packs(kw_ptr, k_start, k_planes * WPP, k_words)
    _pad_packs(vw_ptr, v_start, v_planes * WPP, v_words)
    if tl.atomic_add(scratch_ptr + 1, 1) == n - 1:
        # Every program is past its look-back: leave the scratch zeroed for the next launch.
        for i in range(0, 2 * n + 2, 1024):
            j = i + tl.arange(0, 1024)
            tl.store(scratch_ptr + j, tl.zeros([1024], tl.int64), mask=j < 2 * n + 2)


@triton.jit
def _pack_planes_kernel(u_ptr, widths_ptr, offsets_ptr, words_ptr, D: tl.constexpr, D_POW2: tl.constexpr,
                        WPP: tl.constexpr):
    pack = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, D_POW2)[None, :]
    in_dim = c < D
    rows = pack * (WPP * 32) + tl.arange(0, WPP * 32)
    u = tl.load(u_ptr + rows[:, None] * D + c, mask=in_dim, other=0)
    w = tl.load(widths_ptr + pack * D + c, mask=in_dim, other=0).to(tl.int32)
    start = tl.load(offsets_ptr + pack + tl.arange(0, 1))
    _store_planes(u, w, start[:, None] + (tl.cumsum(w, 1) - w) * WPP, words_ptr + tl.zeros_like(w), 1, WPP, D_POW2, 16)
    used = tl.sum(w, 1) * WPP
    _pad_packs(words_ptr, start, used, (used + 3) // 4 * 4)


def pack_planes_triton(u: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`packkv.codec.bitpack.pack_planes`, as one Triton launch."""
    n_packs, pack_size, head_dim = u.shape
    wpp = pack_size // WORD_BITS
    used = widths.long().sum(1) * wpp
    sizes = (used + PACK_ALIGN_WORDS - 1) // PACK_ALIGN_WORDS * PACK_ALIGN_WORDS
    offsets = torch.cumsum(sizes, 0) - sizes
    words = torch.empty(int(sizes.sum()) if n_packs else 0, dtype=torch.int32, device=u.device)
    if words.numel():
        _pack_planes_kernel[(n_packs,)](
            u.to(torch.int32).contiguous(), widths.contiguous(), offsets, words,
            D=head_dim, D_POW2=triton.next_power_of_2(head_dim), WPP=wpp,
        )
    return words, offsets


def launch_options(head_dim: int, block_size: int) -> dict:
    """Triton options of the encoder: a thread a channel of K or V in the by-channel phase.
    Blocks of up to 64 tokens fit 128 registers a thread, so that two programs share a
    multiprocessor (no spills at the default settings; 174 registers without the cap); a
    thread of a longer block holds more integers. benchmarks/sass_encode.py shows the code."""
    return {"num_warps": 2 * head_dim // 32, **({"maxnreg": 128} if block_size <= 64 else {})}


def pack_word_bound(head_dim: int, pack_size: int, width: int = MAX_WIDTH) -> int:
    """The most words one pack can take, whatever the values encoded: every channel
    ``width`` bits wide (15 unless the side's ``level_bits`` is known; a multiple of 4 words,
    head_dim being one of 16)."""
    return head_dim * width * (pack_size // WORD_BITS)


def fused_serves(k: torch.Tensor, config: PackKVConfig) -> bool:
    """Whether the fused kernel encodes ``k`` under ``config``: a CUDA tensor, head_dim 64
    or 128, median or no repacking, and a power-of-two block (a Triton tile's length)."""
    s = config.block_size
    return k.is_cuda and k.shape[-1] in FUSED_HEAD_DIMS and config.repack != "greedy" and s & (s - 1) == 0


def new_counts(device: torch.device | str) -> torch.Tensor:
    """A fresh ``counts`` for :func:`encode_into`: no words used, no value flagged."""
    return torch.tensor([0, 0, NO_BAD_VALUE, NO_BAD_VALUE], dtype=torch.int64, device=device)


def empty_buffers(batch: int, heads: int, n_blocks: int, head_dim: int, config: PackKVConfig, side: str,
                  device: torch.device | str) -> PackedTensor:
    """Uninitialized buffers for ``n_blocks`` blocks of K (``side="k"``) or V, no words yet."""
    grouping, rel = (config.k_grouping, config.k_rel) if side == "k" else (config.v_grouping, config.v_rel)
    s, p = config.block_size, config.pack_size
    n_packs = n_blocks * (s // p)
    group = s if grouping == "token" else head_dim

    def new(*shape, dtype):
        return torch.empty(batch, heads, *shape, dtype=dtype, device=device)

    return PackedTensor(
        words=torch.empty(0, dtype=torch.int32, device=device), offsets=new(n_packs, dtype=torch.int32),
        widths=new(n_packs, head_dim // 2, dtype=torch.uint8),
        mins=new(n_packs, head_dim * config.min_bits // 8, dtype=torch.uint8),
        scale=new(n_blocks, group, dtype=torch.float16), zero=new(n_blocks, group, dtype=torch.float16),
        grouping=grouping, block_size=s, pack_size=p, min_bits=config.min_bits, width_bound=level_bits(rel),
    )


class Scratch(NamedTuple):
    """Working memory of :func:`encode_into` launches of up to ``blocks`` blocks."""

    states: torch.Tensor  # int64 [2 + 2 * blocks], zero between launches: tickets, look-back
    ints: torch.Tensor  # uint8 or int16 [blocks, block_size, 2 * head_dim]: the integers

    @property
    def blocks(self) -> int:
        return self.ints.shape[0]


def new_scratch(blocks: int, head_dim: int, config: PackKVConfig, device: torch.device | str) -> Scratch:
    """Scratch for :func:`encode_into` launches of up to ``blocks`` blocks (batch x heads x
    blocks) of ``head_dim`` channels; every launch leaves it as it found it."""
    # The integers in bytes where every value fits in one.
    small = max(level_bits(config.k_rel), level_bits(config.v_rel)) <= 8
    return Scratch(
        states=torch.zeros(2 + 2 * blocks, dtype=torch.int64, device=device),
        ints=torch.empty(blocks, config.block_size, 2 * head_dim, dtype=torch.uint8 if small else torch.int16,
                         device=device),
    )


def encode_into(
    k: torch.Tensor, v: torch.Tensor, config: PackKVConfig, k_dest: PackedTensor, v_dest: PackedTensor,
    block_row0: int, counts: torch.Tensor, token_base: int, scratch: Scratch,
) -> torch.Tensor:
    """Encode the blocks of ``k`` and ``v`` into buffers with one launch (no device sync).

    Args:
        k, v: ``[batch, heads, n_blocks * block_size, head_dim]``, checked (bar their values)
            by the caller; head_dim 64 or 128.
        k_dest, v_dest: buffers ``[batch, heads, capacity, ...]`` with the same pack and
            block capacity; this call's blocks go to block rows ``[block_row0, block_row0 +
            n_blocks)`` (scale, zero) and the pack rows of those blocks (offsets, widths,
            mins), their words after the ``counts[0]`` (K) / ``counts[1]`` (V) words the
            pools use. The pools must hold ``pack_word_bound`` words a new pack more.
        counts: int64 ``[4]`` on k's device. ``counts[0]`` and ``counts[1]`` advance past
            the new packs' words. ``counts[2]`` (K) and ``counts[3]`` (V) are lowered to the
            key ``((token_base + t) * batch * heads + b * heads + h) * head_dim + c`` of the
            first value at (b, h, t, c) that is not finite or beyond +-65504
            (``NO_BAD_VALUE`` while none).
        token_base: added to the token index in those keys.
        scratch: from :func:`new_scratch` for at least ``batch * heads * n_blocks`` blocks
            (no other launch using it in flight on another stream).

    Returns:
        The permutation, int64 ``[batch, heads, n_blocks * block_size]`` (as ``compress_kv``
        returns it).
    """
    b, h, n, d = k.shape
    s, p = config.block_size, config.pack_size
    nb = n // s
    # The kernel reads each row's channels as consecutive elements, at strides of 16.
    k, v = (t if t.stride(-1) == 1 and all(x % 16 == 0 for x in t.stride()[:3]) else t.contiguous() for t in (k, v))
    perm = torch.empty(b, h, n, dtype=torch.int64, device=k.device)
    _encode_kernel[(b * h * nb,)](
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_dest.words, k_dest.offsets, k_dest.widths, k_dest.mins, k_dest.scale, k_dest.zero,
        v_dest.words, v_dest.offsets, v_dest.widths, v_dest.mins, v_dest.scale, v_dest.zero,
        perm, counts, scratch.states, scratch.ints, scratch.ints.stride(0),
        h, nb, k_dest.scale.shape[2], block_row0, token_base, config.k_rel, config.v_rel,
        S=s, D=d, P=p, WPP=p // WORD_BITS, MIN_BITS=config.min_bits,
        K_BITS=level_bits(config.k_rel), V_BITS=level_bits(config.v_rel),
        K_TOKEN=config.k_grouping == "token", V_TOKEN=config.v_grouping == "token", MEDIAN=config.repack == "median",
        COMPILED=use_asm(k.device), **launch_options(d, s),
    )
    return perm


def encode_kv_fused(k: torch.Tensor, v: torch.Tensor, config: PackKVConfig) -> tuple[PackedKV, torch.Tensor]:
    """The fused path of :func:`encode_kv` (CUDA, or Triton's interpreter in tests).

    Needs what :func:`fused_serves` asks but the device; ``k`` and ``v`` checked bar their
    values, which the kernel checks (a rejected value raises check_kv's error). One launch
    into pools of the largest size the blocks can take, one device sync (the word totals
    and the value check), then the words copied to pools of their exact size. Returns the
    packed layer and the permutation, as ``compress_kv(..., return_permutation=True)``.
    """
    b, h, n, d = k.shape
    s = config.block_size
    nb = n // s
    full = nb * s
    dev = k.device
    packs = b * h * nb * (s // config.pack_size)
    dests = [
        replace(buf, words=torch.empty(packs * pack_word_bound(d, config.pack_size, buf.width_bound), dtype=torch.int32,
                                       device=dev))
        for buf in (empty_buffers(b, h, nb, d, config, side, dev) for side in ("k", "v"))
    ]
    counts = new_counts(dev)
    perm = torch.empty(b, h, 0, dtype=torch.int64, device=dev)
    if nb:
        scratch = new_scratch(b * h * nb, d, config, dev)
        perm = encode_into(k[:, :, :full], v[:, :, :full], config, *dests, 0, counts, 0, scratch)
    # The kernel checked the blocks' values; a tail's are checked here, in the same sync.
    if full < n:
        counts = torch.cat([counts, torch.stack([(~(t[:, :, full:].abs() <= FP16_MAX)).any() for t in (k, v)]).long()])
    k_words, v_words, k_bad, v_bad, *tail = counts.tolist()
    if min(k_bad, v_bad) != NO_BAD_VALUE or any(tail):
        check_kv(k, v)  # raises, naming the first rejected value
    dests = [replace(dest, words=dest.words[:n_words].clone()) for dest, n_words in zip(dests, (k_words, v_words))]
    # copy=True: an fp16 input's tail slice would otherwise be the caller's memory.
    k_tail, v_tail = (t[:, :, full:].to(torch.float16, copy=True).contiguous() for t in (k, v))
    return PackedKV(k=dests[0], v=dests[1], k_tail=k_tail, v_tail=v_tail, config=config, dtype=k.dtype), perm


def encode_kv(
    k: torch.Tensor, v: torch.Tensor, config: PackKVConfig | None = None, *, return_permutation: bool = False
) -> PackedKV | tuple[PackedKV, torch.Tensor]:
    """:func:`packkv.compress_kv` on the GPU; the output is identical either way.

    Where :func:`fused_serves` says so, one fused kernel does the whole store stage, with one
    device sync. Greedy repacking (sequential, better ratio) and other head dims or
    block sizes take the reference codec with the Triton bit-plane packer on CUDA. On CPU
    this is the reference codec.
    """
    config = config or PackKVConfig()
    check_kv(k, v, values=False)
    if fused_serves(k, config):
        packed, perm = encode_kv_fused(k, v, config)
        return (packed, perm) if return_permutation else packed
    packer = pack_planes_triton if k.is_cuda else None
    return compress_kv(k, v, config, return_permutation=return_permutation, packer=packer)
