"""Combined PackKV settings through the real study (codec bytes, harness accuracy) on the tuning windows.
Usage: python .notes/sweep_study.py OUT_DIR WINDOWS TOKENS"""
import sys
from packkv import PackKVConfig
from packkv.study import format_summary, run_study

C = lambda kg, kr, vg, vr, bs=128: PackKVConfig(k_grouping=kg, k_rel=kr, v_grouping=vg, v_rel=vr, block_size=bs, repack="median")
grid = [C("channel", 0.05, "token", 0.1), C("channel", 0.1, "token", 0.2), C("channel", 0.2, "token", 0.4),
        C("channel", 0.3, "token", 0.6), C("token", 0.1, "token", 0.2), C("channel", 0.1, "channel", 0.2)]
res = run_study("smollm2", "default", int(sys.argv[3]), int(sys.argv[2]), sys.argv[1], packkv_configs=grid,
                baselines=["kivi-2", "kivi-4"], split="tune", progress=False)
print(format_summary(res)); print("seconds", res["seconds"])
