"""KIVI and per-token intN: exact byte counts and the error bound on fresh random data."""

import math

import pytest
import torch

from packkv.baselines import BASELINES, GroupQuant, dequantize_groups, kivi, per_token_int, quantize_groups


def _kv(seed=0, shape=(2, 3, 128, 64)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3 + 0.5, torch.randn(*shape, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 32), ("token", 64), ("channel", 32), ("channel", 64)])
def test_error_within_half_step(bits, axis, group):
    x, _ = _kv(bits)
    q, scale, zero = quantize_groups(x, bits, axis, group)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    x_hat = dequantize_groups(q, scale, zero, x.shape, axis)
    x16 = x.half().float()
    # Half a step per group, mapped back to [b, h, t, d].
    half = (scale.float() / 2).unsqueeze(-1).expand(q.shape)
    half = half.reshape(x.shape) if axis == "token" else half.reshape(2, 3, 64, 128).transpose(2, 3)
    assert ((x_hat - x16).abs() <= half * (1 + 1e-5) + 1e-6).all()


def test_groups_follow_the_axis():
    x, _ = _kv()
    _, scale_t, _ = quantize_groups(x, 4, "token", 32)
    _, scale_c, _ = quantize_groups(x, 4, "channel", 32)
    assert scale_t.shape == (2, 3, 128, 2)  # per token: head_dim 64 / 32
    assert scale_c.shape == (2, 3, 64, 4)  # per channel: 128 tokens / 32


@pytest.mark.parametrize("method,bits_per_value", [(kivi(2), 3), (kivi(4), 5), (per_token_int(4), 4.5), (per_token_int(2), 2.5)])
def test_byte_counts_exact(method, bits_per_value):
    k, v = _kv()
    out = method.roundtrip(k, v)
    # payload bits + fp16 scale and zero (32 bits) per group.
    assert out.k_nbytes == out.v_nbytes == k.numel() * bits_per_value / 8
    assert out.k_nbytes == math.ceil(k.numel() * method.bits / 8) + k.numel() // method.group * 4
    assert out.k.shape == k.shape and out.v.dtype == v.dtype


def test_kivi_axes_and_labels():
    assert (kivi(2).k_axis, kivi(2).v_axis, kivi(2).group) == ("channel", "token", 32)
    assert per_token_int(4).label == "int4-g64" and set(BASELINES) >= {"kivi-2", "kivi-4", "int4-g64", "int2-g64", "fp8", "fp16"}


def test_more_bits_smaller_error():
    k, v = _kv(3)
    errs = [(kivi(b).roundtrip(k, v).k - k).abs().mean() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_constant_group_is_exact():
    x = torch.full((1, 1, 32, 64), 1.5)
    q, scale, zero = quantize_groups(x, 2, "channel", 32)
    assert torch.equal(dequantize_groups(q, scale, zero, x.shape, "channel"), x)


def test_bad_arguments():
    x, _ = _kv()
    with pytest.raises(ValueError, match="axis"):
        quantize_groups(x, 4, "row", 32)
    with pytest.raises(ValueError, match="group 48"):
        quantize_groups(x, 4, "token", 48)
    with pytest.raises(ValueError, match="bits"):
        quantize_groups(x, 9, "token", 32)
    with pytest.raises(ValueError, match="group 100"):
        GroupQuant("x", 2, "channel", "token", 100).roundtrip(x, x)
