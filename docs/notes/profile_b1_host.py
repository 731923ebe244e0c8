"""Host profile (cProfile) of batch-1 decode steps at 64K: DynamicCache vs PackKVCache.

The Llama-3.1-8B-shaped model of bench_generate (8 layers, random fp16 weights), a 64K
random prompt, 66 warm-up steps, then 128 steps under cProfile per cache (two rounds,
interleaved); prints the wall time a step and the functions with the largest cumulative
and own time, so that a difference of host work between the caches shows where it is.

    PYTHONPATH=src python3 -u docs/notes/profile_b1_host.py
"""
import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
import bench_generate as bg  # noqa: E402

dev = torch.device("cuda")
model = bg.build_model(bg.llama_8b_config(8), dev, torch.float16)
makers, _ = bg.cache_makers(model, ["dynamic", "packkv"])
CTX, STEPS = 65536, 128
with bg.sdpa_backends(dev), torch.no_grad():
    for rnd, order in enumerate((("dynamic", "packkv"), ("packkv", "dynamic"))):
        for label in order:
            attn, make = makers[label]
            bg.set_attention(model, attn)
            prompt = torch.randint(0, 1000, (1, CTX), device=dev)
            cache = make()
            nxt = bg.prefill(model, cache, prompt, 32768)[:, -1:].argmax(-1)
            del prompt
            nxt, _, _ = bg.decode(model, cache, nxt, 66, dev)  # warm-up steps
            torch.cuda.synchronize()
            plain = time.perf_counter()
            for _ in range(STEPS):
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            plain = 1e3 * (time.perf_counter() - plain) / STEPS
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            for _ in range(STEPS):
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            prof.disable()
            profiled = 1e3 * (time.perf_counter() - start) / STEPS
            print(f"== {label} round {rnd}: {plain:.2f} ms a step, {profiled:.2f} under cProfile", flush=True)
            if rnd == 0:
                for key, n in (("cumulative", 28), ("tottime", 16)):
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(n)
                    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()][4:]
                    print("\n".join(ln[:170] for ln in lines), flush=True)
            del cache
            bg.free_memory(dev)
