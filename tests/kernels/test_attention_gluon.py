"""The Gluon decode attention (attention_gluon.py): which inputs it serves, that it takes the
Triton decode kernel's arguments, that it compiles for sm_90 with the installed Triton (on
any machine), and, on a GPU (PACKKV_TEST_DEVICE=cuda), that it matches
decode_attention_reference: packed blocks and tails of every length, masks, GQA groups up to
8, fp16/bf16, splits, the appended token, the folded merge, V steps far from 1, real KV."""

import importlib
from dataclasses import replace

import pytest
import torch
from kernel_cases import ATTENTION_TOL, DEVICE, Case, kv_data, make_case, spaced_steps
from sm90 import compile_sm90

from packkv import PackKVConfig, compress_kv
from packkv.kernels import _common, decode_attention, decode_attention_reference

module = importlib.import_module("packkv.kernels.decode_attention")
gluon_kernel = module._gluon
needs_gluon = pytest.mark.skipif(gluon_kernel is None, reason="this Triton has no usable Gluon")
on_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PACKKV_TEST_DEVICE=cuda")


def packed(config: PackKVConfig = PackKVConfig(), **shape):
    case = Case(config=config, **shape)
    return compress_kv(*kv_data(case, 0), config)


@needs_gluon
def test_serves_only_the_default_format():
    cuda = torch.device("cuda")
    kv = packed()
    if _common.use_asm(cuda):
        assert gluon_kernel.supported(kv.k, kv.v, 8, torch.float16, cuda)
        assert gluon_kernel.supported(kv.k, kv.v, 1, torch.bfloat16, cuda)
    assert not gluon_kernel.supported(kv.k, kv.v, 4, torch.float16, torch.device("cpu"))
    assert not gluon_kernel.supported(kv.k, kv.v, 9, torch.float16, cuda)  # wider than the B operand
    assert not gluon_kernel.supported(kv.k, kv.v, 4, torch.float32, cuda)
    for other in (dict(k_grouping="channel"), dict(v_grouping="channel"), dict(pack_size=64), dict(min_bits=8),
                  dict(k_rel=0.002), dict(v_rel=0.05)):
        other_kv = packed(PackKVConfig(**other))
        assert not gluon_kernel.supported(other_kv.k, other_kv.v, 4, torch.float16, cuda), other


@needs_gluon
def test_takes_the_triton_kernels_arguments():
    """DecodePlan sets the same positions of either kernel's argument list."""
    names = module._decode_kernel.arg_names
    runtime = names[: names.index("GROUP")]
    assert gluon_kernel._attention_kernel.arg_names[: len(runtime)] == runtime
    assert gluon_kernel._attention_kernel.arg_names[len(runtime)] == "GROUP"


@needs_gluon
@pytest.mark.parametrize("head_dim,mask,tail", [(64, False, "fp16"), (128, True, "fp16"), (128, False, "bf16")])
def test_compiles_for_sm90(head_dim, mask, tail):
    """Offline for an H100 with this Triton (sm90.py): tensor-core MMAs within the register
    cap of SETTINGS, for widths of 8 bits (K) and 4 (V), the most the kernel unpacks."""
    cap = gluon_kernel.SETTINGS[head_dim][1]
    result = compile_sm90(f"""
from types import SimpleNamespace
import torch
from packkv.kernels import attention_gluon as g
fn = g._attention_kernel
steps = dict(scale=torch.empty(1, 1, 2, 64), zero=torch.empty(1, 1, 2, 64))
k = SimpleNamespace(head_dim={head_dim}, block_size=64, width_bound=8, **steps)
v = SimpleNamespace(head_dim={head_dim}, block_size=64, width_bound=4, **steps)
_, _, options, consts, _ = g.launch_config(k, v, 4, {mask}, {tail == "bf16"})
pointers = dict(q_ptr="*fp16", m_part="*fp32", l_part="*fp32", acc_part="*fp32", counter_ptr="*i32",
                out_ptr="*fp16", kw_ptr="*i32", ko_ptr="*i32", kwd_ptr="*u8", kmn_ptr="*u8", ks_ptr="*fp16",
                kz_ptr="*fp16", vw_ptr="*i32", vo_ptr="*i32", vwd_ptr="*u8", vmn_ptr="*u8", vs_ptr="*fp16",
                vz_ptr="*fp16", kt_ptr="*{tail}", vt_ptr="*{tail}", mask_ptr="*u8", kn_ptr="*{tail}",
                vn_ptr="*{tail}", qk_scale="fp32")
""")
    assert result["mma"] and result["registers"] <= cap, result


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **ATTENTION_TOL[ref.dtype])


def with_tail(kv, length: int, seed: int):
    """``kv`` with a fresh random tail of ``length`` tokens in its dtype."""
    g = torch.Generator().manual_seed(seed)
    b, h, _, d = kv.shape
    tail = lambda: torch.randn(b, h, length, d, generator=g).to(kv.k_tail.dtype).to(DEVICE)
    return replace(kv, k_tail=tail(), v_tail=tail())


def uses_gluon(q, kv, mask=None) -> bool:
    plan = module.DecodePlan(q, kv.k, kv.v, kv.k_tail, kv.v_tail, 0.1, mask, None)
    return plan._kernel is gluon_kernel._attention_kernel


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,heads,group,tokens,tail", [
    (1, 1, 1, 64, 0), (1, 2, 4, 300, 1), (2, 3, 3, 1000, 65), (1, 8, 8, 4130, 192), (2, 1, 5, 0, 40),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_on_gpu(head_dim, batch, heads, group, tokens, tail, dtype):
    # tokens 0: fewer than a block, so none is packed; the tail only
    case = Case(batch=batch, kv_heads=heads, group=group, head_dim=head_dim, tokens=tokens or 40, dtype=dtype,
                config=PackKVConfig())
    q, kv = make_case(case, tokens)
    assert kv.k.n_tokens == tokens // 64 * 64
    kv = with_tail(replace(kv, k_tail=kv.k_tail.to(dtype), v_tail=kv.v_tail.to(dtype)), tail, tokens)
    assert uses_gluon(q, kv)
    g = torch.Generator().manual_seed(tokens)
    mask = (torch.rand(batch, heads, kv.n_tokens, generator=g) > 0.3).to(DEVICE)
    for splits in (None, 1, 3):
        assert_attention_close(decode_attention(q, kv, splits=splits), decode_attention_reference(q, kv))
    assert_attention_close(decode_attention(q, kv, sm_scale=0.3, mask=mask), decode_attention_reference(q, kv, 0.3, mask))


@on_gpu
@needs_gluon
def test_fp16_query_over_a_bf16_tail():
    """The query in two bf16 halves for the tail's scores: fp16 precision kept."""
    q, kv = make_case(Case(kv_heads=2, group=4, head_dim=128, tokens=200, config=PackKVConfig()))
    kv = with_tail(replace(kv, k_tail=kv.k_tail.bfloat16(), v_tail=kv.v_tail.bfloat16()), 100, 3)
    q = q * 300  # large scores: a query rounded to bf16 would move them visibly
    assert uses_gluon(q, kv)
    assert_attention_close(decode_attention(q, kv, sm_scale=0.01), decode_attention_reference(q, kv, 0.01))


@on_gpu
@needs_gluon
@pytest.mark.parametrize("scale", [1e-4, 3e3])
def test_v_steps_far_from_one(scale):
    """V's steps times the weights stay inside fp16 (no overflow, no subnormals) for any step."""
    case = Case(kv_heads=2, group=4, head_dim=128, tokens=600, config=PackKVConfig())
    k, v = kv_data(case, 7)
    kv = compress_kv(k, (v.float() * scale).half(), case.config).to(DEVICE)
    q = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    assert kv.v.scale.float().max() * 256 > 65504 or scale < 1
    assert uses_gluon(q, kv)
    assert_attention_close(decode_attention(q, kv) / scale, decode_attention_reference(q, kv) / scale)


@on_gpu
@needs_gluon
def test_fully_masked_row_is_zero():
    q, kv = make_case(Case(batch=2, kv_heads=2, group=2, head_dim=128, tokens=300, config=PackKVConfig()))
    mask = torch.ones(2, 1, kv.n_tokens, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[0, 0, :250] = False
    assert uses_gluon(q, kv, mask)
    out = decode_attention(q, kv, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_attention_close(out, decode_attention_reference(q, kv, mask=mask))


@on_gpu
@needs_gluon
@pytest.mark.parametrize("splits", [1, 3, 40])
@pytest.mark.parametrize("tokens", [3000, 5000])  # with 40 splits: one level, two levels
def test_plan_appends_merges_and_rearms(monkeypatch, splits, tokens):
    """Through DecodePlan, as a cache's decode step runs it: the new token written into the
    tail by the launch, the folded merge (in two levels past FAN_IN splits) equal to the
    combining kernel, and the counters back at zero for the next launch."""
    q, kv = make_case(Case(batch=2, kv_heads=2, group=3, head_dim=64, tokens=tokens, config=PackKVConfig()))
    kv = with_tail(kv, 40, 9)
    storage = [torch.zeros(2, 2, 64, 64, dtype=torch.float16, device=DEVICE) for _ in range(2)]
    for s, t in zip(storage, (kv.k_tail, kv.v_tail)):
        s[:, :, :39] = t[:, :, :39]
    plan = module.DecodePlan(q, kv.k, kv.v, *storage, 0.125, None, splits=splits)
    assert plan._kernel is gluon_kernel._attention_kernel
    new = [t[:, :, 39:40] for t in (kv.k_tail, kv.v_tail)]
    want = decode_attention_reference(q, kv, sm_scale=0.125)
    monkeypatch.setattr(module, "FOLDED_COMBINE", False)
    separate = plan.run(q, 40, *new)
    assert torch.equal(storage[0][:, :, :40], kv.k_tail) and torch.equal(storage[1][:, :, :40], kv.v_tail)
    assert_attention_close(separate, want)
    monkeypatch.setattr(module, "FOLDED_COMBINE", True)
    counter = plan._decode_args[module._decode_kernel.arg_names.index("counter_ptr")]
    n_split = plan._grids[0][1]
    assert counter.numel() == 2 * 2 * gluon_kernel.counters(n_split)
    assert (n_split > gluon_kernel.FAN_IN) == (splits == 40 and tokens == 5000)
    for _ in range(2):
        assert_attention_close(plan.run(q, 40), separate)  # the same sums in another order
        assert not counter.any()


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_real_kv_matches_reference(head_dim):
    q, kv = make_case(Case(kv_heads=2, group=4, head_dim=head_dim, tokens=160, real=True, config=PackKVConfig()))
    assert uses_gluon(q, kv)
    assert_attention_close(decode_attention(q, kv), decode_attention_reference(q, kv))


@on_gpu
@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_spaced_steps_match_reference(head_dim):
    """Steps and zeros not token after token: the general addressing (gaps hold NaN)."""
    q, kv = make_case(Case(kv_heads=2, group=4, head_dim=head_dim, tokens=700, config=PackKVConfig()))
    kv = with_tail(replace(kv, k=spaced_steps(kv.k), v=spaced_steps(kv.v)), 20, 4)
    assert not gluon_kernel.flat_steps(kv.k) and uses_gluon(q, kv)
    assert_attention_close(decode_attention(q, kv), decode_attention_reference(q, kv))
