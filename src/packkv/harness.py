"""Accuracy of a model whose KV cache goes through a compression method, in real use.

Windows are fed in chunks of the method's ``block_size`` tokens through the model with a
cache. After each chunk, every full block older than the ``buffer_size`` most recent tokens
that is not yet compressed goes through the method once and is replaced by what the method
gives back. Tokens of the next chunks attend to the exact recent tokens and to the older
ones only through their compressed form: the same as token-by-token decoding with a cache
that compresses a block as soon as it leaves the buffer, at a chunk's cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .capture import cache_layers
from .methods import KVMethod, fp16_nbytes


@dataclass
class EvalResult:
    """Per-window results of one method.

    Attributes:
        nll: fp64 ``[windows]`` mean negative log-likelihood (nats) of tokens 1..T-1.
        argmax: int64 ``[windows, T - 1]`` the model's top-1 prediction at each position.
        k_nbytes, v_nbytes: bytes the method stored for every compressed block.
        k_fp16_nbytes, v_fp16_nbytes: bytes the same blocks take in fp16.
        seconds: wall time of the run.
    """

    nll: torch.Tensor
    argmax: torch.Tensor
    k_nbytes: int
    v_nbytes: int
    k_fp16_nbytes: int
    v_fp16_nbytes: int
    seconds: float = 0.0

    @property
    def ppl(self) -> torch.Tensor:
        """Perplexity of each window."""
        return self.nll.exp()


def _compress_old_blocks(cache, done: list[int], seen: int, method: KVMethod, buffer_size: int, totals: list[int]) -> None:
    """Replace each layer's not yet compressed full blocks older than the buffer."""
    bs = method.block_size
    for i, layer in enumerate(cache_layers(cache)):
        stored = layer.keys.shape[2]
        start = seen - stored  # absolute position of the first stored token (sliding layers drop old ones)
        end = done[i] + (seen - buffer_size - done[i]) // bs * bs
        if end <= done[i]:
            continue
        lo = max(done[i] - start, 0)
        hi = end - start
        if hi > lo:
            out = method.roundtrip(layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi])
            layer.keys[:, :, lo:hi] = out.k
            layer.values[:, :, lo:hi] = out.v
            totals[0] += out.k_nbytes
            totals[1] += out.v_nbytes
            totals[2] += fp16_nbytes(layer.keys[:, :, lo:hi])
            totals[3] += fp16_nbytes(layer.values[:, :, lo:hi])
        done[i] = end


@torch.no_grad()
def evaluate(
    model,
    windows: torch.Tensor,
    method: KVMethod,
    *,
    buffer_size: int = 128,
    chunk_size: int | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> EvalResult:
    """Perplexity and top-1 predictions of ``model`` over ``windows`` with ``method``'s cache.

    Args:
        model: a transformers causal LM (any attention implementation; the cache is a
            ``DynamicCache`` whose tensors are replaced in place).
        windows: int64 ``[windows, T]`` token ids, run as one batch.
        method: the compression method; its ``block_size`` is the chunk length.
        buffer_size: most recent tokens kept exact.
        chunk_size: tokens fed a step, ``method.block_size`` when None. When
            ``buffer_size`` is a multiple of the block size, any chunk size that divides the
            block size gives the same result (1 is token-by-token decoding), up to
            floating-point summation order.
        on_chunk: called after each chunk (progress bars).
    """
    from transformers import DynamicCache

    if buffer_size < 0:
        raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
    chunk = chunk_size or method.block_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    start_time = time.perf_counter()
    n, total = windows.shape
    cache = DynamicCache(config=model.config)
    done = [0] * model.config.num_hidden_layers
    totals = [0, 0, 0, 0]
    nll_sum = torch.zeros(n, dtype=torch.float64)
    argmax = torch.empty(n, total - 1, dtype=torch.int64)
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        logits = model(windows[:, lo:hi], past_key_values=cache, use_cache=True).logits.float()
        pred = logits[:, : min(hi, total - 1) - lo]  # position t predicts token t + 1
        target = windows[:, lo + 1 : lo + 1 + pred.shape[1]]
        nll_sum += torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none").double().sum(1)
        argmax[:, lo : lo + pred.shape[1]] = pred.argmax(-1)
        if hi < total:
            _compress_old_blocks(cache, done, hi, method, buffer_size, totals)
        if on_chunk is not None:
            on_chunk()
    return EvalResult(nll_sum / (total - 1), argmax, *totals, seconds=time.perf_counter() - start_time)
