"""PackKVCache: a transformers ``Cache`` that keeps K and V packed, and its attention function.

Per layer the cache holds a :class:`PackedStore` (the packed blocks) and a buffer of the
most recent tokens, exact, in the model's dtype (fp16 or bf16 on a GPU; an fp32 model's
buffer is fp32). ``update`` only appends the new tokens to the buffer and returns the
buffer's storage; the attention function ``"packkv"`` (registered with transformers'
``AttentionInterface`` when this module is imported) then

* for a prefill (more than one query token) runs SDPA over the decoded packed history
  (if any) and the buffer;
* for a decode step (one query token) runs fused decode attention
  (:mod:`packkv.kernels.decode_attention`) on the packed blocks and the buffer: Triton on
  CUDA, the PyTorch reference on CPU, never the whole cache in fp16;

and afterwards compresses the oldest full blocks of the buffer that leave at least
``buffer_size`` tokens in it. Compressing after attention lets the layer learn, from the
attention mask, which tokens are padding before it permutes them.

Padding (left-padded batches): inside a packed block tokens are permuted per batch row
and KV head, so the layer keeps a validity mask in cache order (packed order, then the
buffer), bool ``[batch, kv_heads, tokens]``, created only when a prefill shows a padding
token. A block keeps its positions in it when it is packed (only its tokens are permuted),
and decode tokens are real, so a decode step passes a view of it and writes nothing.

A decode step with no block to compress costs, per layer on the GPU, the output's
allocation and one kernel launch, which appends the new K and V to the buffer, attends and
merges its splits, and no host sync: the launch is prepared once per change of the packed
blocks (:meth:`PackKVLayer.decode_plan`).

Usage::

    import packkv.cache  # registers "packkv"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="packkv")
    cache = PackKVCache(model.config, PackKVConfig())
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .codec import PackedKV, decode_tensor
from .config import PackKVConfig
from .kernels import decode_attention
from .kernels._common import GROUP_TILE, KERNEL_HEAD_DIMS, QUERY_DTYPES, check_attention, use_triton
from .kernels.decode_attention import DecodePlan
from .store import PackedStore

ATTN_IMPLEMENTATION = "packkv"
# The reference codec allocates several int32/fp32 copies of what it compresses: append at
# most this many elements (batch x heads x tokens x head_dim) at a time to bound the peak.
APPEND_ELEMENTS = 2**25
# Whether a decode step's token is left for the decode kernel to write (PackKVLayer):
# False copies it in update, as on the CPU (benchmarks compare the two).
FUSED_APPEND = True
# The attribute on the key tensor that ``update`` returns: a weak reference to the layer it
# came from (the layer keeps that tensor, so a strong one would be a reference cycle, and
# a dropped cache's memory would wait for the garbage collector).
_LAYER_ATTR = "_packkv_layer"


class PackKVLayer(CacheLayerMixin):
    """One layer of a :class:`PackKVCache`: packed blocks, then the buffer.

    Tokens ``[0, store.n_tokens)`` are packed (permuted inside each block); the
    ``n_buffer`` tokens after them are in the buffer, ``k_buffer`` / ``v_buffer``
    ``[batch, kv_heads, n_buffer, head_dim]``, in their original order.

    The buffer's storage is preallocated for ``buffer_size + block_size`` tokens, the most
    it holds between two steps, so that a decode step appends its token allocating nothing;
    it grows only for a prefill chunk that does not fit. On the GPU a decode step's token is
    not copied by ``update``: the attention kernel writes it into the buffer as it attends
    (one launch instead of three). Until then it is *pending*, and anything that reads the
    buffer copies it first (``_flush``).
    """

    is_sliding = False
    is_compileable = False
    # crop can only drop tokens still in the buffer, or whole packed blocks.
    is_croppable = False

    def __init__(self, config: PackKVConfig) -> None:
        super().__init__()
        self.config = config
        self.store = PackedStore(config)
        # The buffer's storage, [batch, kv_heads, capacity, head_dim]: the buffer is
        # [:, :, :n_buffer]. K's carries the tag by which the attention function finds this
        # layer (_set_storage).
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self.n_buffer = 0
        # bool [batch, kv_heads, capacity]: which tokens are real, in cache order (packed
        # order for the packed tokens, then the buffer), True past the last token; None
        # while every token is real (it is created when a prefill shows padding).
        self._valid: torch.Tensor | None = None
        # Tokens appended by update() that the attention function has not yet seen.
        self.unseen = 0
        # A decode step's K and V [batch, kv_heads, 1, head_dim], counted in n_buffer but not
        # yet in the buffer's storage: the decode kernel writes them (update, _decode).
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # The decode kernels' launch, prepared for the current packed blocks and storages
        # (decode_plan); dropped when the store changes, so that it holds no old storage.
        self._plan: DecodePlan | None = None

    # -- transformers' layer contract ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        capacity = self.config.buffer_size + self.config.block_size
        self._set_storage(key_states.new_empty(b, h, capacity, d), key_states.new_empty(b, h, capacity, d))
        self.n_buffer = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, new, head_dim]`` K (after RoPE) and V to the buffer.

        Returns the buffer's storage (K, V) ``[batch, kv_heads, capacity, head_dim]``, whose
        first ``n_buffer`` tokens are the buffer (transformers' StaticCache also returns its
        whole storage): no view to make at each step. The attention function finds this
        layer through it; it reads the buffer from the layer.
        """
        if self.unseen:
            raise RuntimeError(
                f"PackKVCache got new tokens while {self.unseen} earlier ones were never attended by the "
                f"'{ATTN_IMPLEMENTATION}' attention function; load the model with "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' (import packkv.cache first)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.n_buffer, key_states.shape[2]
        if self._defers(key_states, value_states):
            self._pending = key_states, value_states
        else:
            if n + new > self._k_buf.shape[2]:
                self._set_storage(_moved(self._k_buf, 0, n, n + new), _moved(self._v_buf, 0, n, n + new))
            self._write(n, key_states, value_states)
        self.n_buffer = n + new
        self.unseen = new
        if self._valid is not None:
            self._reserve_valid(self.get_seq_length())
        return self._k_buf, self._v_buf

    def get_seq_length(self) -> int:
        return self.store.n_tokens + self.n_buffer

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
        self._flush()
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
            self._plan = None
        self.n_buffer = keep - self.store.n_tokens
        if self._valid is not None:
            self._valid[:, :, keep:length] = True  # the invariant: True past the last token
        self.unseen = max(0, self.unseen - (length - keep))

    def _select(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._flush()
        indices = indices.to(self._k_buf.device)
        if not self.store.is_empty:
            self.store.select_batch(indices)
        self._plan = None
        self._set_storage(self._k_buf.index_select(0, indices), self._v_buf.index_select(0, indices))
        if self._valid is not None:
            self._valid = self._valid.index_select(0, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._k_buf.shape[0], device=self._k_buf.device)
            self._select(rows.repeat_interleave(repeats))

    def offload(self) -> None:
        raise NotImplementedError("PackKVCache does not support offloading")

    prefetch = offload

    # -- packkv ----------------------------------------------------------------------------
    def _defers(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether this update's token can wait for the decode kernel to write it: one token
        of the buffer's shape and dtype, room for it, packed blocks (a decode step attends
        with the kernels only then), and the kernels in use."""
        buf, row = self._k_buf, self._row_shape
        return (
            FUSED_APPEND and key_states.shape == row and value_states.shape == row and buf.dtype in QUERY_DTYPES
            and key_states.dtype is buf.dtype and value_states.dtype is buf.dtype and self.n_buffer < buf.shape[2]
            and not self.store.is_empty and key_states.device == buf.device and value_states.device == buf.device
            and (buf.is_cuda or use_triton(buf.device))
        )

    def _flush(self) -> None:
        """Copy a pending token into the buffer (see the class docstring)."""
        if self._pending is not None:
            (k, v), self._pending = self._pending, None
            self._write(self.n_buffer - 1, k, v)

    def _write(self, at: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Copy ``[batch, kv_heads, new, head_dim]`` K and V into the buffer's storage from token ``at``."""
        self._k_buf.narrow(2, at, key_states.shape[2]).copy_(key_states)
        self._v_buf.narrow(2, at, value_states.shape[2]).copy_(value_states)

    def _set_storage(self, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
        """Make ``k_buf`` / ``v_buf`` ``[batch, kv_heads, capacity, head_dim]`` the buffer's
        storage; K's carries the tag by which the attention function finds this layer."""
        self._k_buf, self._v_buf = k_buf, v_buf
        setattr(k_buf, _LAYER_ATTR, weakref.ref(self))
        b, h, _, d = k_buf.shape
        self._row_shape = torch.Size((b, h, 1, d))  # a decode step's token

    @property
    def k_buffer(self) -> torch.Tensor | None:
        """The buffer's K ``[batch, kv_heads, n_buffer, head_dim]``, a view (None before the first update)."""
        self._flush()
        return None if self._k_buf is None else self._k_buf[:, :, : self.n_buffer]

    @property
    def v_buffer(self) -> torch.Tensor | None:
        """The buffer's V ``[batch, kv_heads, n_buffer, head_dim]``, a view (None before the first update)."""
        self._flush()
        return None if self._v_buf is None else self._v_buf[:, :, : self.n_buffer]

    @property
    def packed_valid(self) -> torch.Tensor | None:
        """bool ``[batch, kv_heads, packed_tokens]`` in packed order, or None if all are real."""
        if self._valid is None:
            return None
        return self._valid[:, :, : self.store.n_tokens]

    def valid_mask(self) -> torch.Tensor | None:
        """bool ``[batch, kv_heads, packed + buffer tokens]``, packed order then the buffer
        (a view, no copy); None if every token is real."""
        if self._valid is None:
            return None
        return self._valid[:, :, : self.get_seq_length()]

    def decode_plan(self, query: torch.Tensor, scaling: float) -> DecodePlan:
        """The kernels' launch for a decode step of ``query [batch, q_heads, 1, head_dim]``
        (fp16/bf16, the buffer's dtype) at softmax scale ``scaling``.

        Prepared on the buffer's and the mask's storage (the step passes the buffer's length),
        so it serves every step until the packed blocks, one of those storages, the query's
        heads or the scale change; it is validated when it is made.
        """
        k, v, plan = self.store.k, self.store.v, self._plan
        if (
            plan is not None and plan.k is k and plan.v is v and plan.k_tail is self._k_buf
            and plan.v_tail is self._v_buf and plan.mask is self._valid and plan.q_heads == query.shape[1]
            and plan.sm_scale == scaling
        ):
            return plan
        q = query[:, :, 0]
        # The check reads shapes only: views of the storage, pending token or not.
        tails = self._k_buf[:, :, : self.n_buffer], self._v_buf[:, :, : self.n_buffer]
        kv = PackedKV(k=k, v=v, k_tail=tails[0], v_tail=tails[1], config=self.config, dtype=self.dtype)
        check_attention(q, kv, self.valid_mask())
        self._plan = DecodePlan(q, k, v, self._k_buf, self._v_buf, scaling, self._valid, splits=None, token_axis=True)
        return self._plan

    def settle(self, new_valid: torch.Tensor | None) -> None:
        """Record which of the ``unseen`` newest tokens are real, then compress overflow.

        Args:
            new_valid: bool ``[batch, unseen]`` (None: all real). Reading it costs a host
                sync, so the attention function passes it for a prefill only.
        """
        if new_valid is not None and (self._valid is not None or not bool(new_valid.all())):
            end = self.get_seq_length()
            self._reserve_valid(end)
            self._valid[:, :, end - self.unseen : end] = new_valid.unsqueeze(1)
        self.unseen = 0
        self._compress_overflow()

    def _reserve_valid(self, tokens: int) -> None:
        """Make ``_valid`` hold at least ``tokens`` tokens, growing it geometrically like the store."""
        capacity = 0 if self._valid is None else self._valid.shape[2]
        if capacity >= tokens:
            return
        b, h = self._k_buf.shape[:2]
        # Tokens seen before the first padding are real: the new mask starts all True.
        valid = torch.ones(b, h, max(tokens, 2 * capacity), dtype=torch.bool, device=self._k_buf.device)
        if self._valid is not None:
            valid[:, :, :capacity] = self._valid
        self._valid = valid

    def _compress_overflow(self) -> None:
        # Compress the oldest whole blocks that leave at least buffer_size tokens exact: the
        # buffer then holds buffer_size .. buffer_size + block_size - 1 tokens (as the study
        # harness and PackKV's reference code do).
        s = self.config.block_size
        blocks = max(0, self.n_buffer - self.config.buffer_size) // s
        if blocks == 0:
            return
        self._flush()
        self._plan = None
        b, h, _, d = self._k_buf.shape
        step = max(1, APPEND_ELEMENTS // (b * h * s * d))
        for first in range(0, blocks, step):
            lo, hi = first * s, min(blocks, first + step) * s
            perm = self.store.append(self._k_buf[:, :, lo:hi], self._v_buf[:, :, lo:hi])
            if self._valid is not None:
                # Buffer token j sits at cache position n_packed + j, so the block keeps its
                # positions in the mask; only its tokens are permuted.
                end = self.store.n_tokens
                chunk = self._valid[:, :, end - (hi - lo) : end]
                chunk.copy_(torch.gather(chunk, 2, perm))
        cut = blocks * s
        # Fresh buffers: the rest moves to the front (the old and new places overlap), and
        # a long prefill's buffer is freed.
        capacity = max(self.config.buffer_size + s, self.n_buffer - cut)
        n = self.n_buffer
        self._set_storage(_moved(self._k_buf, cut, n, capacity), _moved(self._v_buf, cut, n, capacity))
        self.n_buffer = n - cut

    def nbytes(self) -> dict[str, int]:
        """Byte counts of this layer.

        Returns:
            ``tokens``; ``fp16_bytes`` (K and V of every token in fp16); ``stored_bytes``
            (packed data used, the buffer's tokens, the validity mask of every token, 1 byte
            a flag); ``allocated_bytes`` (the same at the capacity of the store, the buffer
            and the mask).
        """
        if not self.is_initialized:
            return {"tokens": 0, "fp16_bytes": 0, "stored_bytes": 0, "allocated_bytes": 0}
        b, h, capacity, d = self._k_buf.shape
        tokens = self.get_seq_length()
        item = self._k_buf.element_size()
        mask_tokens, mask_capacity = (0, 0) if self._valid is None else (tokens, self._valid.shape[2])
        return {
            "tokens": tokens,
            "fp16_bytes": 2 * 2 * b * h * tokens * d,
            "stored_bytes": self.store.nbytes + 2 * b * h * self.n_buffer * d * item + b * h * mask_tokens,
            "allocated_bytes": self.store.allocated_nbytes + 2 * b * h * capacity * d * item + b * h * mask_capacity,
        }


def _moved(buf: torch.Tensor, start: int, stop: int, capacity: int) -> torch.Tensor:
    """A new ``[batch, heads, capacity, head_dim]`` buffer starting with ``buf[:, :, start:stop]``."""
    new = buf.new_empty(*buf.shape[:2], capacity, buf.shape[3])
    new[:, :, : stop - start] = buf[:, :, start:stop]
    return new


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


# Attention modules whose attributes _check_supported accepted: they come from the model's
# config, and looking up absent attributes of a Module (an exception each) costs microseconds
# a layer and step.
_SERVED_MODULES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _check_supported(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    if kwargs.get("output_attentions"):
        raise NotImplementedError("the packkv attention does not return attention weights (output_attentions)")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("the packkv attention does not serve sliding-window layers")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("the packkv attention does not serve attention logit soft-capping")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the packkv attention does not serve attention sinks (s_aux)")
    if module.training and dropout:
        raise NotImplementedError("the packkv attention is for inference: attention dropout is not supported")
    if module in _SERVED_MODULES:
        return
    if getattr(module, "sliding_window", None) is not None:
        raise NotImplementedError("the packkv attention does not serve sliding-window layers")
    if getattr(module, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("the packkv attention does not serve attention logit soft-capping")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError("the packkv attention serves causal attention only")
    _SERVED_MODULES.add(module)


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
    """One query token ``[b, hq, 1, d]`` over the packed blocks and the buffer: ``[b, 1, hq, d]``."""
    if query.dtype is layer.dtype and query.dtype in QUERY_DTYPES and use_triton(query.device):
        # The kernel on the buffer's storage: per step, one output and one launch, which
        # also writes the step's pending token into the buffer.
        new = layer._pending or (None, None)
        out = layer.decode_plan(query, scaling).run(query, layer.n_buffer, *new)
        layer._pending = None
        return out
    q, k_tail, v_tail = query[:, :, 0], layer.k_buffer, layer.v_buffer
    if q.dtype not in QUERY_DTYPES:
        # The kernels take fp16/bf16: an fp32 model's query and buffer are rounded to fp16.
        q, k_tail, v_tail = q.half(), k_tail.half(), v_tail.half()
    kv = PackedKV(
        k=layer.store.k, v=layer.store.v, k_tail=k_tail, v_tail=v_tail, config=layer.config, dtype=k_tail.dtype,
    )
    out = decode_attention(q, kv, sm_scale=scaling, mask=layer.valid_mask())
    return out.to(query.dtype).unsqueeze(1)


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
            storage of the layer's buffer (the layer says how much of it is used); from any
            other cache (or none), the whole K and V, attended with plain SDPA.
        attention_mask: transformers' 4D mask ``[batch, 1, q_len, kv_len]`` (bool, True
            where attended, or additive float) or None for plain causal attention.
        scaling: softmax scale (``head_dim ** -0.5`` when None).

    Returns:
        ``([batch, q_len, heads, head_dim], None)``.
    """
    _check_supported(module, dropout, kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer_ref = getattr(key, _LAYER_ATTR, None)
    layer = None if layer_ref is None else layer_ref()
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.shape[-1] != layer.get_seq_length():
        raise ValueError(
            f"attention mask covers {attention_mask.shape[-1]} tokens, the cache holds {layer.get_seq_length()}"
        )
    if query.shape[2] == 1 and not layer.store.is_empty:
        # The layer's own mask (packed order) covers padding; the new token is real, since
        # generate extends the mask with ones: reading it would cost a host sync a layer.
        out = _decode(layer, query, scaling)
        layer.settle(None)
        return out, None
    allowed = _allowed(attention_mask)
    out = _prefill(layer, query, allowed, scaling)
    layer.settle(None if allowed is None else allowed[:, 0, -1, -layer.unseen :])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"packkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packkv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


register()
