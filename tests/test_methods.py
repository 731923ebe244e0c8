"""PackKV through the codec, as the study uses it: original token order, codec byte counts."""

import torch

from packkv import PackKVConfig, compress_kv
from packkv.methods import PackKVMethod


def test_packkv_roundtrip_in_original_order():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 160, 64, generator=g) * 2
    v = torch.randn(2, 3, 160, 64, generator=g)
    config = PackKVConfig(k_rel=0.1, v_rel=0.2, repack="greedy", k_grouping="channel")
    out = PackKVMethod(config).roundtrip(k, v)
    packed = compress_kv(k, v, config)
    assert (out.k_nbytes, out.v_nbytes) == (packed.k_nbytes, packed.v_nbytes)
    # Within half a step of the original at the same position: K per channel over a block, V per token.
    kb = k.half().float()[:, :, :128].reshape(2, 3, 2, 64, 64)
    k_step = 0.1 * (kb.amax(3, keepdim=True) - kb.amin(3, keepdim=True))
    assert ((out.k[:, :, :128].reshape(kb.shape) - kb).abs() <= k_step * 0.51 + 1e-3).all()
    v16 = v.half().float()[:, :, :128]
    v_step = 0.2 * (v16.amax(-1, keepdim=True) - v16.amin(-1, keepdim=True))
    assert ((out.v[:, :, :128] - v16).abs() <= v_step * 0.51 + 1e-3).all()
    assert torch.equal(out.k[:, :, 128:], k[:, :, 128:].half().float())  # the tail stays fp16


def test_label_names_the_setting():
    config = PackKVConfig(k_rel=0.15, v_rel=0.3, pack_size=64, block_size=128, k_grouping="channel", repack="greedy")
    label = PackKVMethod(config).label
    assert label == "packkv kc0.15 vt0.3 p64 b128 m4 greedy"
