#!/usr/bin/env bash
# Every GPU check and benchmark of packkv in one call, from the source tree, on a machine
# with an NVIDIA GPU and torch, triton and transformers installed (nothing is installed
# here). Writes logs and JSON rows to OUT (default out/gpu):
#
#   bash benchmarks/run_gpu.sh [OUT]
#
# 1. The kernel tests compiled on the GPU (the inline-PTX path the CPU interpreter cannot
#    run) and the suite's CUDA tests; 2. bench_attention (decode products and fused
#    attention vs cuBLAS / SDPA); 3. bench_encode (GPU store stage); 4. bench_generate
#    (transformers decode), after bench_decode_step (host time of a decode step). Real KV for 2: .kvdata/smollm2_kv.pt from benchmarks/capture_kv.py.
set -uo pipefail  # a failing step does not stop the others; each log says how it ended
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
TRITON_INTERPRET=0 PACKKV_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_qk.py tests/kernels/test_pv.py tests/kernels/test_decode_attention.py tests/kernels/test_encode.py \
    tests/test_store.py tests/test_store_soak.py tests/codec/test_kv.py tests/codec/test_format.py tests/test_io.py \
    tests/test_cache.py \
    2>&1 | tee "$out/tests.log"
python3 benchmarks/bench_attention.py --data .kvdata/smollm2_kv.pt --json "$out/attention.json" 2>&1 | tee "$out/attention.log"
python3 benchmarks/bench_encode.py --json "$out/encode.json" 2>&1 | tee "$out/encode.log"
python3 benchmarks/bench_decode_step.py --json "$out/decode_step.json" 2>&1 | tee "$out/decode_step.log"
python3 benchmarks/bench_generate.py --json "$out/generate.json" 2>&1 | tee "$out/generate.log"
