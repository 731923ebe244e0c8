import pytest
import torch

from packkv import PackKVConfig, compress_kv, decompress_kv
from packkv.codec.quantize import dequantize_blocks


def random_kv(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g) * torch.linspace(0.1, 4, shape[-1])
    v = torch.randn(*shape, generator=g)
    return k.to(dtype), v.to(dtype)


def expected_nbytes(packed):
    total = 0
    for side in (packed.k, packed.v):
        for name in ("words", "offsets", "widths", "mins", "scale", "zero"):
            t = getattr(side, name)
            total += t.numel() * t.element_size()
    return total + 2 * (packed.k_tail.numel() + packed.v_tail.numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 63, 64, 200])
@pytest.mark.parametrize("k_grouping, v_grouping", [("channel", "token"), ("token", "token"), ("channel", "channel")])
def test_round_trip_within_bound(dtype, tokens, k_grouping, v_grouping):
    k, v = random_kv((2, 3, tokens, 64), dtype, seed=tokens)
    config = PackKVConfig(k_grouping=k_grouping, v_grouping=v_grouping)
    packed, perm = compress_kv(k, v, config, return_permutation=True)
    k_out, v_out = decompress_kv(packed)
    assert k_out.shape == k.shape and k_out.dtype == dtype and v_out.dtype == dtype
    full = perm.shape[-1]
    assert full == tokens // 64 * 64
    # The tail is exact (fp16 storage of fp16-representable data).
    assert torch.equal(k_out[:, :, full:].half(), k[:, :, full:].half())
    for src, out, side in ((k, k_out, packed.k), (v, v_out, packed.v)):
        ref = torch.gather(src[:, :, :full].float(), 2, perm.unsqueeze(-1).expand(-1, -1, -1, 64))
        ref = ref.half().float()  # the codec rounds to fp16 first
        deq = out[:, :, :full].float()
        # Step of each element, broadcast from its group.
        scale = side.scale.float()
        if side.grouping == "token":
            step = scale.reshape(*scale.shape[:2], -1, 1)
        else:
            step = scale.unsqueeze(3).expand(-1, -1, -1, 64, -1).reshape(*scale.shape[:2], -1, 64)
        # Plus float rounding: fp32 arithmetic and the cast back to the output dtype.
        out_eps = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-23}[dtype]
        slack = step / 2 + 1e-6 * ref.abs() + deq.abs() * out_eps
        assert ((deq - ref).abs() <= slack).all()


def test_nbytes_counts_every_stored_tensor():
    k, v = random_kv((1, 2, 300, 128))
    packed = compress_kv(k, v, PackKVConfig(block_size=128, pack_size=64, min_bits=8))
    assert packed.nbytes == expected_nbytes(packed)
    assert packed.nbytes == packed.k_nbytes + packed.v_nbytes
    assert packed.fp16_nbytes == 2 * k.numel() * 2
    assert packed.nbytes < packed.fp16_nbytes
    assert packed.shape == tuple(k.shape) and packed.n_tokens == 300


def test_short_input_is_all_tail():
    k, v = random_kv((1, 1, 10, 16))
    packed = compress_kv(k, v)
    assert packed.k.n_packs == 0 and packed.k.words.numel() == 0
    k_out, v_out = decompress_kv(packed)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


@pytest.mark.parametrize(
    "k, v, error, match",
    [
        (torch.zeros(2, 16), torch.zeros(2, 16), ValueError, "shape"),
        (torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 5, 16), ValueError, "shapes differ"),
        (torch.zeros(1, 1, 4, 16, dtype=torch.int32), torch.zeros(1, 1, 4, 16), TypeError, "float16"),
        (torch.zeros(1, 1, 0, 16), torch.zeros(1, 1, 0, 16), ValueError, "empty"),
        (torch.zeros(1, 1, 4, 24), torch.zeros(1, 1, 4, 24), ValueError, "head_dim 24"),
        ([[1.0]], torch.zeros(1, 1, 4, 16), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(k, v, error, match):
    with pytest.raises(error, match=match):
        compress_kv(k, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e6])
def test_non_finite_or_out_of_range_names_location(bad):
    k, v = random_kv((1, 2, 70, 16), torch.float32)
    v[0, 1, 33, 5] = bad
    with pytest.raises(ValueError, match="v has .*batch 0, head 1, token 33, channel 5"):
        compress_kv(k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    k, v = random_kv((1, 2, 256, 64))
    config = PackKVConfig(repack="median")
    cpu = compress_kv(k, v, config)
    gpu = compress_kv(k.cuda(), v.cuda(), config)
    assert torch.equal(gpu.k.words.cpu(), cpu.k.words)
    assert torch.equal(decompress_kv(gpu)[0].cpu(), decompress_kv(cpu)[0])
