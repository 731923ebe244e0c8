"""Draw docs/figures/packed_layout.png: one real pack of SmolLM2's K as the codec stores it.

    PYTHONPATH=src python docs/figures/packed_layout.py

Uses the K/V captured from SmolLM2 in tests/data (real model KV, layer 0..), the default
PackKVConfig with blocks of 128 (pack 32), and plots for one pack: the quantized integers (tokens x channels), the
per-channel bit widths after repacking against no repacking, and the word layout.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from packkv import PackKVConfig, compress_kv
from packkv.codec import unpack_ints
from packkv.codec.bitpack import unpack_nibbles

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "tests" / "data" / "smollm2_kv_tiny.pt"


def main() -> None:
    data = torch.load(DATA)
    k, v = data["k"].half(), data["v"].half()
    k, v = k[:, :1, :128], v[:, :1, :128]  # one head, one block of 128 tokens
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1.2, 1.3]})
    widths = {}
    for repack in ("none", "greedy"):
        packed = compress_kv(k, v, PackKVConfig(repack=repack, block_size=128))
        widths[repack] = unpack_nibbles(packed.v.widths)[0, 0].float()  # [packs, D]
        if repack == "greedy":
            q = unpack_ints(packed.v)[0, 0, 0]  # [block, D]
            side = packed.v
    im = axes[0].imshow(q.T, aspect="auto", cmap="viridis", interpolation="nearest")
    for edge in (31.5, 63.5, 95.5):
        axes[0].axvline(edge, color="w", lw=2)
    axes[0].set(title="V integers of one block after repacking\n(four packs of 32 tokens)", xlabel="token (packed order)", ylabel="channel")
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    for repack, style in (("none", "o"), ("greedy", "s")):
        w = widths[repack]
        axes[1].plot(w[0].numpy(), style, ms=3, label=f"{repack}: {int(w.sum())} bit planes in the block")
    axes[1].set(title="per-channel bit widths of pack 0", xlabel="channel", ylabel="bits a value", ylim=(-0.5, 8))
    axes[1].legend(loc="upper right", fontsize=8)
    w0 = unpack_nibbles(side.widths)[0, 0, 0].long()
    starts = torch.cumsum(w0, 0) - w0
    for c in range(8):
        for b in range(int(w0[c])):
            x = int(starts[c]) + b
            axes[2].add_patch(plt.Rectangle((x, 0), 1, 1, facecolor=plt.cm.tab20(c % 20), edgecolor="k", lw=0.3))
            axes[2].text(x + 0.5, 0.5, f"c{c}\nb{b}", ha="center", va="center", fontsize=7)
    axes[2].set(xlim=(0, int(starts[8])), ylim=(0, 1), yticks=[],
                title="the pack's first words: channel c's planes b = 0..w_c-1\n(one int32 word each; bit j = token j)",
                xlabel="word in pack (offset = prefix sum of widths)")
    fig.tight_layout()
    fig.savefig(HERE / "packed_layout.png", dpi=110)
    print(f"wrote {HERE / 'packed_layout.png'}")


if __name__ == "__main__":
    main()
