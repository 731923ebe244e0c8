"""The store stage in plain PyTorch: the reference codec, on any device."""

from .format import PackedKV, PackedTensor
from .kv import check_kv, compress_kv, decode_tensor, decompress_kv, unpack_ints
from .validate import validate_packed

__all__ = [
    "PackedKV", "PackedTensor", "check_kv", "compress_kv", "decode_tensor", "decompress_kv", "unpack_ints",
    "validate_packed",
]
