"""A cost report as a rich table: one row per layer, then the total."""

from __future__ import annotations

from rich.table import Table

from autoprune.cost.measure import CostReport, LayerCost
from autoprune.bits import FLOAT_BITS

_PREFIXES = ("K", "M", "G", "T", "P", "E", "Z", "Y")


def format_count(value: float) -> str:
    """1234567 -> '1.23 M'; small integers stay exact; beyond yotta (32-bit ESN_a), scientific notation."""
    if abs(value) < 999.5:
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
    for exponent, prefix in enumerate(_PREFIXES, start=1):
        scaled = value / 1000**exponent
        if abs(scaled) < 999.995:
            return f"{scaled:.2f} {prefix}"
    return f"{value:.2e}"


def _bits(bits: int) -> str:
    return "f" if bits == FLOAT_BITS else str(bits)


def _shape(layer: LayerCost) -> str:
    if layer.kind == "product":
        return f"a@b k{layer.in_channels}"
    if layer.kind == "op":
        return "float op"
    if layer.kind == "embedding":
        return f"{layer.in_channels}x{layer.out_channels} lookup"
    text = f"{layer.in_channels}→{layer.out_channels}"
    if layer.kind == "conv":
        text += " k" + "x".join(map(str, layer.kernel))
        if layer.groups > 1:
            text += f" g{layer.groups}"
    return text


def format_cost_table(report: CostReport, *, title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("out", justify="right")
    table.add_column("W/A bits", justify="right")
    table.add_column("sparsity w/f", justify="right")
    for name in ("params", "MACs", "BOPs", "ESN_a", "ESN_d", "ESN'_d", "memory (Mb)"):
        table.add_column(name, justify="right")
    for layer in report.layers:
        table.add_row(
            layer.name, _shape(layer), "x".join(map(str, layer.out_hw)),
            f"{_bits(layer.w_bits)}/{_bits(layer.a_bits)}",
            f"{layer.w_sparsity:.0%}/{layer.f_sparsity:.0%}",
            format_count(layer.params), format_count(layer.macs), format_count(layer.bops),
            format_count(layer.esn_a), format_count(layer.esn_d), format_count(layer.esn_d_prime),
            f"{layer.memory_mb:.3g}",
        )
    total = report.total
    by_op: dict[str, list[int]] = {}
    for entry in report.elements:
        count = by_op.setdefault(entry.op, [0, 0])
        count[0] += 1
        count[1] += entry.elements
    if by_op:
        # no MACs: normalizations, nonlinearities and parameters only added or concatenated, summed per kind
        table.add_section()
        for op, (sites, elements) in by_op.items():
            table.add_row(f"{op} ×{sites}", "elements", format_count(elements), style="dim")
    for entry in report.uncounted:
        table.add_row(entry.name, f"uncounted: {entry.what} ({entry.why})", style="red")
    table.add_section()
    table.add_row(
        "total", "", "", "", f"{1 - total.params / total.dense_params:.0%}" if total.dense_params else "",
        format_count(total.params), format_count(total.macs), format_count(total.bops),
        format_count(total.esn_a), format_count(total.esn_d), format_count(total.esn_d_prime),
        f"{total.memory_mb:.3g}", style="bold",
    )
    return table
