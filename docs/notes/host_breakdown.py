"""Host time of a batch-1 decode step, per layer call, in the model: update and attention.

The Llama-3.1-8B-shaped model of bench_generate (8 layers, random fp16 weights), a 32K
random prompt, batch 1 (the step is bound by the host: its device work is 3-4 ms of a
7-15 ms step). Each cache of bench_generate's ``--caches`` labels runs ``ROUNDS`` times (3),
interleaved; per run, 64 warm-up steps then 128 timed ones, with the cache's ``update``
and the attention function wrapped by a timer (``perf_counter``, host time to enqueue, no
synchronization; the wrappers cost the same for every cache), and inside PackKVCache's
attention its plan's ``run`` and each kernel launch. Prints the median host microseconds
per call of each, and the median host milliseconds a step.

    PYTHONPATH=src python3 -u docs/notes/host_breakdown.py [labels] [context] [steps] [rounds]
"""
import gc
import os
import statistics
import sys
import time

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

sys.path.insert(0, "benchmarks")  # run from the repository root
import bench_generate as bg  # noqa: E402

LABELS = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dynamic", "packkv", "packkv-combine", "packkv-copy", "packkv-runner"]
CTX = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 128
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
WARM = 64

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a tiny model, to check the script
model = bg.build_model((bg.llama_8b_config if dev.type == "cuda" else bg.tiny_config)(8), dev, torch.float16)
makers, _ = bg.cache_makers(model, LABELS)
calls: dict[str, list[float]] = {}
# Time in Python's garbage collector during the timed steps (a run's host speed could follow it).
collecting = {"start": 0.0, "seconds": 0.0, "runs": 0}


def on_gc(phase, info):
    if phase == "start":
        collecting["start"] = time.perf_counter()
    else:
        collecting["seconds"] += time.perf_counter() - collecting["start"]
        collecting["runs"] += 1


gc.callbacks.append(on_gc)


def cpu() -> str:
    """The CPU this process last ran on (/proc/self/stat field 39), or '?'."""
    try:
        with open("/proc/self/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[36]
    except OSError:
        return "?"


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        calls.setdefault(name, []).append(1e6 * (time.perf_counter() - start))
        return out
    return wrapper


attention = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "packkv")}
for name, fn in attention.items():
    AttentionInterface.register(name, timed("attention", fn))
# Inside packkv's attention: the plan's run (output, arguments, both launches) and each launch.
da = sys.modules["packkv.kernels.decode_attention"]
da.DecodePlan.run = timed("plan.run", da.DecodePlan.run)
da._Launch.__call__ = timed("launch", da._Launch.__call__)
results: dict[str, list[tuple[float, float, float]]] = {}
with bg.sdpa_backends(dev), torch.no_grad():
    for rnd in range(ROUNDS):
        for label in (LABELS if rnd % 2 == 0 else LABELS[::-1]):
            attn, make = makers[label]
            bg.set_attention(model, attn)
            prompt = torch.randint(0, 1000, (1, CTX), device=dev)
            cache = make()
            nxt = bg.prefill(model, cache, prompt, 32768)[:, -1:].argmax(-1)
            del prompt
            nxt, _, _ = bg.decode(model, cache, nxt, WARM, dev)  # warm-up steps
            bg.sync(dev)
            cache.update = timed("update", cache.update)
            calls.clear()
            collecting.update(seconds=0.0, runs=0)
            steps = []
            for _ in range(STEPS):
                start = time.perf_counter()
                nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                steps.append(1e3 * (time.perf_counter() - start))
            bg.sync(dev)
            row = tuple(statistics.median(calls.get(name, [0.0])) for name in ("update", "attention", "plan.run", "launch"))
            row = (statistics.median(steps), *row)
            results.setdefault(label, []).append(row)
            print(f"{label:<15} round {rnd}: step {row[0]:.2f} ms, update {row[1]:.1f} us, attention {row[2]:.1f} us, "
                  f"plan.run {row[3]:.1f} us, a launch {row[4]:.1f} us; gc {collecting['runs']} runs "
                  f"{1e3 * collecting['seconds']:.1f} ms, cpu {cpu()}, load {os.getloadavg()[0]:.1f}", flush=True)
            del cache
            bg.free_memory(dev)
for name, fn in attention.items():
    AttentionInterface.register(name, fn)

print(f"\nbatch 1, {CTX} tokens, 8 layers; medians over {ROUNDS} rounds of per-run medians; the step's fastest "
      "run in brackets (the host's speed drifts between runs; it only ever adds time)")
print(f"{'cache':<15}{'host ms/step':>14}{'update us':>11}{'attention us':>14}{'both us':>9}{'plan.run us':>13}"
      f"{'a launch us':>13}")
for label, rows in results.items():
    step, update, attn, run, launch = (statistics.median(col) for col in zip(*rows))
    fastest = min(r[0] for r in rows)
    print(f"{label:<15}{step:>7.2f} [{fastest:.2f}]{update:>11.1f}{attn:>14.1f}{update + attn:>9.1f}{run:>13.1f}"
          f"{launch:>13.1f}")
