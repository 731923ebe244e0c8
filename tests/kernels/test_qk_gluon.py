"""The Gluon K product (qk_gluon.py): which inputs it serves, that it compiles for sm_90 on
the installed Triton (on any machine: the layouts' conversions are checked at compile
time), and, on a GPU (PACKKV_TEST_DEVICE=cuda), that it matches qk_reference."""

import functools
import importlib

import pytest
import torch
from kernel_cases import DEVICE, Case, assert_product_close, kv_data, packed_side, spaced_steps
from sm90 import compile_sm90

from packkv import PackKVConfig, compress_kv
from packkv.kernels import qk, qk_reference

qk_module = importlib.import_module("packkv.kernels.qk")
gluon_kernel = qk_module._gluon
needs_gluon = pytest.mark.skipif(gluon_kernel is None, reason="this Triton has no usable Gluon")
on_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PACKKV_TEST_DEVICE=cuda")


packed_k = functools.partial(packed_side, "k")


@needs_gluon
def test_serves_only_the_default_format():
    cuda = torch.device("cuda")
    k = packed_k()
    assert k.width_bound <= gluon_kernel.K_MAX_PLANES
    assert not gluon_kernel.supported(k, 4, torch.device("cpu"))
    assert not gluon_kernel.supported(k, 9, cuda)  # a GQA group wider than the B operand
    for other in (dict(k_grouping="channel"), dict(pack_size=64), dict(min_bits=8), dict(k_rel=0.001)):
        assert not gluon_kernel.supported(packed_k(PackKVConfig(**other)), 4, cuda), other


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiles_for_sm90(head_dim):
    """Offline for an H100 with this Triton (sm90.py): tensor-core MMAs, for widths of 8 bits
    (the most it unpacks)."""
    tile_words = gluon_kernel.SETTINGS[head_dim][0]
    result = compile_sm90(f"""
from packkv.kernels import qk_gluon as g
fn = g._qk_gluon_kernel
mma, word_lanes, meta, _ = g.layouts({head_dim}, {tile_words}, {head_dim // 32})
consts = dict(GROUP=4, D={head_dim}, BLOCK=64, TW={tile_words}, NPLANES=8, FLAT=True, MMA=mma, WQ=word_lanes, META=meta)
pointers = {{"q_ptr": "*bf16", "out_ptr": "*fp32", "words_ptr": "*i32", "offsets_ptr": "*i32",
            "widths_ptr": "*u8", "mins_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16"}}
options = {{"num_warps": {head_dim // 32}}}
""")
    assert result["mma"], result


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,heads,group,tokens", [(1, 1, 1, 64), (1, 2, 4, 200), (2, 3, 3, 1000), (1, 8, 8, 4130)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_on_gpu(head_dim, batch, heads, group, tokens, dtype):
    k = packed_k(batch=batch, heads=heads, head_dim=head_dim, tokens=tokens, seed=tokens).to(DEVICE)
    assert gluon_kernel.supported(k, group, DEVICE)
    g = torch.Generator().manual_seed(tokens)
    q = (torch.randn(batch, heads * group, head_dim, generator=g) * 3).to(DEVICE, dtype)
    for splits in (None, 1, 3):
        assert_product_close(gluon_kernel.qk_gluon(q, k, splits), qk_reference(q, k))
    assert_product_close(qk(q, k), qk_reference(q, k))  # qk() dispatches here


@on_gpu
@needs_gluon
def test_no_packed_token():
    """Fewer tokens than a block: nothing is packed, the scores are empty."""
    k = packed_k(tokens=32).to(DEVICE)
    assert k.n_tokens == 0
    q = torch.randn(1, 2, 64).to(DEVICE, torch.float16)
    assert gluon_kernel.qk_gluon(q, k).shape == (1, 2, 0)


@on_gpu
@needs_gluon
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_queries_of_any_size(scale):
    """A bf16 query far from 1: the per-column power of two keeps it in fp16's range."""
    k = packed_k(head_dim=128, tokens=300).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 8, 128, generator=g) * scale).to(DEVICE, torch.bfloat16)
    assert_product_close(gluon_kernel.qk_gluon(q, k), qk_reference(q, k))


@on_gpu
@needs_gluon
def test_real_kv_matches_reference():
    case = Case(kv_heads=3, group=3, tokens=160, real=True, config=PackKVConfig())
    k, v = kv_data(case, 0)
    packed = compress_kv(k, v, case.config).k.to(DEVICE)
    assert gluon_kernel.supported(packed, 3, DEVICE)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 64, generator=g).to(DEVICE, torch.float16)
    assert_product_close(gluon_kernel.qk_gluon(q, packed), qk_reference(q, packed))


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_spaced_steps_match_reference(head_dim):
    """Steps and zeros not token after token: the general addressing (gaps hold NaN)."""
    k = spaced_steps(packed_k(heads=3, head_dim=head_dim, tokens=700).to(DEVICE))
    assert not gluon_kernel.flat_steps(k)
    q = torch.randn(1, 6, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    assert_product_close(gluon_kernel.qk_gluon(q, k), qk_reference(q, k))
