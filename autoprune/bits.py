"""Bit-width constants shared by policies, quantizers and the cost model: torch-free, importing nothing."""

from __future__ import annotations

FLOAT_BITS = 32
"""A tensor of 32 bits is float (not quantized): what the float model counts for every tensor."""

FLOAT_ACT_BITS = (16, 32)
"""Activation bits kept in float, half precision (16) or single (32): weight-only quantization (W4A16,
W8A16) gets no activation quantizer and is costed at its activation bits. Other widths are integer grids."""

POW2_BITS = (2, 4, 8, 16, 32)
"""The power-of-two bit-widths of seed 002 Alg. 2."""

__all__ = ["FLOAT_BITS", "FLOAT_ACT_BITS", "POW2_BITS"]
