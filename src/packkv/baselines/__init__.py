"""Baselines measured in the same harness as PackKV: fp16, fp8 (e4m3, per-tensor scale),
KIVI (2/4 bits) and per-token intN (transformers' quantized cache style)."""

from .fp8 import Fp8PerTensor
from .fp16 import Fp16
from .groupquant import GroupQuant, dequantize_groups, kivi, per_token_int, quantize_groups

BASELINES = {
    "fp16": Fp16,
    "fp8": Fp8PerTensor,
    "kivi-2": lambda: kivi(2),
    "kivi-4": lambda: kivi(4),
    "int4-g64": lambda: per_token_int(4),
    "int2-g64": lambda: per_token_int(2),
}

__all__ = ["BASELINES", "Fp16", "Fp8PerTensor", "GroupQuant", "dequantize_groups", "kivi", "per_token_int", "quantize_groups"]
