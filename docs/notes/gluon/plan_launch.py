"""Host cost of a decode step's launch (DecodePlan.run) with the Gluon and the Triton
attention kernels, and whether the Gluon plan calls its compiled launcher directly
(decode_attention._Launch). GPU only.

    PYTHONPATH=src python3 docs/notes/gluon/plan_launch.py
"""

import importlib
import time

import torch

from packkv import PackKVConfig, compress_kv
from packkv.kernels import _common

module = importlib.import_module("packkv.kernels.decode_attention")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 8, 4096 + 64, 128, generator=g).half()
    v = torch.randn(1, 8, 4096 + 64, 128, generator=g).half()
    kv = compress_kv(k, v, PackKVConfig()).to("cuda")
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.float16)
    for gluon in (True, False):
        _common.GLUON = gluon
        tail = torch.zeros(1, 8, 192, 128, dtype=torch.float16, device="cuda")
        tail[:, :, :kv.k_tail.shape[2]] = kv.k_tail
        plan = module.DecodePlan(q, kv.k, kv.v, tail, tail.clone(), 0.088, None, None)
        for _ in range(3):
            plan.run(q, kv.k_tail.shape[2])
        torch.cuda.synchronize()
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            plan.run(q, kv.k_tail.shape[2])
        host = (time.perf_counter() - start) / n
        torch.cuda.synchronize()
        print(f"{'gluon' if gluon else 'triton'}: kernel {plan._kernel.fn.__name__}, direct launch "
              f"{plan._launch is not None and plan._launch.direct}, host {host * 1e6:.1f} us a run")
    _common.GLUON = True


if __name__ == "__main__":
    main()
