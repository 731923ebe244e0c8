"""How fast is the store stage on a GPU, against the work it rides on?

For Llama-3.1-8B shapes (8 KV heads, head_dim 128, 32 query heads, hidden 4096, MLP 14336)
it times, per layer:
  * encoding a whole prefill of T tokens (K and V) with each repacking method, as
    fp16-input GB/s (median and none: the fused kernels; greedy: the reference codec
    with the Triton packer), checked bit for bit against the reference codec first;
  * that layer's prefill attention plus MLP on the same T tokens (random weights);
  * the amortized compression cost per decode step (one block every block_size steps)
    against one decode attention step (SDPA) at T.

    PYTHONPATH=src python3 benchmarks/bench_encode.py [--tokens 32768] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def bench_ms(fn, quick: bool) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 50, rep=50 if quick else 300, return_mode="median")


def realistic_kv(batch: int, heads: int, tokens: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K with outlier channels and a slowly varying per-token structure, V roughly Gaussian.

    Never zeros: the widths after repacking depend on the data, so the generator mimics the
    statistics seen in real caches (a few large K channels, smooth token-to-token drift).
    """
    g = torch.Generator(device=device).manual_seed(0)
    channel_scale = torch.ones(head_dim, device=device)
    channel_scale[torch.randperm(head_dim, generator=g, device=device)[: head_dim // 16]] = 8.0
    drift = torch.cumsum(torch.randn(batch, heads, tokens, 1, device=device, generator=g) * 0.05, dim=2)
    k = (torch.randn(batch, heads, tokens, head_dim, device=device, generator=g) + drift) * channel_scale
    v = torch.randn(batch, heads, tokens, head_dim, device=device, generator=g)
    return k.half(), v.half()


def layer_prefill_ms(tokens: int, quick: bool) -> float:
    """One Llama-3.1-8B decoder layer (random weights, sdpa) over a prefill of ``tokens``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=max(tokens, 8192),
                      attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).cuda().half().eval()
    rope = LlamaRotaryEmbedding(cfg).cuda()
    x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.float16) * 0.1
    pos = torch.arange(tokens, device="cuda").unsqueeze(0)
    emb = rope(x, pos)

    @torch.no_grad()
    def run():
        layer(x, position_embeddings=emb, position_ids=pos, attention_mask=None)

    return bench_ms(run, quick)


def decode_attention_ms(tokens: int, quick: bool) -> float:
    """One fp16 SDPA decode step (32 query heads, 8 KV heads, head_dim 128) at ``tokens``."""
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    k, v = realistic_kv(1, 8, tokens, 128, "cuda")
    k, v = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    f = torch.nn.functional.scaled_dot_product_attention
    return bench_ms(lambda: f(q, k, v), quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="prefill length (default 32768)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_encode: needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    from packkv import PackKVConfig, compress_kv
    from packkv.kernels.encode import encode_kv

    torch.manual_seed(0)
    t = args.tokens
    k, v = realistic_kv(1, 8, t, 128, "cuda")
    fp16_bytes = 2 * k.numel() * 2
    prefill_ms = layer_prefill_ms(t, args.quick)
    step_ms = decode_attention_ms(t, args.quick)
    rows = []
    for repack in ("median", "none", "greedy"):
        config = PackKVConfig(repack=repack)
        # Greedy is sequential per pack: time it on a 1/8 slice and scale, and say so.
        part = t if repack != "greedy" else t // 8
        ks, vs = k[:, :, :part].contiguous(), v[:, :, :part].contiguous()
        packed = encode_kv(ks, vs, config)
        ref = compress_kv(ks[:, :, :1024], vs[:, :, :1024], config)
        fast = encode_kv(ks[:, :, :1024], vs[:, :, :1024], config)
        assert torch.equal(fast.k.words, ref.k.words) and torch.equal(fast.v.words, ref.v.words), "kernel != reference"
        ms = bench_ms(lambda: encode_kv(ks, vs, config), args.quick) * (t / part)
        block_ms = bench_ms(lambda: encode_kv(k[:, :, :config.block_size], v[:, :, :config.block_size], config), args.quick)
        rows.append({
            "repack": repack, "tokens": t, "encode_ms": ms, "gbps_fp16_input": fp16_bytes / ms / 1e6,
            "ratio": packed.fp16_nbytes / packed.nbytes, "prefill_layer_ms": prefill_ms,
            "encode_vs_prefill": ms / prefill_ms, "block_encode_ms": block_ms,
            "per_step_amortized_ms": block_ms / config.block_size, "decode_attention_ms": step_ms,
            "per_step_vs_attention": block_ms / config.block_size / step_ms,
            "scaled_from_tokens": part,
        })
    dev = torch.cuda.get_device_name()
    print(f"\nencode, Llama-3.1-8B layer shapes (8 KV heads x 128), batch 1, {t} tokens, {dev}, {time.strftime('%Y-%m-%d')}")
    head = f"{'repack':>7} {'encode ms':>10} {'GB/s in':>8} {'ratio':>6} {'vs prefill':>10} {'blk ms':>7} {'/step vs attn':>13}"
    print(head)
    for r in rows:
        note = f"  (timed on {r['scaled_from_tokens']} tokens, scaled)" if r["scaled_from_tokens"] != t else ""
        print(f"{r['repack']:>7} {r['encode_ms']:>10.2f} {r['gbps_fp16_input']:>8.1f} {r['ratio']:>6.2f} "
              f"{r['encode_vs_prefill']:>9.1%} {r['block_encode_ms']:>7.3f} {r['per_step_vs_attention']:>13.1%}{note}")
    print(f"layer prefill (attention + MLP, sdpa, fp16): {prefill_ms:.2f} ms; decode attention step (SDPA): {step_ms:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
