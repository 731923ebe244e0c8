"""Perplexity of PackKV quantization settings in the real-use harness (tuning windows).

The decoded values depend only on grouping, rel and block size (repacking permutes, pack
size and min_bits only change bytes), so this uses quantize/dequantize directly, fast.
Usage: python .notes/sweep_ppl.py OUT.json WINDOWS TOKENS 'JSON list of [kg,kr,vg,vr,bs]' (rel 0 = exact)
"""
import json, sys, time
from pathlib import Path
import torch
from packkv.baselines import BASELINES
from packkv.codec.quantize import dequantize_blocks, quantize_blocks
from packkv.data import load_text, token_windows
from packkv.harness import evaluate
from packkv.methods import Roundtrip
from packkv.models import load_model

class QuantOnly:
    family = "packkv-q"
    def __init__(self, kg, kr, vg, vr, bs):
        self.kg, self.kr, self.vg, self.vr, self.block_size = kg, kr, vg, vr, bs
        self.label = f"{kg} {kr} {vg} {vr} b{bs}"
    def settings(self): return {}
    def _side(self, x, rel, g):
        if rel == 0: return x
        b, h, t, d = x.shape
        xb = x.reshape(b, h, t // self.block_size, self.block_size, d)
        q, s, z = quantize_blocks(xb, rel, g)
        return dequantize_blocks(q, s, z, g).reshape(x.shape).to(x.dtype)
    def roundtrip(self, k, v):
        return Roundtrip(self._side(k, self.kr, self.kg), self._side(v, self.vr, self.vg), 1, 1)

out = Path(sys.argv[1]); nw, nt = int(sys.argv[2]), int(sys.argv[3]); grid = json.loads(sys.argv[4])
extra = sys.argv[5].split(",") if len(sys.argv) > 5 else []
model, tok = load_model("smollm2")
ids = token_windows(load_text(), tok, nw, nt, "tune")
ref = evaluate(model, ids, BASELINES["fp16"]())
ref_ppl = float(ref.nll.mean().exp())
rows = json.loads(out.read_text()) if out.exists() else []
print(f"fp16 ppl {ref_ppl:.3f} ({ref.seconds:.0f}s)", flush=True)
methods = [BASELINES[e]() for e in extra] + [QuantOnly(*g) for g in grid]
for m in methods:
    r = evaluate(model, ids, m)
    ppl = float(r.nll.mean().exp()); d = r.ppl - ref.ppl
    agree = float((r.argmax == ref.argmax).double().mean())
    row = {"label": m.label, "ppl": ppl, "delta": ppl - ref_ppl, "delta_std": float(d.std()), "top1": agree, "s": r.seconds,
           "windows": nw, "tokens": nt, "k_ratio": r.k_fp16_nbytes / r.k_nbytes, "v_ratio": r.v_fp16_nbytes / r.v_nbytes}
    rows.append(row)
    print(f"{m.label:<32} ppl {ppl:.3f} delta {ppl-ref_ppl:+.3f} (sd {row['delta_std']:.3f}) top1 {agree:.4f} ({r.seconds:.0f}s)", flush=True)
    out.write_text(json.dumps(rows, indent=1))
