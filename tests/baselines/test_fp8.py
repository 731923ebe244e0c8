"""fp8 e4m3 with a per-tensor scale, and the fp16 reference."""

import torch

from packkv.baselines import Fp8PerTensor, Fp16
from packkv.baselines.fp8 import E4M3_MAX, fp8_roundtrip


def test_fp8_bytes_and_relative_error():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 3, 64, 64, generator=g) * 5, torch.randn(2, 3, 64, 64, generator=g)
    out = Fp8PerTensor().roundtrip(k, v)
    assert out.k_nbytes == out.v_nbytes == k.numel() + 4
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 for normal values.
    scale = k.abs().max() / E4M3_MAX
    normal = k.abs() >= scale * 2**-6
    assert ((out.k - k).abs()[normal] <= k.abs()[normal] * 2**-4 + 1e-6).all()
    assert ((out.k - k).abs()[~normal] <= scale * 2**-10).all()
    assert out.k.abs().max() == k.abs().max()  # the largest value maps to 448 exactly


def test_fp8_zero_tensor():
    x = torch.zeros(1, 1, 64, 16)
    y, n = fp8_roundtrip(x)
    assert torch.equal(y, x) and n == x.numel() + 4


def test_fp16_is_rounding_only():
    k = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(2))
    out = Fp16().roundtrip(k, k)
    assert torch.equal(out.k, k.half().float()) and out.k_nbytes == k.numel() * 2
