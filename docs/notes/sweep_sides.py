"""K alone and V alone: each method compresses one side, the other stays exact, so that K and
V are matched separately (as the paper reports them). Real codec bytes, harness accuracy,
tuning windows. Usage: python .notes/sweep_sides.py OUT.json WINDOWS TOKENS [ktoken]"""
import json, sys
from pathlib import Path
from packkv import PackKVConfig
from packkv.baselines import BASELINES
from packkv.data import load_text, token_windows
from packkv.harness import evaluate
from packkv.methods import PackKVMethod, Roundtrip
from packkv.models import load_model

class OneSide:
    def __init__(self, base, side):
        self.base, self.side = base, side
        self.family, self.block_size = base.family, base.block_size
        self.label = f"{side}-only {base.label}"
    def settings(self): return {"side": self.side, **self.base.settings()}
    def roundtrip(self, k, v):
        r = self.base.roundtrip(k, v)
        return Roundtrip(r.k, v, r.k_nbytes, 0) if self.side == "K" else Roundtrip(k, r.v, 0, r.v_nbytes)

out = Path(sys.argv[1]); nw, nt = int(sys.argv[2]), int(sys.argv[3])
model, tok = load_model("smollm2")
ids = token_windows(load_text(), tok, nw, nt, "tune")
ref = evaluate(model, ids, BASELINES["fp16"]()); ref_ppl = float(ref.nll.mean().exp())
P = lambda **kw: PackKVMethod(PackKVConfig(block_size=128, repack="median", **kw))
methods = []
if len(sys.argv) > 4 and sys.argv[4] == "ktoken":  # second pass: K per token only
    methods = [OneSide(P(k_rel=r, k_grouping="token"), "K") for r in (0.03, 0.05, 0.07, 0.1)]
for side in (() if methods else ("K", "V")):
    methods += [OneSide(BASELINES[b](), side) for b in ("kivi-4", "kivi-2")]
if len(sys.argv) <= 4:
    methods += [OneSide(P(k_rel=r), "K") for r in (0.05, 0.1, 0.2, 0.3)]
    methods += [OneSide(P(v_rel=r), "V") for r in (0.1, 0.2, 0.4, 0.6)]
rows = []
for m in methods:
    r = evaluate(model, ids, m)
    ppl = float(r.nll.mean().exp()); d = r.ppl - ref.ppl
    ratio = (r.k_fp16_nbytes / r.k_nbytes) if m.side == "K" else (r.v_fp16_nbytes / r.v_nbytes)
    row = {"label": m.label, "side": m.side, "ratio": ratio, "ppl": ppl, "delta": ppl - ref_ppl, "delta_std": float(d.std()),
           "top1": float((r.argmax == ref.argmax).double().mean()), "s": r.seconds}
    rows.append(row); out.write_text(json.dumps({"fp16_ppl": ref_ppl, "rows": rows}, indent=1))
    print(f"{m.label:<48} x{ratio:5.2f} delta {row['delta']:+7.3f} (sd {row['delta_std']:.3f}) top1 {row['top1']:.4f} ({r.seconds:.0f}s)", flush=True)
