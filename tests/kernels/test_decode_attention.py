import sys
from dataclasses import replace

import pytest
import torch
from kernel_cases import ATTENTION_TOL, DEVICE, Case, make_case

from packkv.kernels import decode_attention, decode_attention_reference, qk


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **ATTENTION_TOL[ref.dtype])


def test_decode_attention_matches_reference(case):
    q, kv = make_case(case)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(case.batch, case.kv_heads, kv.n_tokens, generator=g) > 0.3).to(DEVICE)
    assert_attention_close(decode_attention(q, kv), decode_attention_reference(q, kv))
    assert_attention_close(decode_attention(q, kv, mask=mask, splits=2), decode_attention_reference(q, kv, mask=mask))


@pytest.mark.parametrize("tokens", [40, 128])  # only the fp16 tail (no packs); no tail
def test_decode_attention_tail_only_and_no_tail(tokens):
    q, kv = make_case(Case(kv_heads=2, group=2, tokens=tokens))
    assert assert_attention_close(decode_attention(q, kv), decode_attention_reference(q, kv)) is None


def test_decode_attention_scale_and_broadcast_mask():
    q, kv = make_case(Case(batch=2, group=3, tokens=100, dtype=torch.bfloat16))
    mask = torch.ones(2, 1, kv.n_tokens, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 70:] = False
    mask[1, 0, :64] = False
    out = decode_attention(q, kv, sm_scale=0.3, mask=mask)
    assert_attention_close(out, decode_attention_reference(q, kv, sm_scale=0.3, mask=mask))


def test_decode_attention_fully_masked_row_is_zero():
    q, kv = make_case(Case(batch=2, tokens=100))
    mask = torch.ones(2, 1, kv.n_tokens, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = decode_attention(q, kv, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_attention_close(out, decode_attention_reference(q, kv, mask=mask))


def _view_of_larger(t: torch.Tensor, fill: float) -> torch.Tensor:
    """A strided view holding ``t``, inside a larger buffer filled with ``fill``."""
    if t.dim() == 1:
        pool = torch.full((t.numel() + 13,), fill, dtype=t.dtype, device=t.device)
        pool[5 : 5 + t.numel()] = t
        return pool[5 : 5 + t.numel()]
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 3), fill, dtype=t.dtype, device=t.device)
    view = big[..., 1 : 1 + 2 * t.shape[-1] : 2]
    view.copy_(t)
    return view


def test_kernels_read_views_of_larger_tensors():
    q, kv = make_case(Case(kv_heads=2, group=2, tokens=150, dtype=torch.bfloat16))
    as_views = lambda p: replace(p, **{n: _view_of_larger(t, 7) for n, t in p.tensors().items()})
    viewed = replace(kv, k=as_views(kv.k), v=as_views(kv.v),
                     k_tail=_view_of_larger(kv.k_tail, 9), v_tail=_view_of_larger(kv.v_tail, 9))
    q_view = _view_of_larger(q, 3)
    assert not viewed.k.offsets.is_contiguous() and not q_view.is_contiguous()
    assert_attention_close(decode_attention(q_view, viewed), decode_attention_reference(q, kv))
    torch.testing.assert_close(qk(q_view, viewed.k), qk(q, kv.k), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU fallback")
def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    q, kv = make_case(Case(tokens=80))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert torch.equal(decode_attention(q, kv), decode_attention_reference(q, kv))


@pytest.mark.parametrize("make_mask, error", [
    (lambda n: torch.ones(1, 1, n, device=DEVICE), TypeError),  # not bool
    (lambda n: torch.ones(1, 1, n + 1, dtype=torch.bool, device=DEVICE), ValueError),  # wrong length
    (lambda n: torch.ones(1, 3, n, dtype=torch.bool, device=DEVICE), ValueError),  # wrong heads
])
def test_decode_attention_rejects_bad_masks(make_mask, error):
    q, kv = make_case(Case(kv_heads=2, tokens=70))
    with pytest.raises(error):
        decode_attention(q, kv, mask=make_mask(kv.n_tokens))


@pytest.mark.parametrize("splits", [1, 3])
def test_the_folded_merge_equals_the_combining_kernel_and_rearms(monkeypatch, splits):
    """The decode kernel's own merge (its last program per (batch, KV head)) gives the
    separate combining kernel's output bit for bit, and leaves the counter at zero, so that
    a plan's next launch merges again."""
    module = sys.modules["packkv.kernels.decode_attention"]
    q, kv = make_case(Case(batch=2, kv_heads=2, group=3, tokens=200))
    plan = module.DecodePlan(q, kv.k, kv.v, kv.k_tail, kv.v_tail, 0.125, None, splits=splits)
    monkeypatch.setattr(module, "FOLDED_COMBINE", False)
    want = plan.run(q, kv.k_tail.shape[2])
    monkeypatch.setattr(module, "FOLDED_COMBINE", True)
    counter = plan._decode_args[module._decode_kernel.arg_names.index("counter_ptr")]
    for _ in range(2):
        assert torch.equal(plan.run(q, kv.k_tail.shape[2]), want)
        assert not counter.any()
    assert_attention_close(want, decode_attention_reference(q, kv, sm_scale=0.125))
