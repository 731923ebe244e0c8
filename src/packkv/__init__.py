"""packkv: LLM-aware lossy compression of the KV cache (PackKV) with fused decode attention."""

from .codec import PackedKV, PackedTensor, compress_kv, decompress_kv, validate_packed
from .config import PackKVConfig
from .errors import CorruptDataError, FormatVersionError, ModelMismatchError, PackKVError
from .io import load_packed, save_packed

__version__ = "0.1.0"

__all__ = [
    "PackKVConfig", "PackedKV", "PackedTensor", "compress_kv", "decompress_kv", "validate_packed",
    "save_packed", "load_packed", "PackKVError", "CorruptDataError", "FormatVersionError", "ModelMismatchError",
    "__version__",
]
