"""PackedStore: one layer's packed K and V, growing block by block without rewriting.

A store keeps, for K and for V, the tensors of a :class:`PackedTensor` in buffers with
spare capacity: the per-pack metadata (``offsets``, ``widths``, ``mins``) and the per-block
``scale`` / ``zero`` along their pack or block dimension, and the bit-plane words in one
flat pool. Appending compresses the new blocks with the reference codec and copies the
new packs' words to the end of the pool, adding the pool's used length to their offsets
(the format lets offsets point anywhere in the pool). When a buffer is full it is
reallocated at twice its capacity (or what the append needs, if more), so the cost of a
token is amortized O(1) and nothing already stored is touched otherwise.

``k`` and ``v`` are :class:`PackedTensor` views of the used part: no copy, so their
metadata tensors are not contiguous (they are slices of the capacity along dim 2); the
word pool's used part is contiguous.
"""

from __future__ import annotations

import torch

from .codec import PackedTensor
from .kernels.encode import encode_kv
from .config import PackKVConfig

GROWTH = 2
# Offsets are int32 word indices (docs/format.md).
MAX_WORDS = 2**31 - 1


class _GrowingSide:
    """The packed blocks of K or of V of one layer, with capacity.

    Buffers: ``words`` int32 ``[word_capacity]``; ``offsets`` int32, ``widths`` and
    ``mins`` uint8 ``[batch, heads, pack_capacity, ...]``; ``scale`` and ``zero`` fp16
    ``[batch, heads, block_capacity, block_size or head_dim]``.
    """

    def __init__(self, first: PackedTensor, block_capacity: int) -> None:
        self.grouping = first.grouping
        self.block_size = first.block_size
        self.pack_size = first.pack_size
        self.min_bits = first.min_bits
        self.packs_per_block = first.block_size // first.pack_size
        self.n_blocks = 0
        self.n_words = 0
        self.reallocations = 0
        # The PackedTensor view of the used part, rebuilt after every change (decode reads
        # it once per layer and step: no need to slice six tensors each time).
        self._view: PackedTensor | None = None
        b, h = first.batch, first.heads
        device = first.words.device
        n_packs = block_capacity * self.packs_per_block
        # Room for block_capacity blocks as wide as the first ones.
        first_blocks = first.n_packs // self.packs_per_block
        word_capacity = -(-first.words.numel() * block_capacity // first_blocks)
        self.words = torch.zeros(max(word_capacity, 4), dtype=torch.int32, device=device)
        self.meta = {
            "offsets": torch.zeros(b, h, n_packs, dtype=torch.int32, device=device),
            "widths": torch.zeros(b, h, n_packs, first.widths.shape[-1], dtype=torch.uint8, device=device),
            "mins": torch.zeros(b, h, n_packs, first.mins.shape[-1], dtype=torch.uint8, device=device),
            "scale": torch.zeros(b, h, block_capacity, first.scale.shape[-1], dtype=torch.float16, device=device),
            "zero": torch.zeros(b, h, block_capacity, first.zero.shape[-1], dtype=torch.float16, device=device),
        }

    @property
    def block_capacity(self) -> int:
        return self.meta["scale"].shape[2]

    @property
    def n_packs(self) -> int:
        return self.n_blocks * self.packs_per_block

    def _used_rows(self, name: str) -> int:
        return self.n_blocks if name in ("scale", "zero") else self.n_packs

    def _grow_meta(self, blocks_needed: int) -> None:
        capacity = max(GROWTH * self.block_capacity, blocks_needed)
        for name, buf in self.meta.items():
            rows = capacity if name in ("scale", "zero") else capacity * self.packs_per_block
            new = buf.new_zeros(buf.shape[0], buf.shape[1], rows, *buf.shape[3:])
            used = self._used_rows(name)
            new[:, :, :used] = buf[:, :, :used]
            self.meta[name] = new
        self.reallocations += 1

    def _grow_words(self, words_needed: int) -> None:
        if words_needed > MAX_WORDS:
            raise ValueError(
                f"the store needs {words_needed} words, more than int32 offsets address ({MAX_WORDS})"
            )
        capacity = min(max(GROWTH * self.words.numel(), words_needed), MAX_WORDS)
        new = self.words.new_zeros(capacity)
        new[: self.n_words] = self.words[: self.n_words]
        self.words = new
        self.reallocations += 1

    def append(self, packed: PackedTensor) -> None:
        """Copy the blocks of ``packed`` (same batch, heads, head_dim, format) after the used part."""
        new_blocks = packed.n_packs // self.packs_per_block
        if self.n_blocks + new_blocks > self.block_capacity:
            self._grow_meta(self.n_blocks + new_blocks)
        if self.n_words + packed.words.numel() > self.words.numel():
            self._grow_words(self.n_words + packed.words.numel())
        p0, p1 = self.n_packs, self.n_packs + packed.n_packs
        b0, b1 = self.n_blocks, self.n_blocks + new_blocks
        self.words[self.n_words : self.n_words + packed.words.numel()] = packed.words
        self.meta["offsets"][:, :, p0:p1] = packed.offsets + self.n_words
        self.meta["widths"][:, :, p0:p1] = packed.widths
        self.meta["mins"][:, :, p0:p1] = packed.mins
        self.meta["scale"][:, :, b0:b1] = packed.scale
        self.meta["zero"][:, :, b0:b1] = packed.zero
        self.n_words += packed.words.numel()
        self.n_blocks = b1
        self._view = None

    def view(self) -> PackedTensor:
        if self._view is None:
            used = {name: buf[:, :, : self._used_rows(name)] for name, buf in self.meta.items()}
            self._view = PackedTensor(
                words=self.words[: self.n_words], **used, grouping=self.grouping,
                block_size=self.block_size, pack_size=self.pack_size, min_bits=self.min_bits,
            )
        return self._view

    def select_batch(self, indices: torch.Tensor) -> None:
        for name, buf in self.meta.items():
            self.meta[name] = buf.index_select(0, indices.to(buf.device))
        self._view = None

    def truncate(self, n_blocks: int) -> None:
        dropped = self.meta["offsets"][:, :, n_blocks * self.packs_per_block : self.n_packs]
        if dropped.numel():
            # Blocks are appended in order, so the dropped packs' words end the pool.
            self.n_words = int(dropped.min())
        self.n_blocks = n_blocks
        self._view = None

    def to(self, device: torch.device | str) -> None:
        self.words = self.words.to(device)
        self.meta = {name: buf.to(device) for name, buf in self.meta.items()}
        self._view = None

    @property
    def nbytes(self) -> int:
        return self.view().nbytes

    @property
    def allocated_nbytes(self) -> int:
        bufs = [self.words, *self.meta.values()]
        return sum(t.numel() * t.element_size() for t in bufs)


class PackedStore:
    """The packed K and V of one layer, appended to block by block.

    Args:
        config: codec settings (``PackKVConfig()`` when None).
        initial_blocks: blocks of capacity reserved at the first append (at least what
            that append needs).

    The batch size, number of KV heads, head_dim and device are fixed by the first
    :meth:`append`. Tokens are held in packed order: inside each block the order of
    the permutation that :meth:`append` returns.
    """

    def __init__(self, config: PackKVConfig | None = None, *, initial_blocks: int = 4) -> None:
        if not isinstance(initial_blocks, int) or initial_blocks < 1:
            raise ValueError(f"initial_blocks must be a positive int, got {initial_blocks!r}")
        self.config = config or PackKVConfig()
        self.initial_blocks = initial_blocks
        self._k: _GrowingSide | None = None
        self._v: _GrowingSide | None = None

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
        if self._k is not None:
            expect = (self.batch, self.heads, self.head_dim)
            got = (k.shape[0], k.shape[1], k.shape[3])
            if got != expect:
                raise ValueError(f"append got (batch, heads, head_dim) = {got}, the store holds {expect}")
            if k.device != self.device:
                raise ValueError(f"append got k on {k.device}, the store is on {self.device}")
        # The fused GPU encoder on CUDA; the reference codec (identical output) on CPU.
        packed, perm = encode_kv(k, v, self.config, return_permutation=True)
        if self._k is None:
            capacity = max(self.initial_blocks, k.shape[2] // s)
            self._k = _GrowingSide(packed.k, capacity)
            self._v = _GrowingSide(packed.v, capacity)
        self._k.append(packed.k)
        self._v.append(packed.v)
        return perm

    def _sides(self) -> tuple[_GrowingSide, _GrowingSide]:
        if self._k is None or self._v is None:
            raise RuntimeError("the store is empty: nothing has been appended yet")
        return self._k, self._v

    @property
    def is_empty(self) -> bool:
        return self._k is None or self._k.n_blocks == 0

    @property
    def k(self) -> PackedTensor:
        """The stored K blocks, a view (no copy) of the used part."""
        return self._sides()[0].view()

    @property
    def v(self) -> PackedTensor:
        """The stored V blocks, a view (no copy) of the used part."""
        return self._sides()[1].view()

    @property
    def n_blocks(self) -> int:
        return 0 if self._k is None else self._k.n_blocks

    @property
    def n_tokens(self) -> int:
        """Tokens stored (a multiple of block_size)."""
        return self.n_blocks * self.config.block_size

    @property
    def batch(self) -> int:
        return self._sides()[0].meta["offsets"].shape[0]

    @property
    def heads(self) -> int:
        return self._sides()[0].meta["offsets"].shape[1]

    @property
    def head_dim(self) -> int:
        return self._sides()[0].meta["widths"].shape[-1] * 2

    @property
    def device(self) -> torch.device:
        return self._sides()[0].words.device

    @property
    def reallocations(self) -> int:
        """Buffer reallocations so far (each copies the used part once), K and V together."""
        return 0 if self._k is None else self._k.reallocations + self._v.reallocations

    @property
    def nbytes(self) -> int:
        """Bytes of the used part: words in the pool, metadata, scales and zero points of K and V."""
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of every buffer at its capacity, K and V (>= ``nbytes``)."""
        return 0 if self._k is None else self._k.allocated_nbytes + self._v.allocated_nbytes

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) batch rows ``indices`` (int64 ``[new_batch]``), in place.

        Only the per-pack metadata moves; rows keep pointing into the shared word pool,
        so words of dropped rows stay in the pool (and in ``nbytes``) until the store is freed.
        """
        for side in self._sides():
            side.select_batch(indices)

    def truncate(self, n_blocks: int) -> None:
        """Forget every block from ``n_blocks`` on; their words are given back to the pool."""
        if not 0 <= n_blocks <= self.n_blocks:
            raise ValueError(f"n_blocks must be in [0, {self.n_blocks}], got {n_blocks}")
        for side in self._sides():
            side.truncate(n_blocks)

    def to(self, device: torch.device | str) -> "PackedStore":
        """Move every buffer to ``device``, in place; returns self."""
        if self._k is not None:
            self._k.to(device)
            self._v.to(device)
        return self
