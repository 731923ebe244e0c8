"""Whether the tensor cores take fp16 subnormals exactly: the Gluon kernels hand them the
unpacked integers m + u as subnormals (pv_gluon.VALUE_UNIT = 2**-24). GPU only.

    PYTHONPATH=src python3 docs/notes/gluon/subnormal_mma.py

torch.matmul (cuBLAS, HMMA) of integers 0..255 times 2**-24 by fp16 weights of about 2**14
(products near 1), against the same product in fp64. Subnormals taken exactly leave the
error of the fp16 output (~5e-4); flushed to zero, they leave zero rows and an error of 1.
"""

from __future__ import annotations

import torch


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ints = torch.randint(0, 256, (4096, 128), device="cuda", generator=gen)
    a = (ints.double() * 2.0 ** -24).half()
    assert torch.equal(a.double() * 2.0 ** 24, ints.double()), "fp16 does not hold the subnormals"
    w = (torch.randn(128, 8, device="cuda", generator=gen) * 2.0 ** 10).half()
    ref = a.double() @ w.double()
    got = torch.matmul(a, w).double()
    err = ((got - ref).abs() / ref.abs().clamp_min(1e-6)).median().item()
    print(f"fp16 subnormals x fp16 (cuBLAS): median rel err {err:.1e}, max abs err "
          f"{(got - ref).abs().max().item():.1e} of max {ref.abs().max().item():.1f}, "
          f"zero rows {(got.abs().sum(1) == 0).sum().item()} (ref {(ref.abs().sum(1) == 0).sum().item()})")


if __name__ == "__main__":
    main()
