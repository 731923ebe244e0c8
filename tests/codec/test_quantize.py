import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from packkv.codec.quantize import dequantize_blocks, level_bits, quantize_blocks, round_up_fp16


def assert_within_bound(x, rel, grouping):
    q, scale, zero = quantize_blocks(x, rel, grouping)
    xf = x.to(torch.float16).float()
    err = (dequantize_blocks(q, scale, zero, grouping) - xf).abs()
    dim = -1 if grouping == "token" else -2
    bound = scale.float().unsqueeze(dim) / 2 + 2e-7 * xf.abs().amax(dim=dim, keepdim=True)
    assert (err <= bound).all(), float((err - bound).max())
    lo, hi = xf.amin(dim=dim), xf.amax(dim=dim)
    # The step honours rel: never smaller than rel x range (but for the fp16 cap), so q
    # stays within 1/rel + 1/2.
    assert (scale.float() >= (rel * (hi - lo)).clamp(max=65504.0)).all()
    assert q.min() >= 0 and q.max() <= int(1 / rel) + 1
    return q, scale


@pytest.mark.parametrize("grouping", ["token", "channel"])
@pytest.mark.parametrize("rel", [1e-4, 0.03, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_bound_random(grouping, rel, dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 3, 4, 32, 64, generator=g) * torch.rand(64, generator=g) * 5).to(dtype)
    assert_within_bound(x, rel, grouping)


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_error_bound_adversarial(grouping):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 1, 6, 32, 32, generator=g)
    base[0, 0, 0] = 3.25  # constant block: exact
    base[0, 0, 1, 5, 7] = 60000.0  # one huge outlier
    base[0, 0, 2] = torch.randn(32, 32, generator=g) * 1e-7  # subnormal fp16 values
    base[0, 0, 3] = 65504.0 * torch.sign(torch.randn(32, 32, generator=g))  # +-fp16 max
    base[0, 0, 4, :, :] = -65504.0
    base[0, 0, 5] = torch.linspace(-65504, 65504, 32 * 32).view(32, 32)
    for rel in (1e-4, 0.1, 1.0):
        q, _ = assert_within_bound(base.half(), rel, grouping)
    deq = dequantize_blocks(*quantize_blocks(base.half(), 0.1, grouping), grouping)
    assert torch.equal(deq[0, 0, 0], base[0, 0, 0].half().float())
    assert torch.equal(deq[0, 0, 4], base[0, 0, 4].half().float())


@settings(max_examples=60, deadline=None)
@given(
    x=arrays("float16", (1, 2, 2, 8, 16), elements=st.floats(-65504, 65504, width=16, allow_nan=False)),
    rel=st.floats(1e-4, 1.0),
    grouping=st.sampled_from(["token", "channel"]),
)
def test_error_bound_property(x, rel, grouping):
    assert_within_bound(torch.from_numpy(x.copy()), rel, grouping)


def test_round_up_fp16():
    x = torch.tensor([0.0, 1e-9, 0.1, 1.0, 65504.0, 1e6])
    y = round_up_fp16(x)
    assert y.dtype == torch.float16
    assert (y.float() >= torch.minimum(x, torch.tensor(65504.0))).all()
    assert y[1] > 0 and y[3] == 1.0 and y[5] == 65504.0


@pytest.mark.parametrize("rel", [1.0, 0.5, 1 / 3, 0.15, 0.05, 1 / 255, 1 / 256, 0.002, 1e-4])
@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_level_bits_bounds_every_integer(rel, grouping):
    # Random data, plus ranges whose step hits the fp16 maximum (a step clamped to 65504).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 32, 16, generator=g) * torch.logspace(-6, 4, 16)
    x[0, 0, 0] = torch.where(torch.rand(32, 16, generator=g) > 0.5, 65504.0, -65504.0)
    q, _, _ = quantize_blocks(x.half().float(), rel, grouping)
    assert int(q.max()).bit_length() <= level_bits(rel)
