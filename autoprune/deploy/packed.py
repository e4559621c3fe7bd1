"""Packed weights: each layer's weights at its own bit-width, sparse ones as a bitmask plus packed nonzeros.

The file measures what the cost model estimates. Its layout (little-endian):

    b"APWEIGHT"  8 bytes magic
    uint32       format version (1)
    uint64       header length H
    H bytes      UTF-8 JSON header: one record per layer (``PackedLayer``), offsets into the payload
    payload      per layer, byte-aligned: [bitmask] codes

A quantized layer of b bits stores one b-bit unsigned code per weight, bits big-endian, packed across bytes,
as its grid encodes its levels (``autoprune.quant.grids.Grid.codes``; the header names the grid):

- mid-tread grids (W = step * n, n in -2^(b-1) .. 2^(b-1) - 1): code = n + 2^(b-1);
- mid-rise grids (W = delta * (k + 0.5)): code = k + 2^(b-1). Zero is not a mid-rise level, so a layer with
  pruned (zero) weights is always stored with a bitmask (so is any grid whose codes have no zero).

Encoding ``dense`` stores every weight's code; ``bitmask`` stores one bit per weight (1 = nonzero) and the codes
of the nonzero weights only. Each layer takes the smaller of the two it can use: numel x b bits against
numel + nonzero x b bits. A float (32-bit) layer stores float32 values the same two ways. The steps (one per
layer, or one per output channel) are JSON floats in the header, which round-trip float64 exactly, so
``unpack_weights`` rebuilds every weight bit for bit (``autoprune.deploy.levels``).

Only the weights of the Conv2d / Linear layers are packed: biases and BatchNorm stay float outside the budget,
as in the cost model's memory (seed 004 App. B.1).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from autoprune.bits import FLOAT_BITS
from autoprune.compress import CompressionResult
from autoprune.deploy.levels import WeightLevels, layer_levels, rebuild
from autoprune.errors import AutopruneError
from autoprune.files import atomic_path
from autoprune.models import compressible_layers
from autoprune.quant.grids import grid_named

MAGIC = b"APWEIGHT"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")


class PackedLayer(BaseModel):
    """One layer's record in the header."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    shape: tuple[int, ...]
    bits: int
    # a registered grid's name (autoprune.quant.grids), or "float"
    grid: str
    steps: list[float]
    per_channel: bool
    encoding: Literal["dense", "bitmask"]
    nonzero: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PackedReport:
    """Measured bytes beside the cost model's estimate, both in megabits (1e6 bits)."""

    path: Path
    file_bytes: int
    layers: dict[str, PackedLayer]
    measured_weight_mbit: float
    cost_weight_mbit: float
    cost_memory_mbit: float

    @property
    def ratio(self) -> float:
        """Measured weight bits over the cost model's (nonzero weights x w_bits): the format's overhead."""
        return self.measured_weight_mbit / self.cost_weight_mbit

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path), "file_bytes": self.file_bytes, "measured_weight_mbit": self.measured_weight_mbit,
            "cost_weight_mbit": self.cost_weight_mbit, "cost_memory_mbit": self.cost_memory_mbit, "ratio": self.ratio,
            "layers": {name: layer.model_dump() for name, layer in self.layers.items()},
        }


def pack_bits(codes: np.ndarray, width: int) -> bytes:
    """Unsigned codes of ``width`` bits each, most significant bit first, packed across byte boundaries."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((codes.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width].reshape(count, width)
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (bits.astype(np.uint64) * weights).sum(axis=1)


def _codes(levels: WeightLevels) -> tuple[np.ndarray, np.ndarray]:
    """The b-bit codes of every weight (zeros of a grid without a zero code are left to the bitmask), and the nonzero mask."""
    n = levels.levels.reshape(-1)
    nonzero = n != 0
    if levels.grid.zero_is_level:
        return levels.grid.codes(n, levels.bits).numpy(), nonzero.numpy()
    codes = torch.zeros_like(n)
    codes[nonzero] = levels.grid.codes(n[nonzero], levels.bits)
    return codes.numpy(), nonzero.numpy()


def _encode(values: np.ndarray, nonzero: np.ndarray, width: int, *, dense_allowed: bool, as_float: bool) -> tuple[str, bytes]:
    def payload(selected: np.ndarray) -> bytes:
        return selected.astype("<f4").tobytes() if as_float else pack_bits(selected, width)

    numel, count = values.size, int(nonzero.sum())
    bitmask_bits = numel + count * width
    if dense_allowed and numel * width <= bitmask_bits:
        return "dense", payload(values)
    return "bitmask", np.packbits(nonzero).tobytes() + payload(values[nonzero])


def write_packed_weights(result: CompressionResult, path: str | Path) -> dict[str, PackedLayer]:
    """Write the packed weights of a compressed model; the header's record of each layer."""
    modules = compressible_layers(result.model)
    records: list[PackedLayer] = []
    chunks: list[bytes] = []
    offset = 0
    for name, level in layer_levels(result).items():
        weight = modules[name].weight.detach().cpu().to(torch.float32)
        if level is None:
            values = weight.reshape(-1).numpy()
            nonzero = values != 0
            encoding, data = _encode(values, nonzero, FLOAT_BITS, dense_allowed=True, as_float=True)
            grid, bits, steps, per_channel = "float", FLOAT_BITS, [], False
        else:
            codes, nonzero = _codes(level)
            encoding, data = _encode(codes, nonzero, level.bits, dense_allowed=level.grid.zero_is_level or bool(nonzero.all()), as_float=False)
            grid, bits, per_channel = level.grid.name, level.bits, level.per_channel
            steps = level.steps.tolist() if per_channel else [float(level.steps[0])]
        records.append(PackedLayer(
            name=name, shape=tuple(weight.shape), bits=bits, grid=grid, steps=steps, per_channel=per_channel,
            encoding=encoding, nonzero=int(nonzero.sum()), offset=offset, nbytes=len(data),
        ))
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"layers": [r.model_dump() for r in records]}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(_PREAMBLE.pack(MAGIC, VERSION, len(header)))
        handle.write(header)
        for chunk in chunks:
            handle.write(chunk)
    return {r.name: r for r in records}


def pack_weights(result: CompressionResult, path: str | Path, *, input_shape: tuple[int, int, int]) -> PackedReport:
    """Write the packed weights of a compressed model; the report compares them with ``result.cost``."""
    records = write_packed_weights(result, path)
    cost = result.cost(input_shape)
    path = Path(path)
    return PackedReport(
        path=path,
        file_bytes=path.stat().st_size,
        layers=records,
        measured_weight_mbit=8 * sum(r.nbytes for r in records.values()) / 1e6,
        cost_weight_mbit=sum(layer.params * layer.w_bits for layer in cost.layers if layer.kind in ("conv", "linear")) / 1e6,
        cost_memory_mbit=cost.total.memory_mb,
    )


def unpack_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a packed file by layer name, exactly as the compressed model holds them."""
    raw = Path(path).read_bytes()
    if len(raw) < _PREAMBLE.size:
        raise AutopruneError("packed weights", str(path), "is not a packed weights file (too short)")
    magic, version, header_length = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise AutopruneError("packed weights", str(path), f"is not a version-{VERSION} packed weights file")
    start = _PREAMBLE.size + header_length
    records = [PackedLayer.model_validate(r) for r in json.loads(raw[_PREAMBLE.size:start])["layers"]]
    return {r.name: _decode(r, raw[start + r.offset: start + r.offset + r.nbytes]) for r in records}


def _decode(record: PackedLayer, data: bytes) -> torch.Tensor:
    numel = int(np.prod(record.shape))
    nonzero = np.ones(numel, dtype=bool)
    if record.encoding == "bitmask":
        mask_bytes = (numel + 7) // 8
        nonzero = np.unpackbits(np.frombuffer(data[:mask_bytes], dtype=np.uint8))[:numel].astype(bool)
        data = data[mask_bytes:]
    count = int(nonzero.sum())
    if record.grid == "float":
        values = np.zeros(numel, dtype=np.float32)
        values[nonzero] = np.frombuffer(data, dtype="<f4", count=count)
        return torch.from_numpy(values).reshape(record.shape)
    grid = grid_named(record.grid)
    codes = torch.from_numpy(unpack_bits(data, record.bits, count).astype(np.int64))
    levels = torch.zeros(numel, dtype=torch.int64)
    levels[torch.from_numpy(nonzero)] = grid.from_codes(codes, record.bits)
    steps = torch.tensor(record.steps if record.per_channel else record.steps * record.shape[0], dtype=torch.float64)
    return rebuild(levels.reshape(record.shape), steps * grid.unit)
