"""Grids: the integer levels a weight quantizer produces at a bit-width, the one description the cost model
(ESN, nonzero weights), the ONNX export (integer initializers) and the packed file (b-bit codes) read.

A quantized weight is ``scale * n`` with ``n`` an integer level and ``scale = unit * step`` (``step`` the
quantizer's step, one per tensor or per output channel). The cost model reads the same weight in units of the
step, ``W_int = n * unit`` (seed 000's mid-rise levels are half-integers). Each weight quantizer class says which
grid it produces at each bit-width (``WeightQuantizer.grid_for``); a new kind of levels is one ``Grid``
subclass, registered by its name when it is defined.

- ``midrise`` (seed 000 App. A): W_int = k + 1/2, k in -2^(b-1) .. 2^(b-1) - 1, and exactly 0 for a removed
  weight or filter. Half-integers are not integers, so n = 2k + 1 (odd) at unit 1/2, which is exact (halving a
  float is exact) and keeps 0 for removed weights: |n| <= 2^b - 1 takes b + 1 signed bits. Zero is not a level:
  the packed file marks zeros in a bitmask.
- ``midtread`` (seed 003 eq. 20-21 from 3 bits): W_int = n in -2^(b-1) .. 2^(b-1) - 1, unit 1: b signed bits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from autoprune.errors import AutopruneError
from autoprune.quant.midrise import level_bits, midrise_int, tread_int, tread_level_bits

GRIDS: dict[str, "Grid"] = {}
"""Every grid by its name (how the packed file's header names a layer's levels)."""


class Grid(ABC):
    """The levels of one kind of weight quantizer. Stateless: the bit-width is an argument of every method."""

    name: ClassVar[str]
    unit: ClassVar[float] = 1.0
    """W_int = n * unit: the cost model's level of integer level n, in steps."""
    zero_is_level: ClassVar[bool] = True
    """Whether 0 is one of the b-bit codes; if not, zeros (removed weights) are stored in a bitmask."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in GRIDS:
                raise AutopruneError("grid", cls.name, "is already registered")
            GRIDS[cls.name] = cls()

    @abstractmethod
    def read(self, weight: torch.Tensor, step: float | torch.Tensor, bits: int) -> torch.Tensor:
        """The cost model's W_int of ``weight`` at ``step`` (float64, in steps, 0 for removed weights)."""

    @abstractmethod
    def nearest(self, ratio: torch.Tensor) -> torch.Tensor:
        """The integer level n nearest to each W / step, unclamped (an exporter checks the range itself)."""

    @abstractmethod
    def level_bits(self, w_int: torch.Tensor) -> torch.Tensor:
        """Bits each level takes (ESN_d, seed 000 eq. 3); 0 for a zero weight."""

    @abstractmethod
    def bounds(self, bits: int) -> tuple[int, int]:
        """The smallest and largest integer level n at ``bits``."""

    @abstractmethod
    def codes(self, levels: torch.Tensor, bits: int) -> torch.Tensor:
        """Unsigned b-bit codes of integer levels (the packed file): of zeros too when ``zero_is_level``."""

    @abstractmethod
    def from_codes(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """The integer levels of b-bit codes (``codes``' inverse)."""

    def storage_bits(self, bits: int) -> int:
        """Signed integer bits that hold every level n at ``bits`` (an ONNX initializer's type)."""
        low, high = self.bounds(bits)
        return max(high.bit_length(), (-low - 1).bit_length()) + 1


def grid_named(name: str | Grid) -> Grid:
    if isinstance(name, Grid):
        return name
    grid = GRIDS.get(name)
    if grid is None:
        raise AutopruneError("grid", name, f"is not a registered grid ({', '.join(GRIDS)})")
    return grid


class MidRise(Grid):
    name = "midrise"
    unit = 0.5
    zero_is_level = False

    def read(self, weight: torch.Tensor, step: float | torch.Tensor, bits: int) -> torch.Tensor:
        return midrise_int(weight, step, bits)

    def nearest(self, ratio: torch.Tensor) -> torch.Tensor:
        return (2 * torch.round(ratio - 0.5) + 1).to(torch.int64)

    def level_bits(self, w_int: torch.Tensor) -> torch.Tensor:
        return level_bits(w_int.to(torch.float64))

    def bounds(self, bits: int) -> tuple[int, int]:
        return -(2**bits - 1), 2**bits - 1

    def codes(self, levels: torch.Tensor, bits: int) -> torch.Tensor:
        # n = 2k + 1: the code is k shifted to 0 .. 2^b - 1
        return torch.div(levels - 1, 2, rounding_mode="floor") + 2 ** (bits - 1)

    def from_codes(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return 2 * (codes - 2 ** (bits - 1)) + 1


class MidTread(Grid):
    name = "midtread"

    def read(self, weight: torch.Tensor, step: float | torch.Tensor, bits: int) -> torch.Tensor:
        return tread_int(weight, step, bits)

    def nearest(self, ratio: torch.Tensor) -> torch.Tensor:
        return torch.round(ratio).to(torch.int64)

    def level_bits(self, w_int: torch.Tensor) -> torch.Tensor:
        return tread_level_bits(w_int)

    def bounds(self, bits: int) -> tuple[int, int]:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def codes(self, levels: torch.Tensor, bits: int) -> torch.Tensor:
        return levels + 2 ** (bits - 1)

    def from_codes(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        return codes - 2 ** (bits - 1)


MIDRISE = GRIDS["midrise"]
MIDTREAD = GRIDS["midtread"]

__all__ = ["Grid", "GRIDS", "MIDRISE", "MIDTREAD", "MidRise", "MidTread", "grid_named"]
