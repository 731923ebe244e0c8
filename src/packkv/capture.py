"""Run a model over token windows and collect each layer's K (after RoPE) and V."""

from __future__ import annotations

import torch


def cache_layers(cache) -> list:
    """The per-layer entries of a transformers ``DynamicCache`` (each has ``keys`` and ``values``)."""
    return list(cache.layers)


@torch.no_grad()
def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K and V of every layer as the cache holds them after a forward over ``input_ids``.

    Args:
        model: a transformers causal LM.
        input_ids: int64 ``[batch, tokens]``.

    Returns:
        One ``(k, v)`` a layer, each ``[batch, kv_heads, tokens, head_dim]`` in the model's
        dtype; K is after RoPE. Sliding-window layers hold only their window's last tokens.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache_layers(cache)]
