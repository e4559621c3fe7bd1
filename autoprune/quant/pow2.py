"""Power-of-two bit-widths (seed 002 sec. 3.5, Alg. 2): the bits common digital hardware supports."""

from __future__ import annotations

from typing import Mapping

from autoprune.bits import POW2_BITS
from autoprune.quant.weight import check_bits


def pow2_bits(bits: int) -> int:
    """Alg. 2: s = log2 b, s' = floor(s), b' = 2^s'; then at least 2, the smallest width of {2, 4, 8, 16, 32}.

    Alg. 2 rounds *down* (floor), although sec. 3.5's prose says "nearest": autoprune follows the algorithm,
    so 7 bits become 4 and 31 become 16. Only 1 bit, whose floor is 2^0 = 1 and outside the allowed set,
    goes up to 2. Alg. 2's last line (a new step for b' with the range kept) needs nothing here: every
    quantizer derives its step from the bits and its range.
    """
    check_bits(bits)
    return max(1 << (bits.bit_length() - 1), POW2_BITS[0])


def pow2_bit_map(bits: Mapping[str, int]) -> dict[str, int]:
    """``pow2_bits`` applied to every value of a {layer name: bits} mapping."""
    return {name: pow2_bits(value) for name, value in bits.items()}
