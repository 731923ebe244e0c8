"""Offline: compression ratios of PackKV settings on fp16-captured KV (tuning windows).

Ratios depend on every knob; accuracy only on grouping, rel and block size, so the byte
grid is measured here once, and perplexity in sweep_ppl.py.
Usage: python .notes/sweep_ratio.py OUT.json [windows tokens layers_step]
"""
import itertools, json, sys, time
from pathlib import Path
import torch
from packkv import PackKVConfig, compress_kv
from packkv.capture import capture_kv
from packkv.data import load_text, token_windows
from packkv.models import load_model

out = Path(sys.argv[1])
n_win, n_tok, step = (int(a) for a in (sys.argv[2:5] if len(sys.argv) > 4 else (2, 1024, 3)))
cache = Path("/tmp/kv_tune.pt")
if cache.exists():
    kv = torch.load(cache)
else:
    model, tok = load_model("smollm2")
    ids = token_windows(load_text(), tok, n_win, n_tok, "tune")
    kv = [(k.half(), v.half()) for k, v in capture_kv(model, ids)]
    torch.save(kv, cache)
layers = kv[::step]
grid = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
rows = []
def measure(cfg):
    t = time.time(); kb = vb = kf = 0
    for k, v in layers:
        p = compress_kv(k, v, cfg)
        kb += p.k_nbytes; vb += p.v_nbytes; kf += k.numel() * 2
    return {"cfg": cfg.to_dict(), "k_ratio": kf / kb, "v_ratio": kf / vb, "total": 2 * kf / (kb + vb), "s": time.time() - t}
configs = []
for kg, vg in [("channel", "token"), ("token", "token"), ("channel", "channel")]:
    for kr, vr in [(0.1, 0.2), (0.2, 0.4), (0.3, 0.6)]:
        for ps, bs, mb, rp in [(32, 64, 4, "median"), (32, 64, 4, "none"), (64, 64, 4, "median"), (32, 128, 4, "median"),
                               (64, 128, 4, "median"), (32, 64, 0, "median"), (32, 64, 8, "median"), (64, 256, 4, "median")]:
            configs.append(PackKVConfig(k_rel=kr, v_rel=vr, k_grouping=kg, v_grouping=vg, pack_size=ps, block_size=bs, min_bits=mb, repack=rp))
for cfg in configs:
    r = measure(cfg); rows.append(r)
    c = r["cfg"]
    print(f"{c['k_grouping'][:2]} {c['v_grouping'][:2]} k{c['k_rel']} v{c['v_rel']} p{c['pack_size']} b{c['block_size']} m{c['min_bits']} {c['repack']:<6} K {r['k_ratio']:.2f} V {r['v_ratio']:.2f} tot {r['total']:.2f} ({r['s']:.1f}s)", flush=True)
    out.write_text(json.dumps(rows, indent=1))
