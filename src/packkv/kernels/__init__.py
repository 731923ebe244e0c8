"""Fused decode kernels over the packed format (Triton; on CUDA the V product in Gluon) and
their plain PyTorch references."""

from .decode_attention import decode_attention
from .pv import pv
from .qk import qk
from .reference import decode_attention_reference, pv_reference, qk_reference

__all__ = ["decode_attention", "decode_attention_reference", "pv", "pv_reference", "qk", "qk_reference"]
