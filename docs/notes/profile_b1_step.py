"""Where does a batch-1 decode step's time go, DynamicCache vs PackKVCache? (run once, 2026-11-24)

The Llama-3.1-8B-shaped model of bench_generate (8 layers, random fp16 weights), prompts of
32K and 64K random tokens, 66 warm-up steps, then per cache and round: 128 steps timed on
the host (each call's enqueue time, and the synced wall time), and (round 0) torch.profiler
over 8 steps: self CPU time (host work) and self CUDA time (device work) by op. The
"device-only" figure is NOT the device's time: after the sleep the host (slower than the
device here) still paces the 16 steps; use the profiler's self CUDA total instead.

    PYTHONPATH=src python3 -u docs/notes/profile_b1_step.py
"""
import sys, time, statistics, torch
sys.path.insert(0, "benchmarks")  # run from the repository root
import bench_generate as bg
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
model = bg.build_model(bg.llama_8b_config(8), dev, torch.float16)
makers, _ = bg.cache_makers(model, ["dynamic", "packkv"])
with bg.sdpa_backends(dev):
  for ctx in (32768, 65536):
    for rnd in range(2):
      for label in (("dynamic", "packkv") if rnd == 0 else ("packkv", "dynamic")):
        attn, make = makers[label]
        bg.set_attention(model, attn)
        with torch.no_grad():
            prompt = torch.randint(0, 1000, (1, ctx), device=dev)
            cache = make()
            for lo in range(0, ctx, 32768):
                logits = model(prompt[:, lo:lo+32768], past_key_values=cache, logits_to_keep=1).logits
            nxt = logits[:, -1:].argmax(-1); del logits, prompt
            for _ in range(66):
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            host = []; t0 = time.perf_counter()
            for _ in range(128):
                a = time.perf_counter()
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                host.append(1e3 * (time.perf_counter() - a))
            torch.cuda.synchronize(); wall = 1e3 * (time.perf_counter() - t0) / 128
            # device time of one step without the host: events around steps run back to back after a sleep
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e8))
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(16):
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            e1.record(); torch.cuda.synchronize()
            gpu = e0.elapsed_time(e1) / 16
            print(f"{label:8s} ctx {ctx} round {rnd}: wall {wall:.2f} ms/step, host median {statistics.median(host):.2f} mean {statistics.mean(host):.2f} max {max(host):.1f}, device-only {gpu:.2f} ms/step", flush=True)
            if rnd == 0:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(8):
                        nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40), flush=True)
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=40), flush=True)
        del cache; bg.free_memory(dev)
