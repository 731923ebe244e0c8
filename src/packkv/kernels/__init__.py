"""Fused decode kernels over the packed format (Triton) and their plain PyTorch references."""

from .decode_attention import decode_attention
from .pv import pv
from .qk import qk
from .reference import decode_attention_reference, pv_reference, qk_reference

__all__ = ["decode_attention", "decode_attention_reference", "pv", "pv_reference", "qk", "qk_reference"]
