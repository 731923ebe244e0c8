"""Inputs for the decode-kernel tests (test_qk, test_pv, test_decode_attention): packed
caches of random or real KV, the grid of cases, and tolerances.

The kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported); every program costs milliseconds, so shapes stay small. On a
machine with a GPU, ``TRITON_INTERPRET=0 PACKKV_TEST_DEVICE=cuda pytest tests/kernels``
runs the same tests on compiled kernels (the inline-PTX path the interpreter cannot run).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from packkv import PackKVConfig, PackedKV, compress_kv

REAL_KV = Path(__file__).parent.parent / "data" / "smollm2_kv_tiny.pt"  # [1, 3, 160, 64] fp16
DEVICE = torch.device(os.environ.get("PACKKV_TEST_DEVICE", "cpu"))

# The K product multiplies exact fp16 operands (the query, scaled by a power of two, and
# the integers) with fp32 accumulation: compared to PRODUCT_RTOL of the largest reference
# value. The V product rounds each weight (times its token's step) to fp16, as
# FlashAttention rounds its probabilities: at most 2**-11 of each term, so 2**-10 of the
# largest value. Attention outputs are rounded to the query dtype, so they may differ from
# the reference by one unit in the last place.
PRODUCT_RTOL = 1e-5
V_PRODUCT_RTOL = 2**-10
ATTENTION_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@dataclass(frozen=True)
class Case:
    """One kernel test input: shape, query dtype, codec settings and data source."""

    batch: int = 1
    kv_heads: int = 1
    group: int = 1
    head_dim: int = 64
    tokens: int = 100
    dtype: torch.dtype = torch.float16
    config: PackKVConfig = PackKVConfig(repack="median")
    real: bool = False

    def __str__(self) -> str:
        c = self.config
        return (f"b{self.batch}h{self.kv_heads}g{self.group}d{self.head_dim}t{self.tokens}-{str(self.dtype)[6:]}"
                f"-{c.k_grouping[0]}{c.v_grouping[0]}-p{c.pack_size}m{c.min_bits}-r{c.k_rel:g},{c.v_rel:g}"
                + ("-real" if self.real else ""))


def kv_data(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[batch, kv_heads, tokens, head_dim]``: fresh random (never zero) or real SmolLM2 KV.

    Real data has head_dim 64 and 3 heads; head_dim 128 joins the channels of two heads,
    and extra batch rows take later tokens' order reversed.
    """
    if not case.real:
        g = torch.Generator().manual_seed(seed)
        shape = (case.batch, case.kv_heads, case.tokens, case.head_dim)
        k = torch.randn(shape, generator=g) * 2 + torch.randn(1, 1, 1, case.head_dim, generator=g)
        return k.half(), (torch.randn(shape, generator=g) * 0.5).half()
    data = torch.load(REAL_KV)
    k, v = data["k"][0], data["v"][0]  # [3, 160, 64]
    if case.head_dim == 128:
        k, v = (torch.cat([x[:-1], x[1:]], dim=-1) for x in (k, v))  # [2, 160, 128]
    pick = lambda x: torch.stack([x[: case.kv_heads, : case.tokens], x[: case.kv_heads].flip(1)[:, : case.tokens]][: case.batch])
    return pick(k).contiguous(), pick(v).contiguous()


@functools.lru_cache(maxsize=None)
def make_case(case: Case, seed: int = 0) -> tuple[torch.Tensor, PackedKV]:
    """The query ``[batch, kv_heads * group, head_dim]`` and the packed cache of a Case, on DEVICE.

    Cached: the three kernels' tests share one encoding (greedy repacking is slow on the
    CPU); callers must not modify what they get.
    """
    k, v = kv_data(case, seed)
    kv = compress_kv(k, v, case.config)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(case.batch, case.kv_heads * case.group, case.head_dim, generator=g).to(case.dtype)
    return q.to(DEVICE), kv.to(DEVICE)


def packed_side(side: str, config: PackKVConfig = PackKVConfig(), batch=1, heads=2, head_dim=64, tokens=200, seed=0):
    """Side ``side`` ("k" or "v") of random KV of that shape, compressed with ``config``."""
    k, v = kv_data(Case(batch=batch, kv_heads=heads, head_dim=head_dim, tokens=tokens, config=config), seed)
    return getattr(compress_kv(k, v, config), side)


def spaced_steps(p):
    """``p`` with its steps and zeros in storage that leaves a gap after each block's row
    (equal values, not token after token: the kernels' general addressing)."""
    def spaced(x: torch.Tensor) -> torch.Tensor:
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    return replace(p, scale=spaced(p.scale), zero=spaced(p.zero))


def assert_product_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = PRODUCT_RTOL) -> None:
    """fp32 products agree to ``rtol`` of the largest reference value."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


_MEDIAN = dict(repack="median")  # greedy repacking is slow on the CPU; one real case keeps it
# A grid over shapes (batch, KV heads, GQA group, head_dim, packed tokens and tail), query
# dtypes, groupings, pack sizes, min_bits, and bit widths: rel 0.5 gives widths of 0..2,
# 0.1 about 4, 0.002 about 9, 0.001 10, 3e-4 and 1e-4 12 to 14 (the kernels' wide path).
CASES = [
    Case(),
    Case(batch=2, kv_heads=2, group=3, head_dim=128, tokens=130, dtype=torch.bfloat16,
         config=PackKVConfig(k_rel=0.5, v_rel=0.5, **_MEDIAN)),
    Case(group=4, tokens=128, config=PackKVConfig(pack_size=64, min_bits=0, k_grouping="token", k_rel=0.002, v_rel=0.001, **_MEDIAN)),
    Case(kv_heads=2, group=3, head_dim=128, tokens=140,
         config=PackKVConfig(block_size=128, pack_size=64, min_bits=8, k_rel=0.001, v_rel=0.05, **_MEDIAN)),
    Case(batch=2, dtype=torch.bfloat16,
         config=PackKVConfig(k_grouping="token", v_grouping="channel", min_bits=8, k_rel=1e-4, v_rel=3e-4, repack="none")),
    Case(kv_heads=3, group=3, tokens=160, real=True, config=PackKVConfig()),
    Case(batch=2, kv_heads=2, group=4, head_dim=128, tokens=96, dtype=torch.bfloat16, real=True,
         config=PackKVConfig(k_grouping="token", v_grouping="channel", pack_size=64, v_rel=0.5, **_MEDIAN)),
]
