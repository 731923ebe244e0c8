"""The uncompressed reference: K and V stored in fp16."""

from __future__ import annotations

from typing import Any

import torch

from ..methods import Roundtrip, fp16_nbytes


class Fp16:
    """K and V rounded to fp16 (2 bytes a value, nothing else stored)."""

    family = "fp16"
    label = "fp16"
    block_size = 64

    def settings(self) -> dict[str, Any]:
        return {}

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> Roundtrip:
        return Roundtrip(k.half().to(k.dtype), v.half().to(v.dtype), fp16_nbytes(k), fp16_nbytes(v))
