import pytest
import torch
from kernel_cases import Case, assert_product_close, make_case

from packkv import PackKVConfig, compress_kv
from packkv.kernels import qk, qk_reference


def test_qk_matches_reference(case):
    q, kv = make_case(case)
    for splits in (None, 2):
        assert_product_close(qk(q, kv.k, splits=splits), qk_reference(q, kv.k))


def test_qk_without_packs_is_empty():
    q, kv = make_case(Case(tokens=40))
    assert qk(q, kv.k).shape == (1, 1, 0)


@pytest.mark.parametrize("bad, error", [
    (lambda q: q.float(), TypeError),  # dtype
    (lambda q: q[:, :, :32], ValueError),  # head_dim differs from the cache
    (lambda q: q[:, :1], ValueError),  # q_heads not a multiple of kv_heads
    (lambda q: q[0], ValueError),  # not [batch, q_heads, head_dim]
])
def test_qk_rejects_bad_queries(bad, error):
    q, kv = make_case(Case(kv_heads=2, group=2, tokens=64))
    with pytest.raises(error):
        qk(bad(q), kv.k)


def test_qk_rejects_head_dim_96():
    k = torch.randn(1, 1, 64, 96)
    kv = compress_kv(k, k, PackKVConfig(repack="none"))
    with pytest.raises(ValueError, match="head_dim"):
        qk(torch.randn(1, 1, 96).half(), kv.k)
