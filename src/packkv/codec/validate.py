"""validate_packed: check packed data against docs/format.md before anything decodes it.

A decoder follows offsets and widths into the word pool; packed data from a file, another
process or a buggy producer must not make it read out of bounds or decode garbage scales.
Every check is vectorized over packs and groups (no Python loop over packs), so
validating costs a few passes over the metadata, far less than decoding.
"""

from __future__ import annotations

import torch

from ..config import GROUPINGS, MIN_BITS, PACK_SIZES, PackKVConfig
from ..errors import CorruptDataError
from .bitpack import MAX_WIDTH, PACK_ALIGN_WORDS, WORD_BITS, unpack_nibbles
from .format import PackedKV, PackedTensor
from .kv import FLOAT_DTYPES, supported_head_dim

MAX_BLOCK_SIZE = 1024

# Tensor fields of a PackedTensor, their dtype and their number of dimensions.
TENSOR_FIELDS = {
    "words": (torch.int32, 1),
    "offsets": (torch.int32, 3),
    "widths": (torch.uint8, 4),
    "mins": (torch.uint8, 4),
    "scale": (torch.float16, 4),
    "zero": (torch.float16, 4),
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _first(bad: torch.Tensor) -> list[int]:
    """Index of the first True of a bool tensor (row-major)."""
    return [int(i) for i in bad.nonzero()[0]]


def _check_tensor(t: object, field: str, dtype: torch.dtype, ndim: int, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise CorruptDataError(f"{field} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise CorruptDataError(f"{field} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise CorruptDataError(f"{field} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise CorruptDataError(f"{field} is on {t.device}, the rest on {device}")


def _check_shape(t: torch.Tensor, field: str, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise CorruptDataError(f"{field} has shape {tuple(t.shape)}, expected {expected}")


def pack_word_counts(widths: torch.Tensor, pack_size: int) -> torch.Tensor:
    """Words each pack occupies in the pool, padding included.

    Args:
        widths: uint8 ``[..., head_dim // 2]``, packed 4-bit width codes.
        pack_size: tokens a pack.

    Returns:
        int64 ``[...]``: ``sum(widths) * pack_size / 32`` rounded up to a multiple of 4.
    """
    planes = unpack_nibbles(widths).sum(-1, dtype=torch.int64)
    used = planes * (pack_size // WORD_BITS)
    return (used + PACK_ALIGN_WORDS - 1) // PACK_ALIGN_WORDS * PACK_ALIGN_WORDS


def _validate_tensor(p: PackedTensor, prefix: str) -> None:
    for attr, allowed in (("grouping", GROUPINGS), ("pack_size", PACK_SIZES), ("min_bits", MIN_BITS)):
        value = getattr(p, attr)
        if (attr != "grouping" and not _is_int(value)) or value not in allowed:
            raise CorruptDataError(f"{prefix}{attr} must be one of {allowed}, got {value!r}")
    s = p.block_size
    if not _is_int(s) or not p.pack_size <= s <= MAX_BLOCK_SIZE or s % p.pack_size:
        raise CorruptDataError(
            f"{prefix}block_size must be a multiple of pack_size={p.pack_size} up to {MAX_BLOCK_SIZE}, got {s!r}"
        )
    if not _is_int(p.width_bound) or not 0 <= p.width_bound <= MAX_WIDTH:
        raise CorruptDataError(f"{prefix}width_bound must be an int from 0 to {MAX_WIDTH}, got {p.width_bound!r}")
    device = p.words.device if isinstance(p.words, torch.Tensor) else None
    for field, (dtype, ndim) in TENSOR_FIELDS.items():
        _check_tensor(getattr(p, field), prefix + field, dtype, ndim, device)

    b, h, n_packs = p.offsets.shape
    if b < 1 or h < 1:
        raise CorruptDataError(f"{prefix}offsets has shape {tuple(p.offsets.shape)}: batch and heads must be >= 1")
    d = 2 * p.widths.shape[-1]
    _check_shape(p.widths, prefix + "widths", (b, h, n_packs, p.widths.shape[-1]))
    if not supported_head_dim(d):
        raise CorruptDataError(f"{prefix}widths gives head_dim {d}; supported: multiples of 16 from 16 to 256")
    _check_shape(p.mins, prefix + "mins", (b, h, n_packs, d * p.min_bits // 8))
    if n_packs * p.pack_size % s:
        raise CorruptDataError(f"{prefix}offsets holds {n_packs} packs of {p.pack_size} tokens, not whole blocks of {s}")
    group = s if p.grouping == "token" else d
    for field in ("scale", "zero"):
        _check_shape(getattr(p, field), prefix + field, (b, h, n_packs * p.pack_size // s, group))

    # Widths are 4-bit codes (<= 15) and minima are nibbles or bytes, both < 2**min_bits,
    # by their dtype and packing. Widths above width_bound would make the kernels skip
    # planes (wrong values, not unsafe reads); offsets and the lengths the widths imply are
    # what can point outside the pool.
    if p.width_bound < MAX_WIDTH:
        widths = unpack_nibbles(p.widths)
        too_wide = widths > p.width_bound
        if too_wide.any():
            bad = _first(too_wide)
            raise CorruptDataError(
                f"{prefix}widths: channel {bad[-1]} of pack {bad[:-1]} is {int(widths[tuple(bad)])} bits wide, "
                f"more than width_bound {p.width_bound}"
            )
    offsets = p.offsets.long()
    if (offsets < 0).any():
        bad = _first(offsets < 0)
        raise CorruptDataError(f"{prefix}offsets{bad} = {int(offsets[tuple(bad)])} is negative")
    # Packs start on 16-byte boundaries (docs/format.md), which kernels may rely on for
    # vector loads; every producer (codec, store) places them so.
    misaligned = offsets % PACK_ALIGN_WORDS != 0
    if misaligned.any():
        bad = _first(misaligned)
        raise CorruptDataError(
            f"{prefix}offsets{bad} = {int(offsets[tuple(bad)])} is not a multiple of {PACK_ALIGN_WORDS} (16-byte aligned)"
        )
    ends = offsets + pack_word_counts(p.widths, p.pack_size)
    past = ends > p.words.numel()
    if past.any():
        bad = _first(past)
        raise CorruptDataError(
            f"{prefix}offsets{bad} = {int(offsets[tuple(bad)])}: the pack ends at word {int(ends[tuple(bad)])}, "
            f"past the {p.words.numel()} words"
        )
    scale = p.scale.float()
    bad_scale = ~(torch.isfinite(scale) & (scale > 0))
    if bad_scale.any():
        bad = _first(bad_scale)
        raise CorruptDataError(f"{prefix}scale{bad} = {float(scale[tuple(bad)])}, not finite and > 0")
    bad_zero = ~torch.isfinite(p.zero)
    if bad_zero.any():
        bad = _first(bad_zero)
        raise CorruptDataError(f"{prefix}zero{bad} = {float(p.zero[tuple(bad)])} is not finite")


def _validate_kv(kv: PackedKV, prefix: str) -> None:
    if not isinstance(kv.config, PackKVConfig):
        raise CorruptDataError(f"{prefix}config must be a PackKVConfig, got {type(kv.config).__name__}")
    if kv.dtype not in FLOAT_DTYPES:
        raise CorruptDataError(f"{prefix}dtype must be one of {FLOAT_DTYPES}, got {kv.dtype!r}")
    for side in ("k", "v"):
        if not isinstance(getattr(kv, side), PackedTensor):
            raise CorruptDataError(f"{prefix}{side} must be a PackedTensor, got {type(getattr(kv, side)).__name__}")
        _validate_tensor(getattr(kv, side), f"{prefix}{side}.")
    k, v, config = kv.k, kv.v, kv.config
    for side, grouping in (("k", config.k_grouping), ("v", config.v_grouping)):
        got = getattr(kv, side).grouping
        if got != grouping:
            raise CorruptDataError(f"{prefix}{side}.grouping is {got!r}, the config says {grouping!r}")
    for attr in ("block_size", "pack_size", "min_bits"):
        for side in ("k", "v"):
            got = getattr(getattr(kv, side), attr)
            if got != getattr(config, attr):
                raise CorruptDataError(f"{prefix}{side}.{attr} is {got}, the config says {getattr(config, attr)}")
    k_dims = (k.batch, k.heads, k.n_packs, k.head_dim)
    v_dims = (v.batch, v.heads, v.n_packs, v.head_dim)
    if k_dims != v_dims:
        raise CorruptDataError(f"{prefix}k and v differ in (batch, heads, n_packs, head_dim): {k_dims} vs {v_dims}")
    if v.words.device != k.words.device:
        raise CorruptDataError(f"{prefix}v is on {v.words.device}, k on {k.words.device}")
    for side in ("k_tail", "v_tail"):
        tail = getattr(kv, side)
        _check_tensor(tail, prefix + side, torch.float16, 4, k.words.device)
        _check_shape(tail, prefix + side, (k.batch, k.heads, kv.k_tail.shape[2], k.head_dim))
        bad_tail = ~torch.isfinite(tail)
        if bad_tail.any():
            bad = _first(bad_tail)
            raise CorruptDataError(f"{prefix}{side}{bad} = {float(tail[tuple(bad)])} is not finite")


def validate_packed(packed: PackedKV | PackedTensor, *, where: str = "") -> None:
    """Raise :class:`CorruptDataError` unless ``packed`` is consistent with docs/format.md.

    Checks dtypes, devices and shapes (batch, heads, packs, head_dim, whole blocks, scale
    and zero per grouping, tails), encoding attributes against the config, that every
    pack's words ``[offset, offset + padded length)`` lie inside ``words`` and start on a
    16-byte boundary, that scales are
    finite and > 0, and that zero points and tails are finite. Once it passes,
    :func:`decompress_kv` reads only inside the buffers and raises nothing.

    Args:
        packed: one layer's :class:`PackedKV`, or one :class:`PackedTensor`.
        where: a prefix for messages, such as ``"layer 3"``.

    Raises:
        CorruptDataError: naming the field and the first bad index, e.g.
            ``k.offsets[0, 1, 5] = 1234: the pack ends at word 1250, past the 1240 words``.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(packed, PackedKV):
        _validate_kv(packed, prefix)
    elif isinstance(packed, PackedTensor):
        _validate_tensor(packed, prefix)
    else:
        raise CorruptDataError(f"{prefix}expected a PackedKV or PackedTensor, got {type(packed).__name__}")
