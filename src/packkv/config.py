"""PackKVConfig: every knob of the codec, validated once at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Grouping = Literal["token", "channel"]
RepackMethod = Literal["greedy", "median", "none"]

GROUPINGS = ("token", "channel")
REPACK_METHODS = ("greedy", "median", "none")
PACK_SIZES = (32, 64)
MIN_BITS = (0, 4, 8)
# rel below 2**-13 could need more than 15 bits a value, the widest a 4-bit width code holds.
REL_MIN = 1e-4
REL_MAX = 1.0


@dataclass(frozen=True)
class PackKVConfig:
    """Settings of the PackKV codec and cache.

    Attributes:
        block_size: tokens quantized together (per-channel ranges span a block), a
            multiple of ``pack_size``.
        buffer_size: most recent tokens a cache keeps in full precision.
        pack_size: tokens in one pack, the unit that shares per-channel bit widths. A
            pack's bit planes are whole 32-bit words, hence 32 or 64.
        k_rel, v_rel: quantization step as a fraction of the group's value range
            (step = rel x (max - min)); about 1/rel + 1 levels a group.
        k_grouping, v_grouping: ``"token"`` (one range per token and head, PackKV) or
            ``"channel"`` (one range per channel over a block, KIVI's choice for K).
        repack: token reordering inside a block: ``"greedy"``, ``"median"`` or ``"none"``.
        min_bits: bits of the per-pack, per-channel minimum that is subtracted before
            bit-packing (0: no minimum stored; 4 or 8: clamped to what fits).
    """

    # k_rel, v_rel and the groupings from the study on SmolLM2 (docs/results.md: +0.18
    # perplexity, top-1 0.950, K 4.05x / V 4.48x with blocks of 128 and greedy repacking).
    # With both ranges per token, the block size only bounds what repacking can reorder.
    block_size: int = 64
    buffer_size: int = 128
    pack_size: int = 32
    k_rel: float = 0.05
    v_rel: float = 0.15
    k_grouping: Grouping = "token"
    v_grouping: Grouping = "token"
    # median: one sort, fused on the GPU (appending a block to an 8B-shaped layer's store took
    # 0.31 ms on an H100, greedy 25 ms, docs/benchmarks.md); greedy packs 1-2% tighter
    # (results.md): pass it for offline compression.
    repack: RepackMethod = "median"
    min_bits: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size", "buffer_size", "pack_size", "min_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.pack_size not in PACK_SIZES:
            raise ValueError(f"pack_size must be one of {PACK_SIZES}, got {self.pack_size}")
        if self.block_size < self.pack_size or self.block_size % self.pack_size:
            raise ValueError(
                f"block_size must be a positive multiple of pack_size={self.pack_size}, "
                f"got {self.block_size}"
            )
        if self.block_size > 1024:
            raise ValueError(f"block_size must be at most 1024, got {self.block_size}")
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {self.buffer_size}")
        for name in ("k_rel", "v_rel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not REL_MIN <= float(value) <= REL_MAX:
                raise ValueError(f"{name} must be in [{REL_MIN}, {REL_MAX}], got {value}")
            object.__setattr__(self, name, float(value))
        for name in ("k_grouping", "v_grouping"):
            if getattr(self, name) not in GROUPINGS:
                raise ValueError(f"{name} must be one of {GROUPINGS}, got {getattr(self, name)!r}")
        if self.repack not in REPACK_METHODS:
            raise ValueError(f"repack must be one of {REPACK_METHODS}, got {self.repack!r}")
        if self.min_bits not in MIN_BITS:
            raise ValueError(f"min_bits must be one of {MIN_BITS}, got {self.min_bits}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PackKVConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PackKVConfig fields: {sorted(unknown)}")
        return cls(**data)
