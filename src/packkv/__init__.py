"""packkv: LLM-aware lossy compression of the KV cache (PackKV) with fused decode attention."""

from .codec import PackedKV, PackedTensor, compress_kv, decompress_kv
from .config import PackKVConfig

__version__ = "0.1.0"

__all__ = ["PackKVConfig", "PackedKV", "PackedTensor", "compress_kv", "decompress_kv", "__version__"]
