"""PackedStore: one layer's packed K and V, growing block by block without rewriting.

A store keeps, for K and for V, the tensors of a :class:`PackedTensor` in buffers with
spare capacity: the per-pack metadata (``offsets``, ``widths``, ``mins``) and the per-block
``scale`` / ``zero`` along their pack or block dimension, and the bit-plane words in one
flat pool. New packs' words go after the pool's used part (the format lets offsets point
anywhere in the pool). A full buffer is reallocated to hold what it must plus room for the
next blocks, and at least ``GROWTH`` times what it held: an append of a few blocks (decode)
leaves at most 1/32 spare, an append larger than that (a prefill) leaves only the room, and
a token's cost is amortized O(1) either way. Nothing already stored is touched otherwise.

Appending without a device sync. How many words a block takes depends on its values, so
on the GPU (the fused encoder, :func:`packkv.kernels.encode.fused_serves`) the pool's used
length lives on the device: the encoder places the new packs after it and advances it. The
host keeps an upper bound instead: the length it last read back, plus the most words every
later append can take (a pack never takes more than
:func:`~packkv.kernels.encode.pack_word_bound`, whatever its values). While that bound fits
the pool, an append is one kernel launch and an asynchronous copy of the length to pinned
memory, which has normally landed by the next append. When it does not fit, the append
waits for the exact length (one wait, for that copy); if a single block still does not fit,
the pool grows to hold one at its largest; appends of several blocks (a prefill) are then
encoded apart and their words copied in (one more sync). Growing leaves room for two blocks
at their largest, so that the next append syncs nothing.

Values the codec rejects (NaN, Inf, beyond +-65504) are found by the encoder kernel; the
store reports them when it next reads the length back: the next :meth:`append`, or the
first access to ``k``, ``v``, ``nbytes`` (which wait for it). It then drops the blocks from
the first bad one on and raises the ``ValueError``: rejected values are never served. On
the CPU (and for the reference codec, and a prefill encoded apart) an append raises at
once, before storing anything.

``k`` and ``v`` are :class:`PackedTensor` views of the used part: no copy, so their
metadata tensors are not contiguous (they are slices of the capacity along dim 2); the word
pool's used part is contiguous. They need the exact used length, so they wait for the last
append's read-back (already landed when the host has synced since, as
``transformers``' ``generate`` does every step).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .codec import PackedKV, PackedTensor, check_kv
from .config import PackKVConfig
from .kernels.encode import (
    NO_BAD_VALUE, empty_buffers, encode_into, encode_kv, encode_kv_fused, fused_serves, new_counts, new_scratch,
    pack_word_bound,
)

# Why 1/32: the spare capacity is at most 1/32 of the used bytes, because real K and V at
# the default setting take ~24% of their fp16 bytes (SmolLM2, docs/benchmarks.md) and the
# target is a quarter: 1/16 measured 1.066x allocated / stored at 32K (bench_generate), 1/4 up to 1.25x.
# A word is still copied O(1) times: at most 1 / (GROWTH - 1) = 32 copies of the final
# allocation over a store's life: for a 64K-token batch-8 Llama-8B-shaped layer (~280 MB a
# pool) about 10 ms on an H100 at its ~2.4 TB/s copy rate (an estimate, not measured),
# against minutes of decoding.
GROWTH = 1.03125
# Metadata grows by at least this many blocks: a small store does not reallocate its
# metadata at every block (a block's metadata is ~0.5 KB a head).
MIN_GROWTH_BLOCKS = 16
# A buffer that grows keeps room for this many more blocks (words at their largest), so
# that the appends after a prefill or a growth need no device sync.
ROOM_BLOCKS = 2
# Offsets are int32 word indices (docs/format.md).
MAX_WORDS = 2**31 - 1


def _grow_rows(t: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """``t [batch, heads, capacity, ...]`` reallocated with ``rows`` rows, ``used`` of them kept."""
    new = t.new_empty(t.shape[0], t.shape[1], rows, *t.shape[3:])
    new[:, :, :used] = t[:, :, :used]
    return new


class PackedStore:
    """The packed K and V of one layer, appended to block by block.

    Args:
        config: codec settings (``PackKVConfig()`` when None).
        initial_blocks: the fewest blocks of metadata capacity a store allocates.

    The batch size, number of KV heads, head_dim and device are fixed by the first
    :meth:`append`. Tokens are held in packed order: inside each block the order of
    the permutation that :meth:`append` returns.
    """

    def __init__(self, config: PackKVConfig | None = None, *, initial_blocks: int = 4) -> None:
        if not isinstance(initial_blocks, int) or initial_blocks < 1:
            raise ValueError(f"initial_blocks must be a positive int, got {initial_blocks!r}")
        self.config = config or PackKVConfig()
        self.initial_blocks = initial_blocks
        self._n_blocks = 0
        self._reallocations = 0
        # K's and V's buffers at capacity (None until the first append).
        self._bufs: list[PackedTensor] | None = None
        # int64 [4] on the device: words used in K's and V's pools, then the bad-value flags
        # (see encode_into); read back into _host (pinned on CUDA) after each change.
        self._counts: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._in_flight = False  # a read-back not yet folded into _used
        # Words used in each pool at the last read-back (an upper bound after a truncation),
        # and the most words the appends since then can have added to each.
        self._used = [0, 0]
        self._pending = [0, 0]
        self._views: tuple[PackedTensor, PackedTensor] | None = None
        self._scratch = None  # the fused encoder's working memory, kept between appends

    # -- appending ---------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Compress whole blocks and store them after the ones already held.

        Args:
            k, v: ``[batch, kv_heads, n * block_size, head_dim]`` float16/bfloat16/float32,
                K after RoPE; n >= 1. Same batch, heads, head_dim and device as earlier
                appends.

        Returns:
            int64 ``[batch, kv_heads, n * block_size]``: packed token j of this append is
            token ``perm[..., j]`` of ``k`` / ``v`` (a permutation inside each block).
        """
        s = self.config.block_size
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"k must be a tensor [batch, kv_heads, tokens, head_dim], got {getattr(k, 'shape', k)!r}")
        if k.shape[2] == 0 or k.shape[2] % s:
            raise ValueError(f"append takes whole blocks of {s} tokens, got {k.shape[2]} tokens")
        if self._bufs is not None:
            expect = (self.batch, self.heads, self.head_dim)
            got = (k.shape[0], k.shape[1], k.shape[3])
            if got != expect:
                raise ValueError(f"append got (batch, heads, head_dim) = {got}, the store holds {expect}")
            if k.device != self.device:
                raise ValueError(f"append got k on {k.device}, the store is on {self.device}")
        check_kv(k, v, values=False)
        if fused_serves(k, self.config):
            return self._append_fused(k, v)
        # The reference codec (on CUDA with the Triton packer) checks the values and syncs.
        packed, perm = encode_kv(k, v, self.config, return_permutation=True)
        self._append_packed(packed)
        return perm

    def _prepare(self, batch: int, heads: int, head_dim: int, device: torch.device, new_blocks: int) -> None:
        """Allocate at the first append; make room for ``new_blocks`` more blocks' metadata."""
        if self._bufs is None:
            blocks = max(self.initial_blocks, new_blocks + ROOM_BLOCKS)
            self._bufs = [empty_buffers(batch, heads, blocks, head_dim, self.config, side, device) for side in "kv"]
            self._counts = new_counts(device)
            self._start_read_back(device)
        self._reserve_blocks(self._n_blocks + new_blocks)
        self._views = None

    def _start_read_back(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._host = torch.empty(4, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._in_flight = False

    def _append_fused(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = k.shape
        new_blocks = n // self.config.block_size
        self._prepare(b, h, d, k.device, new_blocks)
        self._fold()  # never waits; raises a rejected value of an earlier append
        most = [self._block_word_bound(side) * new_blocks for side in (0, 1)]
        if not self._fits(most):
            self._settle()  # the exact lengths: one wait, for the last read-back
            if new_blocks > 1 and not self._fits(most):
                # Room for the worst case of many blocks would be mostly wasted: encode
                # apart, then copy the words they take (a sync, as a prefill makes anyway).
                packed, perm = encode_kv_fused(k, v, self.config)
                self._append_packed(packed)
                return perm
            if new_blocks == 1 and not self._fits([2 * m for m in most]):
                # Room for this block and the next at their largest: the next append
                # waits for nothing.
                for i, used in enumerate(self._used):
                    self._fit_words(i, used + most[i], keep=used)
        if self._scratch is None or self._scratch.blocks < b * h * new_blocks:
            self._scratch = new_scratch(b * h * new_blocks, d, self.config, k.device)
        self._pending = [pending + m for pending, m in zip(self._pending, most)]
        perm = encode_into(k, v, self.config, *self._bufs, self._n_blocks, self._counts, self.n_tokens, self._scratch)
        self._read_back()
        self._n_blocks += new_blocks
        return perm

    def _fits(self, most: list[int]) -> bool:
        """Whether ``most[i]`` more words fit pool i (K, V), whatever the appends in flight took."""
        return all(used + pending + m <= buf.words.numel()
                   for used, pending, m, buf in zip(self._used, self._pending, most, self._bufs))

    def _append_packed(self, packed: PackedKV) -> None:
        """Copy the blocks of ``packed`` (the reference codec's or :func:`encode_kv_fused`'s
        output) after the used part."""
        new_blocks = packed.k.n_packs // self._packs_per_block
        self._prepare(packed.k.batch, packed.k.heads, packed.k.head_dim, packed.k.words.device, new_blocks)
        self._settle()
        p0 = self._n_blocks * self._packs_per_block
        p1 = p0 + new_blocks * self._packs_per_block
        b0, b1 = self._n_blocks, self._n_blocks + new_blocks
        for i, side in enumerate((packed.k, packed.v)):
            used, n = self._used[i], side.words.numel()
            self._fit_words(i, used + n, keep=used)
            buf = self._bufs[i]
            buf.words[used : used + n] = side.words
            buf.offsets[:, :, p0:p1] = side.offsets + used
            buf.widths[:, :, p0:p1] = side.widths
            buf.mins[:, :, p0:p1] = side.mins
            buf.scale[:, :, b0:b1] = side.scale
            buf.zero[:, :, b0:b1] = side.zero
            self._used[i] = used + n
            self._counts[i] = used + n  # a fill on the device, no sync
        self._n_blocks = b1

    # -- capacity ----------------------------------------------------------------------------
    @property
    def _packs_per_block(self) -> int:
        return self.config.block_size // self.config.pack_size

    def _block_word_bound(self, side: int) -> int:
        """The most words one block (every batch row and head) can add to pool ``side`` (0: K,
        1: V): every channel at the side's ``width_bound`` (the codec never writes a wider
        width: ``level_bits`` of its rel), not at the format's 15 bits."""
        width = self._bufs[side].width_bound
        return self.batch * self.heads * self._packs_per_block * pack_word_bound(self.head_dim, self.config.pack_size, width)

    def _reserve_blocks(self, blocks: int) -> None:
        capacity = self._bufs[0].scale.shape[2]
        if blocks <= capacity:
            return
        # Geometric in what is held (amortized O(1) a block), but an append of many blocks
        # (a prefill) gets what it needs and the room, not GROWTH times that.
        rows = max(self.initial_blocks, blocks + ROOM_BLOCKS, math.ceil(GROWTH * capacity),
                   capacity + MIN_GROWTH_BLOCKS)
        used, ppb = self._n_blocks, self._packs_per_block
        self._bufs = [
            replace(
                buf, offsets=_grow_rows(buf.offsets, used * ppb, rows * ppb),
                widths=_grow_rows(buf.widths, used * ppb, rows * ppb), mins=_grow_rows(buf.mins, used * ppb, rows * ppb),
                scale=_grow_rows(buf.scale, used, rows), zero=_grow_rows(buf.zero, used, rows),
            )
            for buf in self._bufs
        ]
        self._reallocations += 2

    def _fit_words(self, side: int, needed: int, keep: int) -> None:
        """Make pool ``side`` hold ``needed`` words plus one block at its largest, keeping
        its first ``keep`` words. A new pool holds ``needed`` and ROOM_BLOCKS blocks more, and at least
        GROWTH times ``keep``: the copy of the kept words is paid for by a growth of 1/32 of
        them, or by an append larger than that (whose spare is then only the room)."""
        words = self._bufs[side].words
        room = self._block_word_bound(side)
        if needed + room <= words.numel():
            return
        if needed > MAX_WORDS:
            self._recount(self._n_blocks)  # forget the words of an append that cannot be stored
            raise ValueError(f"the store needs {needed} words, more than int32 offsets address ({MAX_WORDS})")
        new = words.new_empty(min(max(math.ceil(GROWTH * keep), needed + ROOM_BLOCKS * room), MAX_WORDS))
        new[:keep] = words[:keep]
        self._bufs[side] = replace(self._bufs[side], words=new)
        self._reallocations += 1

    # -- the device's word counts ------------------------------------------------------------
    def _read_back(self) -> None:
        """Start copying the device's counts to the host (asynchronous on CUDA)."""
        self._host.copy_(self._counts, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._in_flight = True

    def _fold(self, wait: bool = False) -> None:
        """Take in the last read-back if it has landed, or (``wait``) once it has: the wait is
        for that copy only, not for the whole device. Raises what it flags."""
        if not self._in_flight:
            return
        if self._event is not None and not self._event.query():
            if not wait:
                return
            self._event.synchronize()
        # Through numpy: reading host memory, not a tensor op.
        k_words, v_words, k_bad, v_bad = (int(x) for x in self._host.numpy())
        self._used, self._pending, self._in_flight = [k_words, v_words], [0, 0], False
        if min(k_bad, v_bad) != NO_BAD_VALUE:
            self._reject(k_bad, v_bad)

    def _settle(self) -> None:
        self._fold(wait=True)

    def _reject(self, k_bad: int, v_bad: int) -> None:
        name, key = ("k", k_bad) if k_bad <= v_bad else ("v", v_bad)
        d, bh = self.head_dim, self.batch * self.heads
        channel, bh_index, token = key % d, key // d % bh, key // d // bh
        keep = min(self._n_blocks, token // self.config.block_size)
        self._counts[2:] = NO_BAD_VALUE
        self._recount(keep)
        self._settle()
        raise ValueError(
            f"{name} has a non-finite value or one beyond the fp16 range at batch {bh_index // self.heads}, "
            f"head {bh_index % self.heads}, token {token} of the store, channel {channel}; the store dropped "
            f"its tokens from {keep * self.config.block_size} on"
        )

    def _recount(self, n_blocks: int) -> None:
        """Keep ``n_blocks`` blocks; each pool's used length becomes the end of its last kept
        pack's words, computed on the device (no sync) and read back."""
        packs = n_blocks * self._packs_per_block
        wpp = self.config.pack_size // 32
        for i, buf in enumerate(self._bufs):
            if packs == 0:
                self._counts[i] = 0
                continue
            widths = buf.widths[:, :, :packs]
            planes = (widths & 15).sum(-1, dtype=torch.int64) + (widths >> 4).sum(-1, dtype=torch.int64)
            size = (planes * wpp + 3) // 4 * 4  # padded as bitpack pads
            self._counts[i] = (buf.offsets[:, :, :packs].long() + size).amax()
        self._n_blocks = n_blocks
        self._views = None
        self._read_back()

    # -- reading -----------------------------------------------------------------------------
    def _sides(self) -> tuple[PackedTensor, PackedTensor]:
        if self._bufs is None:
            raise RuntimeError("the store is empty: nothing has been appended yet")
        self._settle()
        if self._views is None:
            packs = self._n_blocks * self._packs_per_block
            self._views = tuple(
                replace(
                    buf, words=buf.words[:used], offsets=buf.offsets[:, :, :packs], widths=buf.widths[:, :, :packs],
                    mins=buf.mins[:, :, :packs], scale=buf.scale[:, :, : self._n_blocks],
                    zero=buf.zero[:, :, : self._n_blocks],
                )
                for buf, used in zip(self._bufs, self._used)
            )
        return self._views

    @property
    def is_empty(self) -> bool:
        return self._n_blocks == 0

    @property
    def k(self) -> PackedTensor:
        """The stored K blocks, a view (no copy) of the used part."""
        return self._sides()[0]

    @property
    def v(self) -> PackedTensor:
        """The stored V blocks, a view (no copy) of the used part."""
        return self._sides()[1]

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    @property
    def n_tokens(self) -> int:
        """Tokens stored (a multiple of block_size)."""
        return self._n_blocks * self.config.block_size

    def _buffers(self) -> list[PackedTensor]:
        if self._bufs is None:
            raise RuntimeError("the store is empty: nothing has been appended yet")
        return self._bufs

    @property
    def batch(self) -> int:
        return self._buffers()[0].batch

    @property
    def heads(self) -> int:
        return self._buffers()[0].heads

    @property
    def head_dim(self) -> int:
        return self._buffers()[0].head_dim

    @property
    def device(self) -> torch.device:
        return self._buffers()[0].words.device

    @property
    def reallocations(self) -> int:
        """Buffer reallocations so far (each copies the used part once), K and V together."""
        return self._reallocations

    @property
    def nbytes(self) -> int:
        """Bytes of the used part: words in the pools, metadata, scales and zero points of K
        and V. Exact: waits for the last append's read-back (see the module's docstring)."""
        return 0 if self._bufs is None else sum(side.nbytes for side in self._sides())

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of every buffer at its capacity, K and V (>= ``nbytes``; never waits).

        While the store only grows (no truncation, no smaller batch): at most
        ``GROWTH * nbytes``, plus per pool room for two blocks at their largest and one word
        (``_fit_words``; three blocks after a fused append), plus the metadata of
        ``max(initial_blocks, MIN_GROWTH_BLOCKS)`` blocks (``_reserve_blocks``). Right after
        an append that grew a pool by more than 1/32 (a prefill), that pool's spare is only
        the room.
        """
        return 0 if self._bufs is None else sum(buf.nbytes for buf in self._bufs)

    # -- editing -----------------------------------------------------------------------------
    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) batch rows ``indices`` (int64 ``[new_batch]``), in place.

        Only the per-pack metadata moves; rows keep pointing into the shared word pool,
        so words of dropped rows stay in the pool (and in ``nbytes``) until a truncation
        or the end of the store.
        """
        self._bufs = [
            replace(buf, **{name: t.index_select(0, indices.to(t.device)) for name, t in buf.tensors().items()
                            if name != "words"})
            for buf in self._buffers()
        ]
        self._views = None

    def truncate(self, n_blocks: int) -> None:
        """Forget every block from ``n_blocks`` on; the words after the last kept pack go back
        to the pool (no device sync)."""
        if not 0 <= n_blocks <= self.n_blocks:
            raise ValueError(f"n_blocks must be in [0, {self.n_blocks}], got {n_blocks}")
        if self._bufs is not None:
            self._fold()
            self._recount(n_blocks)

    def to(self, device: torch.device | str) -> "PackedStore":
        """Move every buffer to ``device``, in place; returns self."""
        if self._bufs is not None:
            self._settle()
            self._bufs = [buf.to(device) for buf in self._bufs]
            self._counts = self._counts.to(device)
            self._start_read_back(self._counts.device)
            self._views = None
            self._scratch = None
        return self
