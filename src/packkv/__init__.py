"""packkv: LLM-aware lossy compression of the KV cache (PackKV) with fused decode attention."""

from .codec import PackedKV, PackedTensor, compress_kv, decompress_kv, validate_packed
from .config import PackKVConfig
from .errors import CorruptDataError, FormatVersionError, ModelMismatchError, PackKVError
from .io import load_packed, save_packed

__version__ = "0.1.0"


def __getattr__(name: str):
    # PackKVCache imports transformers and registers the "packkv" attention: only on use.
    if name == "PackKVCache":
        from .cache import PackKVCache

        return PackKVCache
    raise AttributeError(f"module 'packkv' has no attribute {name!r}")

__all__ = [
    "PackKVConfig", "PackedKV", "PackedTensor", "compress_kv", "decompress_kv", "validate_packed",
    "save_packed", "load_packed", "PackKVError", "CorruptDataError", "FormatVersionError", "ModelMismatchError",
    "PackKVCache", "__version__",
]
