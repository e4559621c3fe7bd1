"""Figures of a search: the Pareto front (PNG and self-contained HTML), per-layer settings of the
front's policies (like DJPQ Fig. 1-4) and the training-time S/N curves of the base model (seed 000 Fig. 2).

Plain data in, files out: nothing here knows about Optuna or MLflow. matplotlib and plotly are imported
inside the functions so that importing autoprune stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from autoprune.metrics import label
from autoprune.policy import FLOAT_BITS

# More rows make the per-layer chart unreadable; the rows are spread evenly along the front.
MAX_LAYER_ROWS = 6
# Bars for float (32-bit) tensors are cut here so that 2..8-bit layers stay readable.
BITS_AXIS_TOP = 16
# trials whose policy a strategy learned (DJPQ) are ringed, so that they stand out among sampled policies
LEARNED_MARKERS = {"djpq": "D", "two_stage": "s"}
# width of the front plot's legend column, right of its panels
LEGEND_INCHES = 2.0


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial as the plots see it; ``rank`` is None for infeasible trials."""

    number: int
    metrics: Mapping[str, float]
    rank: int | None
    prior: str | None = None
    label: str = ""
    strategy: str = "sampled"

    @property
    def values(self) -> dict[str, float]:
        """Metrics plus the trial number, so that a single objective can be drawn against it."""
        return {**self.metrics, "trial": float(self.number)}


def axis_pairs(objectives: Sequence[str]) -> list[tuple[str, str]]:
    """(x, y) panels: the first objective (usually accuracy) on y against each cost, then cost against cost."""
    if len(objectives) == 1:
        return [("trial", objectives[0])]
    return [(objectives[j], objectives[i]) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]


def _log_axis(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 20


def _groups(points: Sequence[TrialPoint]) -> tuple[list[TrialPoint], list[TrialPoint], list[TrialPoint]]:
    front = [p for p in points if p.rank == 0]
    dominated = [p for p in points if p.rank is not None and p.rank > 0]
    infeasible = [p for p in points if p.rank is None]
    return front, dominated, infeasible


def _axis_values(points: Sequence[TrialPoint], base: Mapping[str, float] | None, metric: str) -> list[float]:
    values = [p.values[metric] for p in points if metric in p.values]
    if base and metric in base:
        values.append(float(base[metric]))
    return values


def error_bars(points: Sequence[TrialPoint], metric: str) -> tuple[list[float], list[float]] | None:
    """(below, above) distances to the ends of each point's ``{metric}_ci_low/high`` interval; None unless
    every point carries one (an axis shows bars for all its points or for none)."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if not points or not all(low in p.metrics and high in p.metrics for p in points):
        return None
    return [max(0.0, p.values[metric] - p.metrics[low]) for p in points], [max(0.0, p.metrics[high] - p.values[metric]) for p in points]


def pareto_png(
    points: Sequence[TrialPoint], objectives: Sequence[str], path: Path, *, base: Mapping[str, float] | None = None, title: str = ""
) -> Path:
    import matplotlib.pyplot as plt

    fig = pareto_figure(points, objectives, base=base, title=title)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def pareto_figure(points: Sequence[TrialPoint], objectives: Sequence[str], *, base: Mapping[str, float] | None = None, title: str = "") -> Any:
    """The front against each pair of objectives (a matplotlib Figure; ``pareto_png`` saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = axis_pairs(objectives)
    front, dominated, infeasible = _groups(points)
    # the legend gets a column of its own right of the panels: inside, in the "utopia" corner, it sat on the
    # front's best trade-offs, which crowd towards that corner
    width = 6.4 * len(pairs) + LEGEND_INCHES
    fig, axes = plt.subplots(1, len(pairs), figsize=(width, 4.8), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs):
        def xy(group: Sequence[TrialPoint]) -> tuple[list[float], list[float]]:
            kept = [p for p in group if x in p.values and y in p.values]
            return [p.values[x] for p in kept], [p.values[y] for p in kept]

        priors = [p for p in points if p.prior and p.rank is not None]
        learned = [p for p in points if p.strategy in LEARNED_MARKERS and p.rank is not None]
        for group, style in (
            (infeasible, {"marker": "x", "color": "0.6", "label": "infeasible"}),
            (dominated, {"color": "tab:blue", "alpha": 0.35, "label": "dominated"}),
            (priors, {"facecolors": "none", "edgecolors": "tab:green", "s": 90, "label": "warm-start prior"}),
            *(
                ([p for p in learned if p.strategy == name], {"marker": marker, "facecolors": "none", "edgecolors": "tab:purple", "s": 110, "label": f"learned ({name})"})
                for name, marker in LEARNED_MARKERS.items()
            ),
        ):
            if group:
                ax.scatter(*xy(group), **style)
        ordered = sorted(front, key=lambda p: p.values.get(x, 0.0))
        fx, fy = xy(ordered)
        # The projected front is a staircase only in two dimensions; with more objectives, points only.
        ax.plot(fx, fy, "o-" if len(objectives) == 2 else "o", color="tab:red", label="Pareto front")
        kept = [p for p in ordered if x in p.values and y in p.values]
        xerr, yerr = error_bars(kept, x), error_bars(kept, y)
        if xerr or yerr:
            ax.errorbar(fx, fy, xerr=xerr, yerr=yerr, fmt="none", ecolor="tab:red", alpha=0.5, capsize=2, label="95% confidence interval")
        for p in ordered:
            if x in p.values and y in p.values:
                ax.annotate(str(p.number), (p.values[x], p.values[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if base and x in base and y in base:
            ax.scatter([base[x]], [base[y]], marker="*", s=220, color="black", label="base model")
        if _log_axis(_axis_values(points, base, x)):
            ax.set_xscale("log")
        if _log_axis(_axis_values(points, base, y)):
            ax.set_yscale("log")
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        ax.grid(True, which="both", alpha=0.3)
    # fixed margins: loc="best" and tight_layout measured every point and label again, a fifth of a second per drawing
    right = 1 - (LEGEND_INCHES + 0.1) / width
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.suptitle(title or f"Pareto front ({len(front)} of {len(points)} trials)")
    fig.subplots_adjust(left=0.65 / width, right=right, bottom=0.11, top=0.9, wspace=0.25)
    return fig


def ladder_png(
    predicted: Sequence[Mapping[str, Any]], proxy: Sequence[Mapping[str, float]], final: Sequence[Mapping[str, float]], path: Path, *,
    objectives: Sequence[str], cost: str, base: Mapping[str, float] | None = None, title: str = "",
) -> Path:
    """The fronts of the fidelity ladder on one plot: the proxy (rung 2, the search's fine-tune) and the final
    (rung 3) fronts as the first objective against ``cost``, and the predicted front (rung 0, the integer
    program) as its predicted loss increase against the same cost, on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((m for m in objectives if m != cost), objectives[0])
    fig, ax = plt.subplots(figsize=(7.4, 4.8))
    for rows, style in ((proxy, {"color": "tab:blue", "label": "proxy front (search's fine-tune)"}), (final, {"color": "tab:red", "label": "final front (final training)"})):
        kept = sorted((r[cost], r[metric]) for r in rows if cost in r and metric in r)
        if kept:
            ax.plot(*zip(*kept), "o-", **style)
    if base and cost in base and metric in base:
        ax.scatter([base[cost]], [base[metric]], marker="*", s=220, color="black", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel(label(cost))
    ax.set_ylabel(label(metric))
    ax.grid(True, which="both", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    points = sorted((float(p["cost"]), float(p["predicted_loss"])) for p in predicted)
    if points:
        twin = ax.twinx()
        line = twin.plot(*zip(*points), "s--", color="tab:green", alpha=0.7, label="predicted front (loss increase, right axis)")
        twin.set_ylabel("predicted loss increase")
        handles, names = handles + line, names + [line[0].get_label()]
    # lower right: high accuracy sits top, low cost left, so that corner holds no point of a front
    ax.legend(handles, names, loc="lower right", fontsize=8)
    fig.suptitle(title or "Fronts of the fidelity ladder")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _hover(point: TrialPoint, objectives: Sequence[str]) -> str:
    lines = [f"trial {point.number}" + (f" (prior {point.prior})" if point.prior else "") + (f" ({point.strategy})" if point.strategy in LEARNED_MARKERS else "")]
    lines += [f"{m}: {point.metrics[m]:.6g}" for m in objectives if m in point.metrics]
    lines += [f"{m}: {v:.6g}" for m, v in point.metrics.items() if m not in objectives]
    if point.label:
        lines.append(point.label)
    return "<br>".join(lines)


def pareto_html(
    points: Sequence[TrialPoint], objectives: Sequence[str], path: Path, *, base: Mapping[str, float] | None = None, title: str = ""
) -> Path:
    """Interactive front with plotly.js inlined: the file opens offline and inside MLflow's artifact viewer."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = axis_pairs(objectives)
    front, dominated, infeasible = _groups(points)
    fig = make_subplots(rows=1, cols=len(pairs))
    styles = [
        ("infeasible", infeasible, {"symbol": "x", "color": "#999999"}, "markers"),
        ("dominated", dominated, {"color": "rgba(31,119,180,0.4)"}, "markers"),
        ("Pareto front", front, {"color": "#d62728", "size": 9}, "markers+lines" if len(objectives) == 2 else "markers"),
    ]
    for col, (x, y) in enumerate(pairs, start=1):
        for name, group, marker, mode in styles:
            kept = sorted((p for p in group if x in p.values and y in p.values), key=lambda p: p.values[x])
            bars = {f"error_{axis}": {"type": "data", "symmetric": False, "arrayminus": err[0], "array": err[1], "thickness": 1}
                    for axis, err in (("x", error_bars(kept, x)), ("y", error_bars(kept, y))) if err and name == "Pareto front"}
            fig.add_trace(
                go.Scatter(
                    x=[p.values[x] for p in kept],
                    y=[p.values[y] for p in kept],
                    **bars,
                    mode=mode,
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker=marker,
                    hovertext=[_hover(p, objectives) for p in kept],
                    hoverinfo="text",
                ),
                row=1,
                col=col,
            )
        if base and x in base and y in base:
            fig.add_trace(
                go.Scatter(
                    x=[base[x]], y=[base[y]], mode="markers", name="base model", legendgroup="base", showlegend=col == 1,
                    marker={"symbol": "star", "size": 16, "color": "black"},
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=label(x), type="log" if _log_axis(_axis_values(points, base, x)) else "linear", row=1, col=col)
        fig.update_yaxes(title_text=label(y), type="log" if _log_axis(_axis_values(points, base, y)) else "linear", row=1, col=col)
    fig.update_layout(title=title or f"Pareto front ({len(front)} of {len(points)} trials)", height=520, width=max(700, 560 * len(pairs)))
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """At most ``count`` items, evenly spaced, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def layers_png(rows: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]], path: Path) -> Path:
    """Per-layer bit-widths (left) and pruning ratio / sparsities (right), one row per (title, layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = spread(rows, MAX_LAYER_ROWS) or [("no Pareto-optimal trial yet", {})]
    names = list(dict.fromkeys(n for _, layers in rows for n in layers))
    idx = np.arange(len(names))
    # One shared layer axis, labelled once under the last row, and fixed margins: tight_layout measured every
    # tick label of every row and took most of the second this chart cost at the end of each search.
    width, height = max(10.0, 1.0 * len(names) + 4), 2.2 * len(rows) + 1.6
    fig, axes = plt.subplots(len(rows), 2, figsize=(width, height), sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.45 / height, bottom=0.9 / height, hspace=0.35, wspace=0.12)
    for (title, layers), (bits_ax, prune_ax) in zip(rows, axes):
        for offset, key, color in ((-0.2, "w_bits", "tab:blue"), (0.2, "a_bits", "tab:orange")):
            # activation bits as applied (the layer reading the network input gets the input's bits)
            applied = (lambda d: d.get("a_bits_applied", d.get(key, FLOAT_BITS))) if key == "a_bits" else (lambda d: d.get(key, FLOAT_BITS))
            raw = [float(applied(layers.get(n, {}))) for n in names]
            bars = bits_ax.bar(idx + offset, [min(b, BITS_AXIS_TOP) for b in raw], width=0.4, color=color, label=key)
            for bar, bits in zip(bars, raw):
                if bits >= FLOAT_BITS:
                    bar.set_hatch("//")
        bits_ax.set_ylim(0, BITS_AXIS_TOP)
        bits_ax.set_yticks([2, 4, 8, 16])
        bits_ax.set_ylabel("bits", fontsize=8)
        bits_ax.set_title(f"{title}: bit-widths (hatched: float)", fontsize=9)
        for offset, key, color, transform in (
            (-0.27, "keep_ratio", "tab:red", lambda v: 1.0 - v),
            (0.0, "w_sparsity", "tab:purple", lambda v: v),
            (0.27, "f_sparsity", "tab:gray", lambda v: v),
        ):
            default = 1.0 if key == "keep_ratio" else 0.0
            label = "pruned channels" if key == "keep_ratio" else key
            prune_ax.bar(idx + offset, [transform(float(layers.get(n, {}).get(key, default))) for n in names], width=0.27, color=color, label=label)
        prune_ax.set_ylim(0, 1)
        prune_ax.set_title(f"{title}: pruning ratio and sparsity", fontsize=9)
        for ax in (bits_ax, prune_ax):
            ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xticks(idx)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    axes[0][0].legend(fontsize=7, loc="upper right")
    axes[0][1].legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def signals_png(signals: Mapping[str, Any], path: Path) -> Path:
    """S/N and ESN_a per layer during base-model training, next to validation accuracy (seed 000 Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(signals["epochs"])
    fig, (snr_ax, esn_ax, acc_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, curves in signals.get("layers", {}).items():
        if curves.get("snr"):
            snr_ax.plot(epochs, curves["snr"], label=name, linewidth=1)
        if curves.get("esn_a"):
            esn_ax.plot(epochs, curves["esn_a"], label=name, linewidth=1)
    total = signals.get("total", {})
    if total.get("snr"):
        snr_ax.plot(epochs, total["snr"], color="black", linewidth=2.5, label="total")
    if total.get("esn_a"):
        esn_ax.plot(epochs, total["esn_a"], color="black", linewidth=2.5, label="total")
    if signals.get("val_accuracy"):
        acc_ax.plot(epochs, signals["val_accuracy"], "o-", color="tab:green")
    for ax, title in ((snr_ax, "S/N per layer"), (esn_ax, "ESN_a (eq. 4)"), (acc_ax, "validation accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    for ax in (snr_ax, esn_ax):
        if ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
    snr_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
