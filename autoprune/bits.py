"""Bit-width constants shared by policies, quantizers and the cost model: torch-free, importing nothing."""

from __future__ import annotations

FLOAT_BITS = 32
"""A tensor of 32 bits is float (not quantized): what the float model counts for every tensor."""

POW2_BITS = (2, 4, 8, 16, 32)
"""The power-of-two bit-widths of seed 002 Alg. 2."""

__all__ = ["FLOAT_BITS", "POW2_BITS"]
