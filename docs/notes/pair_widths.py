"""What K's plane words would cost if two channels shared a width (a format whose words
hold channel pairs, so that the K product's fragments could read them: docs/notes/kernels.md,
"What the time is made of"). CPU; the benchmarks' real KV at the default setting.

    PYTHONPATH=src python3 docs/notes/pair_widths.py [--data .kvdata/smollm2_kv.pt]

Prints K's plane bits (sum of widths x 32 tokens) and their growth when each pair takes
the wider of its two widths, for three pairings: adjacent channels, one channel order a head
(by mean width), and each pack's channels sorted by width (that one would need a
permutation stored a pack).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import SHAPES, real_chunk  # noqa: E402

from packkv import PackKVConfig  # noqa: E402
from packkv.codec.kv import compress_kv  # noqa: E402


def paired(w: torch.Tensor) -> int:
    """Plane bits when channels 2i and 2i+1 of ``w`` [..., D] share the wider width."""
    return int(torch.maximum(w[..., 0::2], w[..., 1::2]).sum().item()) * 2 * 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    args = parser.parse_args()
    data = torch.load(args.data)
    print("| shape | K plane MB | K packed MB | adjacent pairs | a channel order a head | sorted a pack |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        k, v = real_chunk(data, shape)
        packed = compress_kv(k, v, PackKVConfig()).k
        w = packed.widths.to(torch.int32)  # [batch, heads, packs, D / 2]: two 4-bit codes a byte
        w = torch.stack([w & 15, w >> 4], -1).flatten(-2)
        bits = int(w.sum().item()) * 32
        order = w.float().mean(2).argsort(-1)
        by_head = torch.gather(w, 3, order[:, :, None, :].expand_as(w))
        growth = [100 * (paired(x) / bits - 1) for x in (w, by_head, w.sort(-1).values)]
        print(f"| {shape.name} | {bits / 8e6:.3f} | {packed.nbytes / 1e6:.3f} | "
              + " | ".join(f"+{g:.1f}%" for g in growth) + " |")


if __name__ == "__main__":
    main()
