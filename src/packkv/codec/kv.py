"""compress_kv / decompress_kv: the reference codec over whole cache tensors.

Plain PyTorch on any device. Full blocks of ``block_size`` tokens are quantized,
repacked and bit-packed; the tokens after the last full block stay in fp16.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import PackKVConfig
from .bitpack import pack_mins, pack_mins_widths, pack_nibbles, pack_planes, unpack_mins, unpack_nibbles, unpack_planes
from .format import PackedKV, PackedTensor
from .quantize import FP16_MAX, dequantize_blocks, level_bits, quantize_blocks
from .repack import repack_permutation

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (u [n_packs, pack_size, head_dim], widths [n_packs, head_dim]) -> (words, offsets)
Packer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def supported_head_dim(head_dim: int) -> bool:
    """Head dims the codec packs: multiples of 16 from 16 to 256."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 256


def check_kv(k: torch.Tensor, v: torch.Tensor, *, values: bool = True) -> None:
    """Raise a clear exception unless ``k`` and ``v`` are a valid cache pair.

    Both must be floating tensors of one shape ``[batch, kv_heads, tokens, head_dim]`` on
    one device, non-empty, finite and within the fp16 range. ``values=False`` checks all
    but the last two (no pass over the data, no device sync): for a caller that checks the
    values where it reads them anyway, as the fused GPU encoder does in its kernel.
    """
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, kv_heads, tokens, head_dim], got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.device != v.device:
        raise ValueError(f"k and v are on different devices: {k.device} vs {v.device}")
    if k.numel() == 0:
        raise ValueError(f"k and v are empty: shape {tuple(k.shape)}")
    if not supported_head_dim(k.shape[-1]):
        raise ValueError(f"head_dim {k.shape[-1]} is not supported (multiples of 16 from 16 to 256)")
    if not values:
        return
    # One reduction (and one device sync) for both: NaN fails `<=` too.
    out_of_range = [~(t.abs() <= FP16_MAX) for t in (k, v)]
    if bool(torch.stack([m.any() for m in out_of_range]).any()):
        for name, t, bad in (("k", k, out_of_range[0]), ("v", v, out_of_range[1])):
            if bad.any():
                b, h, tok, c = (int(i) for i in bad.nonzero()[0])
                value = t[b, h, tok, c].item()
                problem = "a non-finite value" if not torch.isfinite(torch.tensor(value)) else "a value beyond the fp16 range"
                raise ValueError(f"{name} has {problem} ({value}) at batch {b}, head {h}, token {tok}, channel {c}")


def _pack_side(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grouping: str, rel: float, config: PackKVConfig,
    packer: Packer,
) -> PackedTensor:
    """Bit-pack quantized blocks ``q: [batch, heads, n_blocks, block_size, head_dim]``."""
    b, h, nb, s, d = q.shape
    p = config.pack_size
    packs = q.reshape(-1, p, d)
    mins, widths = pack_mins_widths(packs, config.min_bits)
    words, offsets = packer(packs - mins.unsqueeze(1).int(), widths)
    if words.numel() >= 2**31:
        raise ValueError(f"the packed data needs {words.numel()} words, more than int32 offsets address; compress fewer tokens at once")
    n_packs = nb * (s // p)
    return PackedTensor(
        words=words,
        offsets=offsets.to(torch.int32).view(b, h, n_packs),
        widths=pack_nibbles(widths).view(b, h, n_packs, d // 2),
        mins=pack_mins(mins, config.min_bits).view(b, h, n_packs, d * config.min_bits // 8),
        scale=scale, zero=zero, grouping=grouping,
        block_size=s, pack_size=p, min_bits=config.min_bits, width_bound=level_bits(rel),
    )


def unpack_ints(packed: PackedTensor) -> torch.Tensor:
    """The quantized integers of every packed token: int32 ``[batch, heads, n_blocks, block_size, head_dim]``."""
    d = packed.head_dim
    widths = unpack_nibbles(packed.widths).reshape(-1, d)
    mins = unpack_mins(packed.mins, packed.min_bits, d).reshape(-1, d)
    u = unpack_planes(packed.words, packed.offsets.reshape(-1), widths, packed.pack_size)
    q = u + mins.unsqueeze(1).int()
    n_blocks = packed.n_packs * packed.pack_size // packed.block_size
    return q.view(packed.batch, packed.heads, n_blocks, packed.block_size, d)


def decode_tensor(packed: PackedTensor) -> torch.Tensor:
    """Dequantized packed tokens, fp32 ``[batch, heads, n_tokens, head_dim]`` in packed order."""
    x = dequantize_blocks(unpack_ints(packed), packed.scale, packed.zero, packed.grouping)
    return x.reshape(packed.batch, packed.heads, packed.n_tokens, packed.head_dim)


def compress_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    config: PackKVConfig | None = None,
    *,
    return_permutation: bool = False,
    packer: Packer | None = None,
) -> PackedKV | tuple[PackedKV, torch.Tensor]:
    """Compress one layer's cache.

    Args:
        k, v: ``[batch, kv_heads, tokens, head_dim]`` float16/bfloat16/float32 (K after RoPE).
        config: codec settings (``PackKVConfig()`` when None).
        return_permutation: also return the token order, int64
            ``[batch, kv_heads, n_blocks * block_size]``: packed token j is original
            token ``perm[..., j]`` (a permutation inside each block).

    Returns:
        The :class:`PackedKV` (and the permutation). ``.nbytes`` is its stored size in bytes.
    """
    config = config or PackKVConfig()
    packer = packer or pack_planes
    check_kv(k, v)
    b, h, n, d = k.shape
    s = config.block_size
    nb = n // s
    full = nb * s
    kb = k[:, :, :full].reshape(b, h, nb, s, d)
    vb = v[:, :, :full].reshape(b, h, nb, s, d)
    qk, k_scale, k_zero = quantize_blocks(kb, config.k_rel, config.k_grouping)
    qv, v_scale, v_zero = quantize_blocks(vb, config.v_rel, config.v_grouping)
    perm = repack_permutation(qk, qv, config.pack_size, config.repack, config.min_bits)
    rows = perm.unsqueeze(-1).expand(-1, -1, -1, -1, d)
    qk, qv = torch.gather(qk, 3, rows), torch.gather(qv, 3, rows)
    if config.k_grouping == "token":
        k_scale, k_zero = torch.gather(k_scale, 3, perm), torch.gather(k_zero, 3, perm)
    if config.v_grouping == "token":
        v_scale, v_zero = torch.gather(v_scale, 3, perm), torch.gather(v_zero, 3, perm)
    packed = PackedKV(
        k=_pack_side(qk, k_scale, k_zero, config.k_grouping, config.k_rel, config, packer),
        v=_pack_side(qv, v_scale, v_zero, config.v_grouping, config.v_rel, config, packer),
        # copy=True: an fp16 input's tail slice would otherwise be the caller's memory.
        k_tail=k[:, :, full:].to(torch.float16, copy=True).contiguous(),
        v_tail=v[:, :, full:].to(torch.float16, copy=True).contiguous(),
        config=config,
        dtype=k.dtype,
    )
    if return_permutation:
        starts = torch.arange(0, full, s, device=perm.device).view(1, 1, nb, 1)
        return packed, (perm + starts).reshape(b, h, full)
    return packed


def decompress_kv(packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompress to ``k, v`` of the original shape and dtype.

    Tokens inside each full block come back in packed order, the same for K and V, which
    leaves attention unchanged; the fp16 tail follows in its original order.
    """
    k = torch.cat([decode_tensor(packed.k), packed.k_tail.float()], dim=2)
    v = torch.cat([decode_tensor(packed.v), packed.v_tail.float()], dim=2)
    # zero + q * scale can pass an original value by up to scale / 2, beyond 65504 (inf in
    # fp16); the originals lie within +-FP16_MAX, so clamping only ever lowers the error.
    return k.clamp(-FP16_MAX, FP16_MAX).to(packed.dtype), v.clamp(-FP16_MAX, FP16_MAX).to(packed.dtype)
