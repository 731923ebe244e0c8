"""The Gluon V product (pv_gluon.py): which inputs it serves, that it compiles for sm_90 on
the installed Triton (on any machine: the layouts' conversions are checked at compile
time), and, on a GPU (PACKKV_TEST_DEVICE=cuda), that it matches pv_reference."""

import functools
import importlib

import pytest
import torch
from kernel_cases import DEVICE, V_PRODUCT_RTOL, Case, assert_product_close, kv_data, packed_side, spaced_steps
from sm90 import compile_sm90

from packkv import PackKVConfig, compress_kv
from packkv.kernels import _common, pv, pv_reference

pv_module = importlib.import_module("packkv.kernels.pv")
gluon_kernel = pv_module._gluon
needs_gluon = pytest.mark.skipif(gluon_kernel is None, reason="this Triton has no usable Gluon")
on_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PACKKV_TEST_DEVICE=cuda")


packed_v = functools.partial(packed_side, "v")


@needs_gluon
def test_serves_only_the_default_format():
    cuda = torch.device("cuda")
    v = packed_v()
    assert v.width_bound <= gluon_kernel.MAX_PLANES
    if _common.use_asm(cuda):
        assert gluon_kernel.supported(v, 4, cuda)
    assert not gluon_kernel.supported(v, 4, torch.device("cpu"))
    assert not gluon_kernel.supported(v, 9, cuda)  # a GQA group wider than the B operand
    for other in (dict(v_grouping="channel"), dict(pack_size=64), dict(min_bits=8), dict(v_rel=0.05)):
        assert not gluon_kernel.supported(packed_v(PackKVConfig(**other)), 4, cuda), other


@needs_gluon
def test_steps_token_after_token():
    """The kernels address a token's step and zero at offset t where the storage allows."""
    v = packed_v()
    assert gluon_kernel.flat_steps(v)
    assert not gluon_kernel.flat_steps(spaced_steps(v))


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiles_for_sm90(head_dim):
    """Offline for an H100 with this Triton (sm90.py): tensor-core MMAs within the register
    cap of SETTINGS."""
    tile_words, cap = gluon_kernel.SETTINGS[head_dim]
    result = compile_sm90(f"""
from packkv.kernels import pv_gluon as g
fn = g._pv_gluon_kernel
mma, word_lanes, meta, weights = g.layouts({head_dim}, {tile_words}, {head_dim // 32})
consts = dict(GROUP=4, D={head_dim}, BLOCK=64, TW={tile_words}, NPLANES=3, FLAT=True, MMA=mma, WQ=word_lanes, META=meta, WB=weights)
pointers = {{"p_ptr": "*fp16", "part_ptr": "*fp32", "words_ptr": "*i32", "offsets_ptr": "*i32",
            "widths_ptr": "*u8", "mins_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16"}}
options = {{"num_warps": {head_dim // 32}, "maxnreg": {cap}}}
""")
    assert result["mma"] and result["registers"] <= cap, result


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,heads,group,tokens", [(1, 1, 1, 32), (1, 2, 4, 200), (2, 3, 3, 1000), (1, 8, 8, 4130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_on_gpu(head_dim, batch, heads, group, tokens, dtype):
    v = packed_v(batch=batch, heads=heads, head_dim=head_dim, tokens=tokens, seed=tokens).to(DEVICE)
    assert gluon_kernel.supported(v, group, DEVICE)
    g = torch.Generator().manual_seed(tokens)
    p = torch.softmax(torch.randn(batch, heads * group, v.n_tokens, generator=g) * 3, -1).to(DEVICE, dtype)
    for splits in (None, 1, 3):
        assert_product_close(gluon_kernel.pv_gluon(p, v, splits), pv_reference(p, v), V_PRODUCT_RTOL)
    assert_product_close(pv(p, v), pv_reference(p, v), V_PRODUCT_RTOL)  # pv() dispatches here


@on_gpu
@needs_gluon
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_rescales_weights_of_any_size(scale):
    """Weights far from 1 (not softmax): the per-row power of two keeps them in fp16's range."""
    v = packed_v(head_dim=128, tokens=300).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    p = (torch.rand(1, 8, v.n_tokens, generator=g) * scale).to(DEVICE)
    assert_product_close(gluon_kernel.pv_gluon(p, v), pv_reference(p, v), V_PRODUCT_RTOL)


@on_gpu
@needs_gluon
def test_real_kv_matches_reference():
    case = Case(kv_heads=3, group=3, tokens=160, real=True, config=PackKVConfig())
    k, v = kv_data(case, 0)
    packed = compress_kv(k, v, case.config).v.to(DEVICE)
    assert gluon_kernel.supported(packed, 3, DEVICE)
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(1, 9, packed.n_tokens, generator=g) * 3, -1).to(DEVICE)
    assert_product_close(gluon_kernel.pv_gluon(p, packed), pv_reference(p, packed), V_PRODUCT_RTOL)


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_spaced_steps_match_reference(head_dim):
    """Steps and zeros not token after token: the general addressing (gaps hold NaN)."""
    v = spaced_steps(packed_v(heads=3, head_dim=head_dim, tokens=700).to(DEVICE))
    assert not gluon_kernel.flat_steps(v)
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(1, 6, v.n_tokens, generator=g) * 3, -1).to(DEVICE)
    assert_product_close(gluon_kernel.pv_gluon(p, v), pv_reference(p, v), V_PRODUCT_RTOL)
