"""Warp-stall samples of one kernel from Nsight Compute's source page, by reason and by
opcode: what a profile made with profile_attn.py says the warps wait on.

    ncu -i attn.ncu-rep --page source --csv --print-source sass > attn_sass.csv
    python3 docs/notes/gluon/ncu_stalls.py attn_sass.csv
"""

from __future__ import annotations

import collections
import csv
import sys


def main() -> None:
    rows = list(csv.reader(open(sys.argv[1])))
    header, data = rows[1], rows[2:]
    index = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    by_op = collections.defaultdict(collections.Counter)
    for r in data:
        words = r[1].strip().split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        for h in reasons:
            n = int(r[index[h]] or 0)
            total[h] += n
            by_op[op][h] += n
    all_samples = max(1, sum(total.values()))
    print(f"samples {all_samples}")
    for h, n in total.most_common(10):
        print(f"  {h[6:]:20s} {n:7d} {100 * n / all_samples:5.1f}%")
    print("by opcode (top three reasons each):")
    for op, c in sorted(by_op.items(), key=lambda x: -sum(x[1].values()))[:16]:
        n = sum(c.values())
        print(f"  {op:8s} {n:7d} {100 * n / all_samples:5.1f}%  " + ", ".join(f"{k[6:]}={v}" for k, v in c.most_common(3)))


if __name__ == "__main__":
    main()
