"""Fused decode attention over a packed cache: scores, online softmax and ``p . V`` in one pass.

Flash-decoding: the packed sequence of each (batch, KV head) is cut into splits, one
program each, plus one program for the fp16 tail; every program keeps a running max,
sum and output for the whole GQA group and writes them; the last program of the (batch,
KV head) to finish combines them (one launch a decode step: at batch 1 the host's time
to launch bounds a step).
K and V are unpacked in registers and never reach global memory.

On CUDA, for the packed format's default layout, :class:`DecodePlan` launches the Gluon
kernel of attention_gluon.py instead (same arguments, same partials and merge contract);
this file's Triton kernel serves every other format, and the CPU under the interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver

from ..codec.format import PackedKV, PackedTensor
from . import _common
from ._common import check_attention, count_resident, programs_per_sm, tile_splits, use_asm, use_triton
from .planes import (
    fetch_meta, load_query_tile, packed_args, pow2_rows, side_pointers, split_halves, split_tiles, stage_tile, tile_tokens,
)
from .pv import v_tile_sum
from .qk import k_query, k_tile_scores
from .reference import decode_attention_reference

try:  # Gluon is experimental: a Triton without it, or with another API, keeps the Triton kernel
    from . import attention_gluon as _gluon
except Exception:  # noqa: BLE001 (any failure of the import means: not available)
    _gluon = None

LOG2E = 1.4426950408889634
COMBINE_CHUNK = 64  # splits a merge reads at a time
# Whether the decode kernel merges the splits itself (one launch a step); False launches
# the combining kernel after it (benchmarks compare the two).
FOLDED_COMBINE = True
# Whether a plan's later launches call the compiled kernels' launcher directly (_Launch);
# False goes through Triton's kernel[grid] runner (benchmarks compare the two).
DIRECT_LAUNCH = True


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One step of the running softmax (base 2) over a tile of scores ``s [16, columns]``.

    Returns the tile's weights, the new max and sum, and the factor for the old output.
    A row that has seen only masked tokens keeps max -inf and weights 0.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, axis=1), alpha


@triton.jit
def _masked(s, mask_bh, cols, valid, s_mt, HAS_MASK: tl.constexpr):
    """Scores with -inf where the token is out of range or masked out."""
    keep = valid
    if HAS_MASK:
        keep = keep & (tl.load(mask_bh + cols * s_mt, mask=valid, other=0) != 0)
    return tl.where(keep[None, :], s, float("-inf"))


# Batch/head strides and counts change as a cache grows; specializing on them (== 1,
# divisible by 16) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=['ks_ob', 'ks_oh', 'ks_wb', 'ks_wh', 'ks_mb', 'ks_mh', 'ks_sb', 'ks_sh', 'ks_zb', 'ks_zh', 'vs_ob', 'vs_oh', 'vs_wb', 'vs_wh', 'vs_mb', 'vs_mh', 'vs_sb', 'vs_sh', 'vs_zb', 'vs_zh', 's_ktb', 's_kth', 's_vtb', 's_vth', 's_mkb', 's_mkh', 's_knb', 's_knh', 's_vnb', 's_vnh', 'heads', 'n_words', 'tiles_per_split', 'n_pack_splits', 'n_split', 'tail_len', 'append', 'merge'])
def _decode_kernel(
    q_ptr, m_part, l_part, acc_part, counter_ptr, out_ptr, s_ob, s_oh, s_od,
    kw_ptr, ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr,
    ks_word, ks_ob, ks_oh, ks_op, ks_wb, ks_wh, ks_wp, ks_wc, ks_mb, ks_mh, ks_mp, ks_mc,
    ks_sb, ks_sh, ks_sn, ks_sx, ks_zb, ks_zh, ks_zn, ks_zx,
    vw_ptr, vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr,
    vs_word, vs_ob, vs_oh, vs_op, vs_wb, vs_wh, vs_wp, vs_wc, vs_mb, vs_mh, vs_mp, vs_mc,
    vs_sb, vs_sh, vs_sn, vs_sx, vs_zb, vs_zh, vs_zn, vs_zx,
    kt_ptr, s_ktb, s_kth, s_ktt, s_ktd, vt_ptr, s_vtb, s_vth, s_vtt, s_vtd,
    mask_ptr, s_mkb, s_mkh, s_mkt,
    s_qb, s_qh, s_qd,
    kn_ptr, s_knb, s_knh, s_knd, vn_ptr, s_vnb, s_vnh, s_vnd,
    heads, n_words, tiles_per_split, n_pack_splits, n_split, tail_len, append, merge, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, MIN_BITS: tl.constexpr,
    K_TOKEN_GROUPED: tl.constexpr, V_TOKEN_GROUPED: tl.constexpr, HAS_MASK: tl.constexpr,
    TW: tl.constexpr, K_WIDE: tl.constexpr, V_WIDE: tl.constexpr, ASM: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (batch * kv_heads, n_split); split ``n_pack_splits`` (if any) takes the tail.

    Writes per query head and split the running max and sum (base-2 scores) and the
    unnormalized output, fp32. Each tile of ``TW`` words: K scores (qk.k_tile_scores), the
    online softmax, then the weighted V rows (pv.v_tile_sum) in the same column order.
    With ``merge`` 1, the last program of each (batch, KV head) merges them into ``out_ptr``
    (found with ``counter_ptr``, one int32 a (batch, KV head), zero between launches).
    With ``append`` 1, the tail's last token is not yet in the tail: its program copies it
    there from ``kn_ptr`` / ``vn_ptr`` ``[batch, kv_heads, head_dim]`` first (a cache's
    decode step then needs no copy kernels of its own).
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = tl.arange(0, 16)
    chan = tl.arange(0, D)
    mask_bh = mask_ptr + b * s_mkb + h * s_mkh
    q = load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D)
    m_i = tl.full([16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, D], dtype=tl.float32)
    if split < n_pack_splits:
        WPP: tl.constexpr = PACK // 32
        ko_bh, kwd_bh, kmn_bh, ks_bh, kz_bh = side_pointers(
            ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr, b, h, ks_ob, ks_oh, ks_wb, ks_wh, ks_mb, ks_mh, ks_sb, ks_sh, ks_zb, ks_zh)
        vo_bh, vwd_bh, vmn_bh, vs_bh, vz_bh = side_pointers(
            vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr, b, h, vs_ob, vs_oh, vs_wb, vs_wh, vs_mb, vs_mh, vs_sb, vs_sh, vs_zb, vs_zh)
        a, pw, qsum = k_query(q)
        z_acc = tl.zeros([16], dtype=tl.float32)
        first, last, word_end = split_tiles(split, tiles_per_split, n_words, TW)
        # The pipelines of qk.py and pv.py side by side: tile i computes while the planes and
        # scales of tile i+1 and the metadata of tile i+2 load, for K and for V.
        kf, kwb, kmb = fetch_meta(ko_bh, kwd_bh, kmn_bh, first, word_end, ks_op, ks_wp, ks_wc, ks_mp, ks_mc, TW, WPP, D, MIN_BITS)
        vf, vwb, vmb = fetch_meta(vo_bh, vwd_bh, vmn_bh, first, word_end, vs_op, vs_wp, vs_wc, vs_mp, vs_mc, TW, WPP, D, MIN_BITS)
        kp, kw, km, kmw, k0, k1, k2, k3, k4, k5, k6, k7, ksc, kze = stage_tile(
            kw_ptr, ks_bh, kz_bh, kf, kwb, kmb, first, word_end, ks_word, ks_sn, ks_sx, ks_zn, ks_zx,
            TW, WPP, BLOCK, MIN_BITS, K_TOKEN_GROUPED)
        vp, vw, vm, vmw, v0, v1, v2, v3, v4, v5, v6, v7, vsc, vze = stage_tile(
            vw_ptr, vs_bh, vz_bh, vf, vwb, vmb, first, word_end, vs_word, vs_sn, vs_sx, vs_zn, vs_zx,
            TW, WPP, BLOCK, MIN_BITS, V_TOKEN_GROUPED)
        kf, kwb, kmb = fetch_meta(ko_bh, kwd_bh, kmn_bh, first + 1, word_end, ks_op, ks_wp, ks_wc, ks_mp, ks_mc, TW, WPP, D, MIN_BITS)
        vf, vwb, vmb = fetch_meta(vo_bh, vwd_bh, vmn_bh, first + 1, word_end, vs_op, vs_wp, vs_wc, vs_mp, vs_mc, TW, WPP, D, MIN_BITS)
        for tile in range(first, last):
            nkp, nkw, nkm, nkmw, nk0, nk1, nk2, nk3, nk4, nk5, nk6, nk7, nksc, nkze = stage_tile(
                kw_ptr, ks_bh, kz_bh, kf, kwb, kmb, tile + 1, word_end, ks_word, ks_sn, ks_sx, ks_zn, ks_zx,
                TW, WPP, BLOCK, MIN_BITS, K_TOKEN_GROUPED)
            nvp, nvw, nvm, nvmw, nv0, nv1, nv2, nv3, nv4, nv5, nv6, nv7, nvsc, nvze = stage_tile(
                vw_ptr, vs_bh, vz_bh, vf, vwb, vmb, tile + 1, word_end, vs_word, vs_sn, vs_sx, vs_zn, vs_zx,
                TW, WPP, BLOCK, MIN_BITS, V_TOKEN_GROUPED)
            kf, kwb, kmb = fetch_meta(ko_bh, kwd_bh, kmn_bh, tile + 2, word_end, ks_op, ks_wp, ks_wc, ks_mp, ks_mc,
                                      TW, WPP, D, MIN_BITS)
            vf, vwb, vmb = fetch_meta(vo_bh, vwd_bh, vmn_bh, tile + 2, word_end, vs_op, vs_wp, vs_wc, vs_mp, vs_mc,
                                      TW, WPP, D, MIN_BITS)
            s, on = k_tile_scores(q, a, pw, qsum, kp, kw, km, kmw, k0, k1, k2, k3, k4, k5, k6, k7, ksc, kze,
                                  tile, word_end, ks_word, WPP, K_TOKEN_GROUPED, K_WIDE, ASM)
            s = _masked(s * qk_scale, mask_bh, tile * TW * 32 + tile_tokens(TW * 32), on, s_mkt, HAS_MASK)
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i)
            out, z = v_tile_sum(p, vp, vw, vm, vmw, v0, v1, v2, v3, v4, v5, v6, v7, vsc, vze, vs_word,
                                WPP, V_TOKEN_GROUPED, False, V_WIDE, ASM)
            acc = acc * alpha[:, None] + out
            z_acc = z_acc * alpha + z
            kp, kw, km, kmw, ksc, kze = nkp, nkw, nkm, nkmw, nksc, nkze
            k0, k1, k2, k3, k4, k5, k6, k7 = nk0, nk1, nk2, nk3, nk4, nk5, nk6, nk7
            vp, vw, vm, vmw, vsc, vze = nvp, nvw, nvm, nvmw, nvsc, nvze
            v0, v1, v2, v3, v4, v5, v6, v7 = nv0, nv1, nv2, nv3, nv4, nv5, nv6, nv7
        acc += z_acc[:, None]
    else:
        # The fp16/bf16 tail, in its own dtype; q as two halves of that dtype (exact enough
        # for either), the weights rounded to it.
        tok = tl.arange(0, 32)
        q_pw = pow2_rows(q)
        q_hi, q_lo = split_halves(q / q_pw[:, None], kt_ptr.dtype.element_ty)
        kt_bh = kt_ptr + b * s_ktb + h * s_kth
        vt_bh = vt_ptr + b * s_vtb + h * s_vth
        if append:
            last = tail_len - 1
            tl.store(kt_bh + last * s_ktt + chan * s_ktd, tl.load(kn_ptr + b * s_knb + h * s_knh + chan * s_knd))
            tl.store(vt_bh + last * s_vtt + chan * s_vtd, tl.load(vn_ptr + b * s_vnb + h * s_vnh + chan * s_vnd))
            # The tiles below are loaded by other threads than those that stored the row.
            tl.debug_barrier()
        for start in range(0, tail_len, 32):
            valid = start + tok < tail_len
            k_t = tl.trans(tl.load(kt_bh + (start + tok)[:, None] * s_ktt + chan[None, :] * s_ktd, mask=valid[:, None], other=0.0))
            s = (tl.dot(q_hi, k_t) + tl.dot(q_lo, k_t)) * (q_pw * qk_scale)[:, None]
            s = _masked(s, mask_bh, n_words * 32 + start + tok, valid, s_mkt, HAS_MASK)
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i)
            v_tile = tl.load(vt_bh + (start + tok)[:, None] * s_vtt + chan[None, :] * s_vtd, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt_ptr.dtype.element_ty), v_tile)
    part = (b * heads * GROUP + h * GROUP + rows) * n_split + split
    keep = rows < GROUP
    tl.store(m_part + part, m_i, mask=keep)
    tl.store(l_part + part, l_i, mask=keep)
    tl.store(acc_part + part[:, None] * D + chan[None, :], acc, mask=keep[:, None])
    if merge:
        # The last program of this (batch, KV head) to finish merges its splits, so that a
        # step takes one launch: every thread's stores above come before the counter's
        # release (the barrier), and the last program's loads after its acquire.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + pid_bh, 1, sem="acq_rel")
        if done == n_split - 1:
            tl.store(counter_ptr + pid_bh, 0)  # every program has counted: ready for the next launch
            for g in range(GROUP):
                _merge_row(m_part, l_part, acc_part, out_ptr, pid_bh * GROUP + g, s_ob, s_oh, s_od, heads * GROUP,
                           n_split, CHUNK, D)


@triton.jit
def _merge_row(m_part, l_part, acc_part, out_ptr, row, s_ob, s_oh, s_od, q_heads, n_split,
               CHUNK: tl.constexpr, D: tl.constexpr):
    """Merge the ``n_split`` partial results of query row ``row`` (batch * q_heads + head) into
    its output, in one pass over ``CHUNK`` splits at a time (a running max, like the decode
    loop): the three loads of a chunk are independent, so a chunk costs one memory latency.
    The partials are read from L2 (``.cg``): other programs of the same launch may have
    written them."""
    chan = tl.arange(0, D)
    sp = tl.arange(0, CHUNK)
    m_run = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    out = tl.zeros([D], dtype=tl.float32)
    for start in range(0, n_split, CHUNK):
        valid = start + sp < n_split
        idx = row * n_split + start + sp
        m = tl.load(m_part + idx, mask=valid, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_part + idx, mask=valid, other=0.0, cache_modifier=".cg")
        part = tl.load(acc_part + idx[:, None] * D + chan[None, :], mask=valid[:, None], other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp2(m_run - m_safe)
        weight = tl.exp2(m - m_safe)
        total = total * scale + tl.sum(weight * l, axis=0)
        out = out * scale + tl.sum(part * weight[:, None], axis=0)
        m_run = m_new
    out = out / tl.where(total > 0, total, 1.0)
    b = row // q_heads
    h = row % q_heads
    tl.store(out_ptr + b * s_ob + h * s_oh + chan * s_od, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["n_split"])
def _combine_kernel(
    m_part, l_part, acc_part, out_ptr, s_ob, s_oh, s_od, q_heads, n_split,
    CHUNK: tl.constexpr, D: tl.constexpr,
):
    """Grid (batch * q_heads): merge the splits of one query head into its output row (when
    the decode kernel does not: ``FOLDED_COMBINE`` off)."""
    _merge_row(m_part, l_part, acc_part, out_ptr, tl.program_id(0), s_ob, s_oh, s_od, q_heads, n_split, CHUNK, D)


class DecodePlan:
    """A decode-attention launch prepared once and run for many query tokens.

    While a cache adds tokens only to its fp16 tail, everything a launch needs but the
    query, the tail's length, the new token and the output stays the same: the packed
    blocks, the storages of the tail and of the mask, the splits, the buffers of partial
    results and the ~100 kernel arguments. A plan derives them once; :meth:`run` allocates
    the output, sets the query, the tail length and the new token, and launches the decode
    kernel, whose last program of each (batch, KV head) merges the splits. The kernel is
    attention_gluon.py's where it serves the format (compiled CUDA, ``_common.GLUON``), else
    this file's Triton kernel; both take the same argument list.

    The first launch of a kernel goes through Triton's dispatcher, which specializes
    every argument (pointer alignment, integers equal to 1 or divisible by 16) to compile
    or find the kernel: about 20 us of host time for ~100 arguments. Later launches call
    the compiled kernel's launcher directly, with the fixed tensors as integer addresses
    (the launcher then neither calls ``data_ptr`` nor asks the driver about each of them).
    That is sound because, of the specialized arguments, only the query and the new token's
    rows can change from one run to the next (the tail length and the append flag are not
    specialized, the output is a fresh allocation like the first): rows of other strides or
    alignment go through the dispatcher again. Under Triton's interpreter every launch does.

    Args:
        q: a query like those :meth:`run` will get, fp16/bf16 ``[batch, q_heads, head_dim]``
            or ``[batch, q_heads, 1, head_dim]``; only its shape, dtype and device are kept.
        k, v: the packed blocks.
        k_tail, v_tail: ``[batch, kv_heads, capacity, head_dim]`` fp16/bf16 whose first
            ``tail_len`` tokens (:meth:`run`) are the tail: the tail itself, or the storage
            it is a view of. A capacity above 0 gives the tail a split of its own.
        sm_scale: score multiplier.
        mask: bool ``[batch, 1 or kv_heads, tokens]`` in cache order (the packed tokens, then
            the tail), covering every tail length run will get; or None.
        splits: chunks of the packed sequence per (batch, KV head); None: the heuristic.
        token_axis: whether run returns ``[batch, 1, q_heads, head_dim]`` (transformers'
            layout) rather than ``[batch, q_heads, head_dim]``; the same memory.

    Nothing is validated here: :func:`decode_attention` checks its inputs, and the cache
    checks its data when it builds a plan.
    """

    def __init__(
        self, q: torch.Tensor, k: PackedTensor, v: PackedTensor, k_tail: torch.Tensor, v_tail: torch.Tensor,
        sm_scale: float, mask: torch.Tensor | None, splits: int | None, token_axis: bool = False,
    ) -> None:
        self.k, self.v, self.k_tail, self.v_tail, self.mask, self.sm_scale = k, v, k_tail, v_tail, mask, sm_scale
        batch, q_heads, head_dim = q.shape[0], q.shape[1], q.shape[-1]
        self.q_heads, self.dtype = q_heads, q.dtype
        n_words = k.n_tokens // 32
        group = q_heads // k.heads
        if _gluon is not None and _common.GLUON and _gluon.supported(k, v, group, k_tail.dtype, q.device):
            self._kernel = _gluon._attention_kernel
            tw, per_sm, self._options, constexprs, self._kernel_key = _gluon.launch_config(
                k, v, group, mask is not None, q.dtype == torch.float16 and k_tail.dtype == torch.bfloat16)
        else:
            self._kernel = _decode_kernel
            settings = _common.launch_settings("attention", head_dim, k.block_size, "channel" in (k.grouping, v.grouping))
            tw, self._options, per_sm = settings["tile_words"], settings["options"], settings["programs_per_sm"]
            constexprs = dict(
                GROUP=group, D=head_dim, PACK=k.pack_size, BLOCK=k.block_size, MIN_BITS=k.min_bits,
                K_TOKEN_GROUPED=k.grouping == "token", V_TOKEN_GROUPED=v.grouping == "token", HAS_MASK=mask is not None,
                TW=tw, K_WIDE=k.width_bound > 8, V_WIDE=v.width_bound > 8, ASM=use_asm(q.device), CHUNK=COMBINE_CHUNK,
            )
            self._kernel_key = ("attention", tuple(constexprs.items()), tuple(self._options.items()))
        self._kernel_key += (q.device,)
        per_split, n_pack_splits = tile_splits(batch * k.heads, n_words, tw, q.device, splits,
                                               programs_per_sm(per_sm, self._kernel_key))
        n_split = n_pack_splits + (k_tail.shape[2] > 0)
        m_part = torch.empty(batch, q_heads, n_split, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(batch, q_heads, n_split, head_dim, dtype=torch.float32, device=q.device)
        per_item = _gluon.counters(n_split) if self._kernel is not _decode_kernel else 1
        counter = torch.zeros(batch * k.heads * per_item, dtype=torch.int32, device=q.device)
        self._no_rows = (_no_row(k_tail), _no_row(v_tail))
        if mask is None:
            mask_arg, mask_strides = k_tail, (0, 0, 0)  # any pointer: the kernel reads no mask
        else:
            mask_arg = mask.expand(-1, k.heads, -1).view(torch.uint8)
            mask_strides = mask_arg.stride()
        # Every argument in the kernel's order, constexprs too: the list the dispatcher hands
        # to the compiled kernel. run() sets those in _RUN_SETS (the output: contiguous).
        self._decode_args = _in_order(
            self._kernel, q, m_part, l_part, acc_part, counter, None, q_heads * head_dim, head_dim, 1,
            *packed_args(k), *packed_args(v),
            k_tail, *k_tail.stride(), v_tail, *v_tail.stride(), mask_arg, *mask_strides, *_query_strides(q),
            *self._no_rows[0], *self._no_rows[1],
            k.heads, n_words, per_split, n_pack_splits, n_split, 0, 0, 1, sm_scale * LOG2E, **constexprs,
        )
        self._out_shape = (batch, 1, q_heads, head_dim) if token_axis else (batch, q_heads, head_dim)
        # run() sets the output; it is contiguous.
        self._combine_args = _in_order(
            _combine_kernel, m_part, l_part, acc_part, None, q_heads * head_dim, head_dim, 1, q_heads, n_split,
            CHUNK=COMBINE_CHUNK, D=head_dim,
        )
        # Three dimensions: a compiled kernel's launcher reads grid[2] (the dispatcher pads).
        self._grids = ((batch * k.heads, n_split, 1), (batch * q_heads, 1, 1))
        self._device = q.device.index
        # The compiled kernels' launches (_Launch), and the layout of the query and new rows
        # the decode kernel was specialized for.
        self._launch: _Launch | None = None
        self._combine: _Launch | None = None
        self._layout: tuple | None = None

    def run(
        self, q: torch.Tensor, tail_len: int, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of ``q`` (the plan's shape and dtype) over the packed blocks and the
        first ``tail_len`` tail tokens: ``[batch, q_heads, head_dim]`` in q's dtype (with
        ``token_axis``, ``[batch, 1, q_heads, head_dim]``).

        ``k_new`` / ``v_new``: ``[batch, kv_heads, 1, head_dim]`` in the tail's dtype, the
        token at ``tail_len - 1``, which the launch writes into the tail before attending
        to it; None when the tail holds it already.
        """
        # A decode step runs this once a layer: it is written for few Python operations.
        args = self._decode_args
        args[_Q] = q
        args[_S_QB], args[_S_QH], args[_S_QD] = q_strides = _query_strides(q)
        args[_TAIL_LEN] = tail_len
        if k_new is None:
            args[_KN : _KN + 4], args[_VN : _VN + 4] = self._no_rows
            args[_APPEND] = 0
            layout = q_strides, q.data_ptr() % 16
        else:
            args[_KN : _KN + 4] = k_new, k_new.stride(0), k_new.stride(1), k_new.stride(3)
            args[_VN : _VN + 4] = v_new, v_new.stride(0), v_new.stride(1), v_new.stride(3)
            args[_APPEND] = 1
            layout = (q_strides, q.data_ptr() % 16, k_new.stride(3), k_new.data_ptr() % 16, v_new.stride(3),
                      v_new.data_ptr() % 16)
        folded = FOLDED_COMBINE
        args[_MERGE] = int(folded)
        out = args[_OUT_D] = torch.empty(self._out_shape, dtype=q.dtype, device=q.device)
        launch = self._launch
        if launch is not None and layout == self._layout:
            launch(args)
        else:
            compiled = self._kernel[self._grids[0]](*args, **self._options)
            if isinstance(compiled, CompiledKernel):
                self._launch, self._layout = _Launch(compiled, self._grids[0], args, _RUN_SETS, self._device), layout
                count_resident(self._kernel_key, compiled, q.device)
        if not folded:
            combine_args = self._combine_args
            combine_args[_OUT] = out
            if self._combine is not None:
                self._combine(combine_args)
            else:
                compiled = _combine_kernel[self._grids[1]](*combine_args)
                if isinstance(compiled, CompiledKernel):
                    self._combine = _Launch(compiled, self._grids[1], combine_args, (_OUT,), self._device)
        return out


class _Launch:
    """A compiled kernel's launch, its fixed tensor arguments as integer addresses.

    ``args`` is the full argument list the dispatcher took; at each call, the positions in
    ``varying`` come from the list given, every other argument from ``args`` as it was
    then, tensors as their addresses (the plan keeps them alive). The launcher is the one
    the compiled kernel's own ``kernel[grid](...)`` calls, given no launch hooks and no
    metadata for them; while a launch hook is set (Triton's profilers), with
    ``DIRECT_LAUNCH`` off, or on a Triton whose compiled kernels lack that launcher, the
    launch goes through ``kernel[grid](...)``.
    """

    def __init__(self, compiled: CompiledKernel, grid: tuple[int, int, int], args: list, varying: tuple[int, ...],
                 device: int) -> None:
        self.compiled = compiled
        self.runner = compiled[grid]  # also loads the kernel's module (the handles below)
        launcher, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
        self.direct = launcher is not None and function is not None and hasattr(compiled, "packed_metadata")
        # The launcher's arguments: grid, stream (set at each call), function, metadata, the
        # launch metadata and two hooks (none), then the kernel's.
        self.head = [*grid, 0, function, getattr(compiled, "packed_metadata", None), None, None, None]
        self.fixed = self.head + [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        self.launcher, self.varying = launcher, tuple(len(self.head) + i for i in varying)
        self.stream = driver.active.get_current_stream
        self.device = device

    def __call__(self, args: list) -> None:
        if not (self.direct and DIRECT_LAUNCH) or _launch_hooks():
            self.runner(*args, stream=self.stream(self.device))
            return
        call = self.fixed.copy()
        call[3] = self.stream(self.device)
        offset = len(self.head)
        for i in self.varying:
            call[i] = args[i - offset]
        self.launcher(*call)


def _launch_hooks() -> bool:
    """Whether a launch hook is set. Triton 3.6+ keeps them as (usually empty) chains,
    which its own launch calls, with a metadata dict built for them, at every launch."""
    runtime = knobs.runtime
    return any(hook is not None and getattr(hook, "calls", True) for hook in (runtime.launch_enter_hook,
                                                                              runtime.launch_exit_hook))


def _no_row(tail: torch.Tensor) -> tuple:
    """A new token's row arguments for a launch that appends nothing (any pointer: none is read)."""
    return tail, 0, 0, 1


def _query_strides(q: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and channel strides of a query ``[batch, q_heads, (1,) head_dim]``."""
    return q.stride(0), q.stride(1), q.stride(-1)


def _in_order(kernel, *args, **constexprs) -> list:
    """The arguments of a launch of ``kernel`` as one list in its parameters' order: the
    positional ones first, as a launch takes them, then the constexprs by name."""
    names = kernel.arg_names
    if len(args) + len(constexprs) != len(names):
        raise TypeError(f"{kernel.fn.__name__} takes {len(names)} arguments, got {len(args) + len(constexprs)}")
    return [*args, *(constexprs[name] for name in names[len(args):])]


_Q, _S_QB, _S_QH, _S_QD, _TAIL_LEN, _APPEND, _MERGE, _KN, _VN, _OUT_D = map(
    _decode_kernel.arg_names.index,
    ("q_ptr", "s_qb", "s_qh", "s_qd", "tail_len", "append", "merge", "kn_ptr", "vn_ptr", "out_ptr"))
_OUT = _combine_kernel.arg_names.index("out_ptr")
# The decode kernel's arguments that DecodePlan.run sets.
_RUN_SETS = (_Q, _S_QB, _S_QH, _S_QD, _TAIL_LEN, _APPEND, _MERGE, _OUT_D, *range(_KN, _KN + 4), *range(_VN, _VN + 4))


def decode_attention_triton(
    q: torch.Tensor, kv: PackedKV, sm_scale: float, mask: torch.Tensor | None, splits: int | None
) -> torch.Tensor:
    """:func:`decode_attention` by a kernel (inputs already validated): one DecodePlan's launch."""
    return DecodePlan(q, kv.k, kv.v, kv.k_tail, kv.v_tail, sm_scale, mask, splits).run(q, kv.k_tail.shape[2])


def decode_attention(
    q: torch.Tensor,
    kv: PackedKV,
    sm_scale: float | None = None,
    mask: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token over a packed layer (packed blocks, then the fp16 tail).

    Args:
        q: ``[batch, q_heads, head_dim]`` fp16/bf16, head_dim 64 or 128; q_heads a multiple
            of the cache's KV heads (query head h reads KV head ``h // group``).
        kv: the packed layer.
        sm_scale: score multiplier, ``1 / sqrt(head_dim)`` when None.
        mask: optional bool ``[batch, 1 or kv_heads, kv.n_tokens]``, True where a token is
            attended, in packed token order (the tail after the blocks).
        splits: chunks of the packed sequence (whole tiles of packs) per (batch, KV head); None
            picks one wave: as many programs as the GPU holds at once.

    Returns:
        ``[batch, q_heads, head_dim]`` in q's dtype; zeros for a row that attends nothing.
        On CUDA the Gluon kernel (attention_gluon.py) for the default format, the Triton
        kernel for the others (and on the CPU under ``TRITON_INTERPRET=1``); else
        :func:`decode_attention_reference`.
    """
    check_attention(q, kv, mask)
    if kv.n_tokens == 0:
        raise ValueError("kv holds no tokens")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not use_triton(q.device):
        return decode_attention_reference(q, kv, scale, mask)
    return decode_attention_triton(q, kv, scale, mask, splits)
