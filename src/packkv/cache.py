"""PackKVCache: a transformers ``Cache`` that keeps K and V packed, and its attention function.

Per layer the cache holds a :class:`PackedStore` (the packed blocks) and a buffer of the
most recent tokens, exact, in the model's dtype (fp16 or bf16 on a GPU; an fp32 model's
buffer is fp32). ``update`` only appends the new tokens
to the buffer and returns the buffer; the attention function ``"packkv"`` (registered
with transformers' ``AttentionInterface`` when this module is imported) then

* for a prefill (more than one query token) runs SDPA over the decoded packed history
  (if any) and the buffer;
* for a decode step (one query token) calls :func:`packkv.kernels.decode_attention` on the
  packed blocks and the buffer: Triton on CUDA, the PyTorch reference on CPU, never the
  whole cache in fp16;

and afterwards compresses the oldest full blocks of the buffer that leave at least
``buffer_size`` tokens in it. Compressing after attention lets the layer learn, from the
attention mask, which tokens are padding before it permutes them.

Padding (left-padded batches): inside a packed block tokens are permuted per batch row
and KV head, so the layer keeps a validity mask in packed order, bool
``[batch, kv_heads, packed_tokens]``, created only once a padding token is seen.

Usage::

    import packkv.cache  # registers "packkv"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="packkv")
    cache = PackKVCache(model.config, PackKVConfig())
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .codec import PackedKV, decode_tensor
from .config import PackKVConfig
from .kernels import decode_attention
from .kernels._common import GROUP_TILE, KERNEL_HEAD_DIMS, QUERY_DTYPES
from .store import PackedStore

ATTN_IMPLEMENTATION = "packkv"
# The reference codec allocates several int32/fp32 copies of what it compresses: append at
# most this many elements (batch x heads x tokens x head_dim) at a time to bound the peak.
APPEND_ELEMENTS = 2**25
# The attribute on the key tensor that ``update`` returns, naming the layer it came from.
_LAYER_ATTR = "_packkv_layer"


class PackKVLayer(CacheLayerMixin):
    """One layer of a :class:`PackKVCache`: packed blocks, then the buffer.

    Tokens ``[0, store.n_tokens)`` are packed (permuted inside each block); tokens from
    ``store.n_tokens`` on are in ``k_buffer`` / ``v_buffer``, ``[batch, kv_heads, n, head_dim]``
    in their original order.
    """

    is_sliding = False
    is_compileable = False
    # crop can only drop tokens still in the buffer, or whole packed blocks.
    is_croppable = False

    def __init__(self, config: PackKVConfig) -> None:
        super().__init__()
        self.config = config
        self.store = PackedStore(config)
        self.k_buffer: torch.Tensor | None = None
        self.v_buffer: torch.Tensor | None = None
        # bool [batch, n_buffer]: which buffer tokens are real (None: all of them).
        self.buffer_valid: torch.Tensor | None = None
        # bool [batch, kv_heads, capacity], packed order; None while every packed token is real.
        self._packed_valid: torch.Tensor | None = None
        # Tokens appended by update() that the attention function has not yet seen.
        self.unseen = 0

    # -- transformers' layer contract ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.k_buffer = key_states.new_zeros(b, h, 0, d)
        self.v_buffer = key_states.new_zeros(b, h, 0, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, new, head_dim]`` K (after RoPE) and V to the buffer.

        Returns the buffer (K, V); the attention function finds this layer through it.
        """
        if self.unseen:
            raise RuntimeError(
                f"PackKVCache got new tokens while {self.unseen} earlier ones were never attended by the "
                f"'{ATTN_IMPLEMENTATION}' attention function; load the model with "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' (import packkv.cache first)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.k_buffer = torch.cat([self.k_buffer, key_states.to(self.dtype)], dim=2)
        self.v_buffer = torch.cat([self.v_buffer, value_states.to(self.dtype)], dim=2)
        if self.buffer_valid is not None:
            pad = self.buffer_valid.new_ones(self.buffer_valid.shape[0], key_states.shape[2])
            self.buffer_valid = torch.cat([self.buffer_valid, pad], dim=1)
        self.unseen = key_states.shape[2]
        key = self.k_buffer.detach()  # a new tensor object sharing storage, to carry the tag
        setattr(key, _LAYER_ATTR, self)
        return key, self.v_buffer

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.store.n_tokens + self.k_buffer.shape[2]

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        # transformers 5.x passes the query length; earlier releases its cache_position.
        q_len = query if isinstance(query, int) else query.shape[0]
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        self.__init__(self.config)

    def crop(self, tokens: int) -> None:
        """Drop tokens from the end: ``tokens < 0`` drops ``-tokens``, ``tokens >= 0`` keeps that many.

        Only tokens still in the buffer can go, or the cache can be cut exactly at a packed
        block boundary: a packed block's token order is not stored.
        """
        length = self.get_seq_length()
        keep = length + tokens if tokens < 0 else min(tokens, length)
        if keep < 0:
            raise ValueError(f"cannot crop {-tokens} tokens from a cache of {length}")
        if keep == length:
            return
        packed = self.store.n_tokens
        if keep < packed and keep % self.config.block_size:
            raise NotImplementedError(
                f"PackKVCache cannot crop to {keep} tokens: tokens before {packed} are packed in blocks of "
                f"{self.config.block_size} whose token order is not kept; crop to a multiple of "
                f"{self.config.block_size}, or to at least {packed} tokens"
            )
        if keep < packed:
            self.store.truncate(keep // self.config.block_size)
            keep_buffer = 0
        else:
            keep_buffer = keep - packed
        self.k_buffer = self.k_buffer[:, :, :keep_buffer].clone()
        self.v_buffer = self.v_buffer[:, :, :keep_buffer].clone()
        if self.buffer_valid is not None:
            self.buffer_valid = self.buffer_valid[:, :keep_buffer].clone()
        self.unseen = max(0, self.unseen - (length - keep))

    def _select(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        indices = indices.to(self.k_buffer.device)
        if not self.store.is_empty:
            self.store.select_batch(indices)
        self.k_buffer = self.k_buffer.index_select(0, indices)
        self.v_buffer = self.v_buffer.index_select(0, indices)
        if self.buffer_valid is not None:
            self.buffer_valid = self.buffer_valid.index_select(0, indices)
        if self._packed_valid is not None:
            self._packed_valid = self._packed_valid.index_select(0, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.k_buffer.shape[0], device=self.k_buffer.device)
            self._select(rows.repeat_interleave(repeats))

    def offload(self) -> None:
        raise NotImplementedError("PackKVCache does not support offloading")

    prefetch = offload

    # -- packkv ----------------------------------------------------------------------------
    @property
    def packed_valid(self) -> torch.Tensor | None:
        """bool ``[batch, kv_heads, packed_tokens]`` in packed order, or None if all are real."""
        if self._packed_valid is None:
            return None
        return self._packed_valid[:, :, : self.store.n_tokens]

    def valid_mask(self) -> torch.Tensor | None:
        """bool ``[batch, kv_heads, packed + buffer tokens]``, packed order then the buffer;
        None if every token is real."""
        if self._packed_valid is None and self.buffer_valid is None:
            return None
        b, h = self.k_buffer.shape[:2]
        packed = self.packed_valid
        if packed is None:
            packed = self.k_buffer.new_ones(b, h, self.store.n_tokens, dtype=torch.bool)
        buffer = self.buffer_valid
        if buffer is None:
            buffer = self.k_buffer.new_ones(b, self.k_buffer.shape[2], dtype=torch.bool)
        return torch.cat([packed, buffer.unsqueeze(1).expand(b, h, -1)], dim=2)

    def settle(self, new_valid: torch.Tensor | None) -> None:
        """Record which of the ``unseen`` newest tokens are real, then compress overflow.

        Args:
            new_valid: bool ``[batch, unseen]`` (None: all real).
        """
        if new_valid is not None and not bool(new_valid.all()):
            if self.buffer_valid is None:
                self.buffer_valid = new_valid.new_ones(self.k_buffer.shape[0], self.k_buffer.shape[2])
            self.buffer_valid[:, self.k_buffer.shape[2] - self.unseen :] = new_valid
        self.unseen = 0
        self._compress_overflow()

    def _compress_overflow(self) -> None:
        # Compress the oldest whole blocks that leave at least buffer_size tokens exact: the
        # buffer then holds buffer_size .. buffer_size + block_size - 1 tokens (as the study
        # harness and PackKV's reference code do).
        s = self.config.block_size
        blocks = max(0, self.k_buffer.shape[2] - self.config.buffer_size) // s
        if blocks == 0:
            return
        b, h, _, d = self.k_buffer.shape
        step = max(1, APPEND_ELEMENTS // (b * h * s * d))
        for first in range(0, blocks, step):
            lo, hi = first * s, min(blocks, first + step) * s
            perm = self.store.append(self.k_buffer[:, :, lo:hi], self.v_buffer[:, :, lo:hi])
            self._append_packed_valid(perm, lo)
        cut = blocks * s
        # Copies, so that the long prefill buffer's storage is freed.
        self.k_buffer = self.k_buffer[:, :, cut:].clone()
        self.v_buffer = self.v_buffer[:, :, cut:].clone()
        if self.buffer_valid is not None:
            self.buffer_valid = self.buffer_valid[:, cut:].clone()

    def _append_packed_valid(self, perm: torch.Tensor, start: int) -> None:
        """Carry the validity of buffer tokens ``[start, start + n)``, just appended to the
        store with permutation ``perm [batch, kv_heads, n]``, into packed order."""
        n = perm.shape[2]
        end = self.store.n_tokens
        chunk = None if self.buffer_valid is None else self.buffer_valid[:, start : start + n]
        if self._packed_valid is None and (chunk is None or bool(chunk.all())):
            return
        if self._packed_valid is None or self._packed_valid.shape[2] < end:
            b, h = perm.shape[:2]
            old = self._packed_valid
            # Grows geometrically like the store; tokens packed before the first pad are real.
            self._packed_valid = perm.new_ones(b, h, max(end, 2 * (0 if old is None else old.shape[2])), dtype=torch.bool)
            if old is not None:
                self._packed_valid[:, :, : end - n] = old[:, :, : end - n]
        if chunk is None:
            self._packed_valid[:, :, end - n : end] = True
        else:
            valid = chunk.unsqueeze(1).expand(*perm.shape)
            self._packed_valid[:, :, end - n : end] = torch.gather(valid, 2, perm)

    def nbytes(self) -> dict[str, int]:
        """Byte counts of this layer.

        Returns:
            ``tokens``; ``fp16_bytes`` (K and V of every token in fp16); ``stored_bytes``
            (packed data used, buffer and validity masks, 1 byte a flag); ``allocated_bytes``
            (the same with the store's and the packed mask's spare capacity).
        """
        if not self.is_initialized:
            return {"tokens": 0, "fp16_bytes": 0, "stored_bytes": 0, "allocated_bytes": 0}
        b, h, _, d = self.k_buffer.shape
        tokens = self.get_seq_length()
        buffers = [self.k_buffer, self.v_buffer, self.buffer_valid]
        extra = sum(t.numel() * t.element_size() for t in buffers if t is not None)
        used_mask = 0 if self._packed_valid is None else self.packed_valid.numel()
        mask_capacity = 0 if self._packed_valid is None else self._packed_valid.numel()
        return {
            "tokens": tokens,
            "fp16_bytes": 2 * 2 * b * h * tokens * d,
            "stored_bytes": self.store.nbytes + extra + used_mask,
            "allocated_bytes": self.store.allocated_nbytes + extra + mask_capacity,
        }


def _check_model_config(config: Any) -> Any:
    """The decoder config of ``config``, if its attention is one PackKVCache serves."""
    if not hasattr(config, "num_hidden_layers"):
        raise TypeError(f"PackKVCache needs the model's config (e.g. model.config), got {type(config).__name__}")
    decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(decoder, "layer_types", None)
    if layer_types is None:
        sliding = getattr(decoder, "sliding_window", None) is not None and getattr(decoder, "use_sliding_window", True)
        chunked = getattr(decoder, "attention_chunk_size", None) is not None
        layer_types = ["sliding_attention" if sliding else "chunked_attention" if chunked else "full_attention"]
    unsupported = sorted(set(layer_types) - {"full_attention"})
    if unsupported:
        raise NotImplementedError(
            f"PackKVCache serves full causal attention layers only; this model has {unsupported} layers"
        )
    if not getattr(decoder, "is_causal", True) or getattr(decoder, "is_encoder_decoder", False):
        raise NotImplementedError("PackKVCache serves causal decoder-only models only")
    head_dim = getattr(decoder, "head_dim", None) or decoder.hidden_size // decoder.num_attention_heads
    if head_dim not in KERNEL_HEAD_DIMS:
        raise NotImplementedError(f"the packkv decode kernels take head_dim {KERNEL_HEAD_DIMS}, this model has {head_dim}")
    kv_heads = getattr(decoder, "num_key_value_heads", None) or decoder.num_attention_heads
    if decoder.num_attention_heads // kv_heads > GROUP_TILE:
        raise NotImplementedError(
            f"the packkv decode kernels take at most {GROUP_TILE} query heads a KV head, this model has "
            f"{decoder.num_attention_heads // kv_heads}"
        )
    return decoder


class PackKVCache(Cache):
    """A transformers ``Cache`` holding K and V compressed with PackKV.

    Args:
        config: the model's config (``model.config``); it must use
            ``attn_implementation="packkv"`` and full causal attention in every layer.
        packkv_config: codec and buffer settings (``PackKVConfig()`` when None).

    Supported: ``get_seq_length``, ``reorder_cache`` (beam search), ``batch_select_indices``,
    ``batch_repeat_interleave``, ``reset``, ``crop`` (within the buffer or to a block
    boundary). Not supported: offloading, ``torch.compile`` (not compileable), sliding
    window / chunked layers, non-causal models.
    """

    def __init__(self, config: Any, packkv_config: PackKVConfig | None = None) -> None:
        decoder = _check_model_config(config)
        self.model_config = config
        self.packkv_config = packkv_config or PackKVConfig()
        layers = [PackKVLayer(self.packkv_config) for _ in range(decoder.num_hidden_layers)]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"PackKVCache needs attn_implementation='{ATTN_IMPLEMENTATION}', the model uses {implementation!r}: "
                f"import packkv.cache, then load with attn_implementation='{ATTN_IMPLEMENTATION}' or call "
                f"model.set_attn_implementation('{ATTN_IMPLEMENTATION}')"
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        """Bytes the cache holds now (packed data used, buffers and masks), all layers."""
        return sum(layer.nbytes()["stored_bytes"] for layer in self.layers)

    def stats(self) -> dict[str, Any]:
        """Per-layer and total byte counts: ``{"layers": [...], "total": {...}}``.

        Each entry has ``tokens``, ``fp16_bytes``, ``stored_bytes``, ``allocated_bytes`` and
        ``ratio`` (fp16_bytes / stored_bytes; 0.0 when empty).
        """
        rows = [layer.nbytes() for layer in self.layers]
        total = {key: sum(r[key] for r in rows) for key in ("fp16_bytes", "stored_bytes", "allocated_bytes")}
        total["tokens"] = rows[0]["tokens"] if rows else 0
        for row in (*rows, total):
            row["ratio"] = row["fp16_bytes"] / row["stored_bytes"] if row["stored_bytes"] else 0.0
        return {"layers": rows, "total": total}


# -- the attention function -------------------------------------------------------------------

def _allowed(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 4D mask as bool (True: attend), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0  # an additive float mask: 0 where attended


def _check_supported(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("output_attentions"):
        raise NotImplementedError("the packkv attention does not return attention weights (output_attentions)")
    if getattr(module, "sliding_window", None) is not None or kwargs.get("sliding_window") is not None:
        raise NotImplementedError("the packkv attention does not serve sliding-window layers")
    if kwargs.get("softcap") is not None or getattr(module, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("the packkv attention does not serve attention logit soft-capping")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the packkv attention does not serve attention sinks (s_aux)")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("the packkv attention serves causal attention only")
    if module.training and kwargs.get("dropout", 0.0):
        raise NotImplementedError("the packkv attention is for inference: attention dropout is not supported")


def _prefill(layer: PackKVLayer, query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """SDPA of ``query [b, hq, q, d]`` over the decoded packed history and the buffer."""
    k_buf, v_buf = layer.k_buffer, layer.v_buffer
    b, hq, q_len, d = query.shape
    h = k_buf.shape[1]
    n_packed, n_buf = layer.store.n_tokens, k_buf.shape[2]
    if allowed is None and n_packed == 0 and q_len == n_buf:
        return F.scaled_dot_product_attention(query, k_buf, v_buf, is_causal=True, scale=scaling, enable_gqa=hq != h)
    if allowed is None:
        # Plain causal attention: query i is token n_packed + n_buf - q_len + i.
        rows = torch.arange(q_len, device=query.device).view(-1, 1) + (n_buf - q_len)
        allowed = (torch.arange(n_buf, device=query.device) <= rows).view(1, 1, q_len, n_buf)
    else:
        allowed = allowed[..., -n_buf:]
        if allowed.shape[0] > 1 and allowed.stride(0) == 0:
            allowed = allowed[:1]  # one mask broadcast over the batch (no padding): keep it one
    if n_packed:
        k = torch.cat([decode_tensor(layer.store.k).to(query.dtype), k_buf], dim=2)
        v = torch.cat([decode_tensor(layer.store.v).to(query.dtype), v_buf], dim=2)
        history = layer.packed_valid
        if history is None:
            history = allowed.new_ones(1, 1, 1, 1).expand(allowed.shape[0], allowed.shape[1], q_len, n_packed)
        else:
            history = history.repeat_interleave(hq // h, dim=1).unsqueeze(2).expand(b, hq, q_len, n_packed)
            allowed = allowed.expand(b, hq, -1, -1)
        allowed = torch.cat([history, allowed], dim=3)
    else:
        k, v = k_buf, v_buf
    # SDPA's GQA mode with a mask falls back to the math kernel, which materializes every
    # score; repeated KV heads keep the memory-efficient kernel (as transformers does).
    k, v = k.repeat_interleave(hq // h, dim=1), v.repeat_interleave(hq // h, dim=1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling)
    # A query that sees no token (a padding query) gets NaN: zero it, as it is never used.
    return out.nan_to_num_(0.0)


def _decode(layer: PackKVLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query token ``[b, hq, 1, d]`` over the packed blocks and the buffer: ``[b, hq, 1, d]``."""
    q, k_tail, v_tail = query[:, :, 0], layer.k_buffer, layer.v_buffer
    if q.dtype not in QUERY_DTYPES:
        # The kernels take fp16/bf16: an fp32 model's query and buffer are rounded to fp16.
        q, k_tail, v_tail = q.half(), k_tail.half(), v_tail.half()
    kv = PackedKV(
        k=layer.store.k, v=layer.store.v, k_tail=k_tail, v_tail=v_tail, config=layer.config, dtype=k_tail.dtype,
    )
    out = decode_attention(q, kv, sm_scale=scaling, mask=layer.valid_mask())
    return out.to(query.dtype).unsqueeze(2)


def packkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``attn_implementation="packkv"``).

    Args:
        module: the attention module (``is_causal``, ``sliding_window`` are checked).
        query: ``[batch, heads, q_len, head_dim]``.
        key, value: what the cache's ``update`` returned. From a :class:`PackKVCache`, the
            layer's buffer; from any other cache (or none), the whole K and V, attended
            with plain SDPA.
        attention_mask: transformers' 4D mask ``[batch, 1, q_len, kv_len]`` (bool, True
            where attended, or additive float) or None for plain causal attention.
        scaling: softmax scale (``head_dim ** -0.5`` when None).

    Returns:
        ``([batch, q_len, heads, head_dim], None)``.
    """
    _check_supported(module, {**kwargs, "dropout": dropout})
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = getattr(key, _LAYER_ATTR, None)
    allowed = _allowed(attention_mask)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    if allowed is not None and allowed.shape[-1] != layer.get_seq_length():
        raise ValueError(f"attention mask covers {allowed.shape[-1]} tokens, the cache holds {layer.get_seq_length()}")
    if query.shape[2] == 1 and not layer.store.is_empty:
        out = _decode(layer, query, scaling)
    else:
        out = _prefill(layer, query, allowed, scaling)
    # A decode step's token is real (generate extends the mask with ones): reading the mask
    # would cost a GPU sync per layer and step.
    new_valid = None if allowed is None or query.shape[2] == 1 else allowed[:, 0, -1, -layer.unseen :]
    layer.settle(new_valid)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"packkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packkv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


register()
