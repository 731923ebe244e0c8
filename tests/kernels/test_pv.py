import pytest
import torch
from kernel_cases import V_PRODUCT_RTOL, Case, assert_product_close, make_case

from packkv.kernels import pv, pv_reference


def weights(q: torch.Tensor, n_tokens: int, seed: int = 2) -> torch.Tensor:
    """Softmax-like positive weights ``[batch, q_heads, n_tokens]``, fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(q.shape[0], q.shape[1], n_tokens, generator=g) * 3, dim=-1).to(q.device)


def test_pv_matches_reference(case):
    q, kv = make_case(case)
    p = weights(q, kv.v.n_tokens)
    for splits in (None, 2):
        assert_product_close(pv(p, kv.v, splits=splits), pv_reference(p, kv.v), V_PRODUCT_RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pv_reads_low_precision_weights(dtype):
    q, kv = make_case(Case(group=2))
    p = weights(q, kv.v.n_tokens).to(dtype)
    assert_product_close(pv(p, kv.v), pv_reference(p, kv.v), V_PRODUCT_RTOL)


def test_pv_without_packs_is_zero():
    q, kv = make_case(Case(tokens=40))
    assert torch.equal(pv(weights(q, 0), kv.v), torch.zeros(1, 1, 64, device=q.device))


def test_pv_rejects_wrong_token_count():
    q, kv = make_case(Case())
    with pytest.raises(ValueError, match="n_tokens"):
        pv(weights(q, kv.v.n_tokens + 1), kv.v)
