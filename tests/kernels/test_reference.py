import torch
import torch.nn.functional as F
from kernel_cases import Case, make_case

from packkv import decompress_kv
from packkv.kernels import decode_attention_reference, pv_reference, qk_reference


def test_references_agree_with_sdpa_on_the_decompressed_cache():
    """GQA head mapping, default scale, mask and tail order, against torch's SDPA."""
    q, kv = make_case(Case(batch=2, kv_heads=2, group=3, tokens=100))
    k, v = (x.float().repeat_interleave(3, dim=1) for x in decompress_kv(kv))
    mask = (torch.rand(2, 1, kv.n_tokens, generator=torch.Generator().manual_seed(0)) > 0.5).to(q.device)
    expected = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=mask.unsqueeze(2)).squeeze(2)
    out = decode_attention_reference(q, kv, mask=mask)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    n_packed = kv.k.n_tokens  # decompress_kv rounds to the cache's fp16: tolerances of fp16
    torch.testing.assert_close(qk_reference(q, kv.k), torch.einsum("bhd,bhtd->bht", q.float(), k[:, :, :n_packed]), atol=3e-2, rtol=1e-2)
    p = torch.rand(2, 6, n_packed).to(q.device)
    torch.testing.assert_close(pv_reference(p, kv.v), torch.einsum("bht,bhtd->bhd", p, v[:, :, :n_packed]), atol=3e-2, rtol=1e-2)
