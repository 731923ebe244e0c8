"""Offline: where PackKV's bytes go (payload, widths, mins, scale/zero, offsets) on captured
SmolLM2 KV (tuning windows, every 3rd layer), greedy vs median repacking, and what cheaper
metadata would buy. Usage: python .notes/bytes_breakdown.py (needs /tmp/kv_tune.pt from sweep_ratio.py)."""
import torch
from packkv import PackKVConfig, compress_kv

kv = torch.load("/tmp/kv_tune.pt")[::3]
def breakdown(cfg, layers=kv):
    parts = {"K": {}, "V": {}}; fp16 = 0
    for k, v in layers:
        p = compress_kv(k, v, cfg); fp16 += k.numel() * 2
        for side, t in (("K", p.k), ("V", p.v)):
            for name, x in t.tensors().items():
                parts[side][name] = parts[side].get(name, 0) + x.numel() * x.element_size()
    return parts, fp16
for kg, kr, vg, vr, bs in [("channel", 0.1, "token", 0.2, 128), ("channel", 0.3, "token", 0.6, 128), ("token", 0.1, "token", 0.2, 64)]:
    cfg = PackKVConfig(k_grouping=kg, k_rel=kr, v_grouping=vg, v_rel=vr, block_size=bs, repack="median")
    parts, fp16 = breakdown(cfg)
    n = fp16 / 2
    print(f"\n{kg[:2]} k{kr} {vg[:2]} v{vr} b{bs}: bits per value")
    for side in ("K", "V"):
        tot = sum(parts[side].values())
        print(f"  {side}: total {8*tot/n:.3f} (ratio {fp16/tot:.2f}) = " + ", ".join(f"{a} {8*b/n:.3f}" for a, b in parts[side].items()))
        meta_scale = 8 * (parts[side]["scale"] + parts[side]["zero"]) / n
        print(f"     if scale+zero were 8-bit codes: ratio {fp16/(tot - (parts[side]['scale']+parts[side]['zero'])/2):.2f}; if free: {fp16/(tot - parts[side]['scale']-parts[side]['zero']):.2f}; widths+mins free: {fp16/(tot-parts[side]['widths']-parts[side]['mins']):.2f}")
# Greedy vs median on two layers (greedy is slow in plain PyTorch).
for rp in ("none", "median", "greedy"):
    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, block_size=128, repack=rp)
    parts, fp16 = breakdown(cfg, kv[3:5])
    print(f"repack {rp}: K {fp16/sum(parts['K'].values()):.3f} V {fp16/sum(parts['V'].values()):.3f}")
