"""Host time of one kernel launch on this machine: Triton's paths, by argument count, and torch ops.

A trivial Triton kernel (one program stores one value) with 4 or 100 arguments, launched
through the dispatcher (``kernel[grid](...)``), through the compiled kernel's runner
(``compiled[grid](...)``), and through its launcher directly with integer addresses
(packkv's DecodePlan); the decode kernel of a real plan (b1, 32K tokens, Llama-3.1-8B
layer shape) through its runner and directly; and for scale, torch.empty, a one-token
``copy_`` and one-token SDPA at the same shape. Median host microseconds over 2000 calls
(nothing synchronized in between; the GPU keeps up with these tiny kernels).

    PYTHONPATH=src python3 docs/notes/launch_cost.py
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from packkv import PackKVConfig
from packkv.cache import PackKVLayer

da = sys.modules["packkv.kernels.decode_attention"]
dev = torch.device("cuda")
N = 2000


def median_us(fn, n=N):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    return statistics.median(times)


@triton.jit
def few(out, a, b, c):
    tl.store(out, a + b + c)


def many_kernel():
    """A kernel of 100 arguments (Triton reads a kernel's source from its file: write one)."""
    import importlib.util
    import os
    import tempfile

    names = ", ".join(f"a{i}" for i in range(99))
    path = os.path.join(tempfile.mkdtemp(), "many_kernel.py")
    with open(path, "w") as f:
        f.write(f"import triton\nimport triton.language as tl\n\n@triton.jit\ndef many(out, {names}):\n"
                "    tl.store(out, a0 + a98)\n")
    spec = importlib.util.spec_from_file_location("many_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.many


rows = []
out = torch.zeros(1, device=dev, dtype=torch.int32)
for name, kernel, args in (("4 args", few, [out, 1, 2, 3]), ("100 args", many_kernel(), [out, *range(3, 102)])):
    grid = (1, 1, 1)
    compiled = kernel[grid](*args)
    runner = compiled[grid]
    launch = da._Launch(compiled, grid, list(args), varying=())
    stream = da._stream(dev.index or 0)
    rows.append((f"triton {name}: dispatcher", median_us(lambda: kernel[grid](*args))))
    rows.append((f"triton {name}: compiled runner", median_us(lambda: runner(*args))))
    rows.append((f"triton {name}: direct launcher", median_us(lambda: launch(stream, args))))

# The decode kernel of a real plan.
layer = PackKVLayer(PackKVConfig())
g = torch.Generator(device=dev).manual_seed(0)
k = torch.randn(1, 8, 32768, 128, device=dev, generator=g).half()
layer.update(k, torch.randn_like(k))
layer.settle(None)
q = torch.randn(1, 32, 1, 128, device=dev).half()
plan = layer.decode_plan(q, 0.088)
plan.run(q[:, :, 0], layer.n_buffer)
plan.run(q[:, :, 0], layer.n_buffer)
decode, combine = plan._launch
stream = da._stream(0)
rows.append(("decode kernel (~100 args): compiled runner", median_us(lambda: decode.runner(*plan._decode_args, stream=stream))))
rows.append(("decode kernel (~100 args): direct launcher", median_us(lambda: decode(stream, plan._decode_args))))
rows.append(("combine kernel: direct launcher", median_us(lambda: combine(stream, plan._combine_args))))
rows.append(("plan.run (both launches, output)", median_us(lambda: plan.run(q[:, :, 0], layer.n_buffer))))
buf = torch.empty(1, 8, 256, 128, device=dev, dtype=torch.float16)
row = torch.randn(1, 8, 1, 128, device=dev).half()
rows.append(("torch.empty [1, 32, 128]", median_us(lambda: torch.empty(1, 32, 128, device=dev, dtype=torch.float16))))
rows.append(("narrow(...).copy_ one token", median_us(lambda: buf.narrow(2, 100, 1).copy_(row))))
kk, vv = torch.randn(1, 8, 4096, 128, device=dev).half(), torch.randn(1, 8, 4096, 128, device=dev).half()
rows.append(("torch.cat one token onto 4K", median_us(lambda: torch.cat([kk, row], 2), n=500)))
rows.append(("SDPA one token, 4K, GQA", median_us(lambda: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True))))

print(f"host us per call, median of {N} ({torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__})")
for name, us in rows:
    print(f"{name:<48}{us:>8.1f}")
