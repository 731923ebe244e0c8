"""GPU store stage: the reference codec's output from two fused Triton kernels.

``_encode_blocks_kernel`` (one program a (batch, head, block)) quantizes K and V, picks
the median order (or keeps the original one where that packs smaller, as the reference
does), and writes the integers in packed order with per-pack minima, widths and word
counts; a prefix sum gives each pack's offset; ``_pack_planes_kernel`` (one program a
pack) writes the bit planes. Every tensor is bit-identical to :func:`packkv.compress_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec import check_kv, compress_kv
from ..codec.bitpack import PACK_ALIGN_WORDS, WORD_BITS, pack_mins, pack_nibbles
from ..codec.format import PackedKV, PackedTensor
from ..config import PackKVConfig


@triton.jit
def _round_up_fp16(x):
    """The smallest fp16 >= x (x >= 0, fp32), capped at 65504: as quantize.round_up_fp16."""
    y = x.to(tl.float16)
    up = (y.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    y = tl.where(y.to(tl.float32) < x, up, y)
    return tl.minimum(y.to(tl.float32), 65504.0)


@triton.jit
def _quantize_tile(x, rel, TOKEN: tl.constexpr):
    """Quantize one block ``x: [S, D]`` fp32 as quantize.quantize_blocks does, bit for bit."""
    AXIS: tl.constexpr = 1 if TOKEN else 0
    lo = tl.min(x, axis=AXIS)
    hi = tl.max(x, axis=AXIS)
    step = _round_up_fp16(rel * (hi - lo))
    step = tl.where(step > 0, step, 1.0)
    if TOKEN:
        y = tl.math.div_rn(x - lo[:, None], step[:, None])
    else:
        y = tl.math.div_rn(x - lo[None, :], step[None, :])
    # Round half to even, like torch.round (y >= 0, so truncation is floor).
    f = y.to(tl.int32)
    d = y - f.to(tl.float32)
    q = f + ((d > 0.5) | ((d == 0.5) & ((f & 1) == 1))).to(tl.int32)
    return q, step, lo


@triton.jit
def _pack_stats(q, pack_of, cap, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """Per-pack minima and widths of ``q: [S, D]`` whose token t goes to pack pack_of[t]."""
    p = tl.arange(0, S // P)
    mins = tl.zeros([S // P, D], tl.int32)
    maxs = tl.zeros([S // P, D], tl.int32)
    for i in tl.static_range(S // P):
        member = (pack_of == i)[:, None]
        lo = tl.min(tl.where(member, q, 1 << 30), axis=0)
        hi = tl.max(tl.where(member, q, -1), axis=0)
        mins = tl.where((p == i)[:, None], tl.minimum(lo, cap)[None, :], mins)
        maxs = tl.where((p == i)[:, None], hi[None, :], maxs)
    u = maxs - mins
    # bit_length(u) for 0 <= u < 2**15, without a loop over bits.
    widths = tl.zeros([S // P, D], tl.int32)
    for b in tl.static_range(15):
        widths += (u >> b) > 0
    return mins, widths


@triton.jit
def _lower_median(q, S: tl.constexpr, D: tl.constexpr):
    """torch.median of each row of ``q: [S, D]`` (0 <= q < 2**14): a bisection on the
    value, counting the elements at most mid (cheaper than a sort, here and in the
    interpreter)."""
    need = (D - 1) // 2 + 1
    lo = tl.zeros([S], tl.int32)
    hi = tl.full([S], (1 << 14) - 1, tl.int32)
    for _ in tl.static_range(14):
        mid = (lo + hi) // 2
        enough = tl.sum((q <= mid[:, None]).to(tl.int32), axis=1) >= need
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return lo


@triton.jit
def _store_range(scale_ptr, zero_ptr, index, step, lo):
    tl.store(scale_ptr + index, step.to(tl.float16))
    tl.store(zero_ptr + index, lo.to(tl.float16))


@triton.jit
def _words(widths, WPP: tl.constexpr):
    """Words a pack stores: its planes, padded to a multiple of 4 (as bitpack pads)."""
    used = tl.sum(widths, axis=1) * WPP
    return (used + 3) // 4 * 4


# Strides and counts change as a cache grows; specializing on them (divisible by 16, == 1)
# would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=["sk_b", "sk_h", "sv_b", "sv_h", "heads", "n_blocks", "k_rel", "v_rel", "cap"])
def _encode_blocks_kernel(
    k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    qk_ptr, qv_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    k_mins_ptr, k_widths_ptr, k_sizes_ptr, v_mins_ptr, v_widths_ptr, v_sizes_ptr, perm_ptr,
    heads, n_blocks, k_rel, v_rel, cap,
    S: tl.constexpr, D: tl.constexpr, P: tl.constexpr, WPP: tl.constexpr,
    K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr, MEDIAN: tl.constexpr,
):
    """One (batch, head, block): quantize K and V, choose the token order, write the
    integers in packed order plus per-pack minima, widths and word counts."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    t = tl.arange(0, S)
    c = tl.arange(0, D)
    tok = blk * S + t
    xk = tl.load(k_ptr + b * sk_b + h * sk_h + tok[:, None] * sk_t + c[None, :])
    xv = tl.load(v_ptr + b * sv_b + h * sv_h + tok[:, None] * sv_t + c[None, :])
    qk, k_step, k_lo = _quantize_tile(xk.to(tl.float16).to(tl.float32), k_rel, K_TOKEN)
    qv, v_step, v_lo = _quantize_tile(xv.to(tl.float16).to(tl.float32), v_rel, V_TOKEN)
    rank = t
    if MEDIAN:
        # Stable argsort of the lower median of each token's V integers, as a rank.
        med = _lower_median(qv, S, D)
        key = med * S + t
        by_median = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
        k_mins, k_widths = _pack_stats(qk, by_median // P, cap, S, P, D)
        v_mins, v_widths = _pack_stats(qv, by_median // P, cap, S, P, D)
        k_id_mins, k_id_widths = _pack_stats(qk, t // P, cap, S, P, D)
        v_id_mins, v_id_widths = _pack_stats(qv, t // P, cap, S, P, D)
        cost = tl.sum(_words(k_widths, WPP), 0) + tl.sum(_words(v_widths, WPP), 0)
        cost_id = tl.sum(_words(k_id_widths, WPP), 0) + tl.sum(_words(v_id_widths, WPP), 0)
        # Keep the original order where the median order would store more words.
        worse = cost > cost_id
        rank = tl.where(worse, t, by_median)
        k_mins = tl.where(worse, k_id_mins, k_mins)
        k_widths = tl.where(worse, k_id_widths, k_widths)
        v_mins = tl.where(worse, v_id_mins, v_mins)
        v_widths = tl.where(worse, v_id_widths, v_widths)
    else:
        k_mins, k_widths = _pack_stats(qk, t // P, cap, S, P, D)
        v_mins, v_widths = _pack_stats(qv, t // P, cap, S, P, D)
    row = (bh * n_blocks + blk) * S + rank  # packed position of each token
    tl.store(qk_ptr + row[:, None] * D + c[None, :], qk.to(tl.int16))
    tl.store(qv_ptr + row[:, None] * D + c[None, :], qv.to(tl.int16))
    tl.store(perm_ptr + row, tok)
    # Token ranges go to the tokens' packed positions, channel ranges to the block's row.
    block_row = (bh * n_blocks + blk) * D + c
    if K_TOKEN:
        _store_range(k_scale_ptr, k_zero_ptr, row, k_step, k_lo)
    else:
        _store_range(k_scale_ptr, k_zero_ptr, block_row, k_step, k_lo)
    if V_TOKEN:
        _store_range(v_scale_ptr, v_zero_ptr, row, v_step, v_lo)
    else:
        _store_range(v_scale_ptr, v_zero_ptr, block_row, v_step, v_lo)
    pk = (bh * n_blocks + blk) * (S // P) + tl.arange(0, S // P)
    stat = pk[:, None] * D + c[None, :]
    tl.store(k_mins_ptr + stat, k_mins.to(tl.uint8))
    tl.store(k_widths_ptr + stat, k_widths.to(tl.uint8))
    tl.store(v_mins_ptr + stat, v_mins.to(tl.uint8))
    tl.store(v_widths_ptr + stat, v_widths.to(tl.uint8))
    tl.store(k_sizes_ptr + pk, _words(k_widths, WPP))
    tl.store(v_sizes_ptr + pk, _words(v_widths, WPP))


@triton.jit
def _pack_planes_kernel(
    u_ptr, mins_ptr, widths_ptr, offsets_ptr, words_ptr,
    D: tl.constexpr, D_POW2: tl.constexpr, WPP: tl.constexpr, HAS_MINS: tl.constexpr,
):
    pack = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, D_POW2)
    in_dim = c < D
    w = tl.load(widths_ptr + pack * D + c, mask=in_dim, other=0).to(tl.int32)
    m = tl.zeros([D_POW2], tl.int32)
    if HAS_MINS:
        m = tl.load(mins_ptr + pack * D + c, mask=in_dim, other=0).to(tl.int32)
    plane0 = tl.cumsum(w, 0) - w  # planes stored before channel c in this pack
    max_width = tl.max(w, 0)
    start = tl.load(offsets_ptr + pack)
    j = tl.arange(0, 32)
    for i in tl.static_range(WPP):
        rows = pack * (WPP * 32) + i * 32 + j
        u = tl.load(u_ptr + rows[:, None] * D + c[None, :], mask=in_dim[None, :], other=0).to(tl.int32) - m[None, :]
        for b in range(0, max_width):
            # Bit b of the 32 tokens, token j at bit j; int32 addition wraps onto bit 31.
            word = tl.sum(((u >> b) & 1) << j[:, None], axis=0)
            tl.store(words_ptr + start + (plane0 + b) * WPP + i, word, mask=in_dim & (b < w))


def _launch_pack(
    q: torch.Tensor, mins: torch.Tensor | None, widths: torch.Tensor, sizes: torch.Tensor, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``q: [n_packs, pack_size, head_dim]`` (minus ``mins``) into planes; returns words, offsets.

    ``total`` (the sum of ``sizes``) may be given to save a device sync.
    """
    n_packs, pack_size, head_dim = q.shape
    offsets = torch.cumsum(sizes, 0) - sizes
    if total is None:
        total = int(sizes.sum()) if n_packs else 0
    words = torch.zeros(total, dtype=torch.int32, device=q.device)
    if total:
        _pack_planes_kernel[(n_packs,)](
            q.contiguous(), widths if mins is None else mins, widths.contiguous(), offsets, words,
            D=head_dim, D_POW2=triton.next_power_of_2(head_dim), WPP=pack_size // WORD_BITS, HAS_MINS=mins is not None,
        )
    return words, offsets


def pack_planes_triton(u: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`packkv.codec.bitpack.pack_planes`, as one Triton launch."""
    wpp = u.shape[1] // WORD_BITS
    used = widths.long().sum(1) * wpp
    sizes = (used + PACK_ALIGN_WORDS - 1) // PACK_ALIGN_WORDS * PACK_ALIGN_WORDS
    return _launch_pack(u.to(torch.int32), None, widths, sizes)


FUSED_HEAD_DIMS = (64, 128)


def encode_kv_fused(k: torch.Tensor, v: torch.Tensor, config: PackKVConfig) -> tuple[PackedKV, torch.Tensor]:
    """The fused path of :func:`encode_kv` (CUDA, or Triton's interpreter in tests).

    Needs head_dim 64 or 128 and ``repack`` "median" or "none"; inputs already checked.
    Returns the packed layer and the permutation, as ``compress_kv(..., return_permutation=True)``.
    """
    b, h, n, d = k.shape
    s, p = config.block_size, config.pack_size
    nb = n // s
    n_packs = nb * (s // p)
    dev = k.device
    ints = [torch.empty(b * h * nb * s, d, dtype=torch.int16, device=dev) for _ in range(2)]
    scale_shape = (b, h, nb, s if config.k_grouping == "token" else d), (b, h, nb, s if config.v_grouping == "token" else d)
    scales = [torch.empty(shape, dtype=torch.float16, device=dev) for shape in scale_shape for _ in range(2)]
    stats = [torch.empty(b * h * n_packs, d, dtype=torch.uint8, device=dev) for _ in range(4)]
    sizes = [torch.empty(b * h * n_packs, dtype=torch.int64, device=dev) for _ in range(2)]
    perm = torch.empty(b, h, nb * s, dtype=torch.int64, device=dev)
    if nb:
        _encode_blocks_kernel[(b * h, nb)](
            k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            ints[0], ints[1], *scales, stats[0], stats[1], sizes[0], stats[2], stats[3], sizes[1], perm,
            h, nb, config.k_rel, config.v_rel, (1 << config.min_bits) - 1,
            S=s, D=d, P=p, WPP=p // WORD_BITS,
            K_TOKEN=config.k_grouping == "token", V_TOKEN=config.v_grouping == "token",
            MEDIAN=config.repack == "median",
        )
    sides = []
    totals = torch.stack([size.sum() for size in sizes]).tolist()  # one sync for both
    for q, scale, zero, mins, widths, size, total, grouping in (
        (ints[0], scales[0], scales[1], stats[0], stats[1], sizes[0], totals[0], config.k_grouping),
        (ints[1], scales[2], scales[3], stats[2], stats[3], sizes[1], totals[1], config.v_grouping),
    ):
        words, offsets = _launch_pack(q.view(-1, p, d), mins, widths, size, total)
        sides.append(PackedTensor(
            words=words, offsets=offsets.to(torch.int32).view(b, h, n_packs),
            widths=pack_nibbles(widths).view(b, h, n_packs, d // 2),
            mins=pack_mins(mins, config.min_bits).view(b, h, n_packs, d * config.min_bits // 8),
            scale=scale, zero=zero, grouping=grouping, block_size=s, pack_size=p, min_bits=config.min_bits,
        ))
    full = nb * s
    packed = PackedKV(k=sides[0], v=sides[1], k_tail=k[:, :, full:].to(torch.float16).contiguous(),
                      v_tail=v[:, :, full:].to(torch.float16).contiguous(), config=config, dtype=k.dtype)
    return packed, perm


def encode_kv(
    k: torch.Tensor, v: torch.Tensor, config: PackKVConfig | None = None, *, return_permutation: bool = False
) -> PackedKV | tuple[PackedKV, torch.Tensor]:
    """:func:`packkv.compress_kv` on the GPU; the output is identical either way.

    On CUDA tensors with head_dim 64 or 128 and median or no repacking, two fused kernels
    do the whole store stage. Greedy repacking (sequential, better ratio) and other head
    dims take the reference codec with the Triton bit-plane packer. On CPU this is the
    reference codec.
    """
    config = config or PackKVConfig()
    if not k.is_cuda:
        return compress_kv(k, v, config, return_permutation=return_permutation)
    if config.repack == "greedy" or k.shape[-1] not in FUSED_HEAD_DIMS:
        return compress_kv(k, v, config, return_permutation=return_permutation, packer=pack_planes_triton)
    check_kv(k, v)
    packed, perm = encode_kv_fused(k, v, config)
    return (packed, perm) if return_permutation else packed
