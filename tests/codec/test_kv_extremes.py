"""The NaN/Inf policy and extreme magnitudes (docs/format.md, "Guarantees")."""

import pytest
import torch

from packkv import PackKVConfig, compress_kv, decompress_kv
from packkv.store import PackedStore

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal
CONFIGS = {
    "channel-token": PackKVConfig(block_size=32, pack_size=32, k_rel=0.1, v_rel=0.6),
    "token-channel": PackKVConfig(block_size=64, pack_size=32, k_grouping="token", v_grouping="channel",
                                  k_rel=0.24, v_rel=1.0, min_bits=8, repack="median"),
}


def extreme(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g) * 2 - 1
    if kind == "fp16 max":
        # Both ends of the fp16 range in every block, token and channel.
        x = x * FP16_MAX
        x[..., 0::7, :] = FP16_MAX
        x[..., 3::7, :] = -FP16_MAX
        x[..., 0::5] = FP16_MAX
    elif kind == "subnormal":
        x = (x * 200).round() * FP16_TINY  # multiples of the smallest subnormal, below 2**-14
    elif kind == "constant":
        x = torch.full(shape, 3.140625)
        x[..., 64:, :] = -FP16_MAX
    elif kind == "mixed":
        x = x * torch.logspace(-7, 4.8, shape[-2]).view(-1, 1)  # tokens from 1e-7 to 6e4
    return x


def step_per_element(side, tokens: int, head_dim: int) -> torch.Tensor:
    scale = side.scale.float()
    if side.grouping == "token":
        return scale.reshape(*scale.shape[:2], -1, 1)
    return scale.unsqueeze(3).expand(-1, -1, -1, side.block_size, -1).reshape(*scale.shape[:2], tokens, head_dim)


@pytest.mark.parametrize("kind", ["fp16 max", "subnormal", "constant", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_extreme_magnitudes_within_bound(kind, dtype, config):
    shape = (1, 2, 128 + 5, 16)
    k = extreme(kind, shape, 0).to(dtype)
    v = extreme(kind, shape, 1).to(dtype)
    if dtype == torch.bfloat16:
        # bf16 rounds 65504 up to 65536, past the fp16 range the codec accepts.
        k, v = k.clamp(-65280, 65280), v.clamp(-65280, 65280)
    packed, perm = compress_kv(k, v, config, return_permutation=True)
    k_out, v_out = decompress_kv(packed)
    full = perm.shape[-1]
    out_eps = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-23}[dtype]
    for src, out, side in ((k, k_out, packed.k), (v, v_out, packed.v)):
        assert torch.isfinite(out).all()
        ref = torch.gather(src[:, :, :full].float(), 2, perm.unsqueeze(-1).expand(-1, -1, -1, 16)).half().float()
        deq = out[:, :, :full].float()
        step = step_per_element(side, full, 16)
        # The bound, fp32 arithmetic, rounding to the output dtype (relative, and absolute
        # for fp16 subnormals).
        slack = step / 2 + 1e-6 * ref.abs() + deq.abs() * out_eps + FP16_TINY / 2
        assert ((deq - ref).abs() <= slack).all()
        assert torch.equal(out[:, :, full:].half(), src[:, :, full:].half())
        if kind == "constant":
            assert torch.equal(deq, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_is_rejected_naming_the_position(bad, dtype):
    k = torch.randn(2, 3, 40, 16).to(dtype)
    v = torch.randn(2, 3, 40, 16).to(dtype)
    k[1, 2, 37, 9] = bad
    where = r"k has a non-finite value \(?(nan|inf|-inf)\)? at batch 1, head 2, token 37, channel 9"
    with pytest.raises(ValueError, match=where):
        compress_kv(k, v, PackKVConfig(block_size=32, pack_size=32))
    # The same row through the growing store: one block whose token 5 is the bad one.
    store = PackedStore(PackKVConfig(block_size=32, pack_size=32))
    block_k = torch.cat([k[:, :, 32:], k[:, :, :24]], dim=2)
    block_v = torch.cat([v[:, :, 32:], v[:, :, :24]], dim=2)
    with pytest.raises(ValueError, match=r"k has a non-finite value .* batch 1, head 2, token 5, channel 9"):
        store.append(block_k, block_v)
    assert store.is_empty
