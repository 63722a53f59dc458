"""Matplotlib figures for the HTML report, returned as base64 PNG data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

FIGURE_SIZE = (6.4, 3.4)
DPI = 110


def _to_data_uri(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def ritz_value_plot(
    values: Sequence[float],
    residuals: Sequence[float],
    more_values: Sequence[float],
    threshold: float | None,
    *,
    preconditioned: float | None = None,
    title: str = "Largest Ritz values",
) -> str:
    """Plot the top Ritz values with residual error bars against the stability threshold.

    ``more_values`` are further Ritz values, descending, drawn without error bars as context.
    """
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    context_positions = list(range(1, len(more_values) + 1))
    if more_values:
        axes.scatter(context_positions, more_values, color="#9bb3c9", zorder=1, label="further Ritz values")
    positions = list(range(1, len(values) + 1))
    axes.errorbar(positions, values, yerr=residuals, fmt="o", color="#1f4e79", capsize=3, label="Ritz value ± residual")
    if threshold is not None and preconditioned is None:
        axes.axhline(threshold, color="#b22222", linestyle="--", label=f"threshold {threshold:.4g}")
    if preconditioned is not None:
        axes.scatter([1], [preconditioned], marker="D", color="#d2691e", zorder=3, label=f"preconditioned λmax {preconditioned:.4g}")
        if threshold is not None:
            axes.axhline(threshold, color="#b22222", linestyle="--", label=f"Adam threshold {threshold:.4g}")
    axes.set_xlabel("rank")
    axes.set_ylabel("eigenvalue")
    axes.set_title(title)
    axes.set_xticks(context_positions or positions)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _to_data_uri(figure)


def trajectory_plot(
    steps: Sequence[float],
    values: Sequence[float | None],
    thresholds: Sequence[float | None],
    *,
    ylabel: str,
    title: str,
    xlabel: str = "training step",
    log_y: bool = False,
) -> str:
    """Plot a metric over checkpoints with its threshold line (the edge-of-stability picture)."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    points = [(s, v) for s, v in zip(steps, values) if v is not None]
    if points:
        axes.plot(*zip(*points), "o-", color="#1f4e79", label=ylabel)
    limits = [(s, t) for s, t in zip(steps, thresholds) if t is not None]
    if limits:
        axes.plot(*zip(*limits), "--", color="#b22222", label="threshold")
    if log_y and points and all(v > 0 for _, v in points):
        axes.set_yscale("log")
        # The default log labels read "1.55 x 10^0" over a narrow range; plain numbers read better.
        # Minor ticks get labels only when the values span less than a decade, or they crowd.
        plain = FuncFormatter(lambda value, _: f"{value:.3g}")
        axes.yaxis.set_major_formatter(plain)
        low, high = min(v for _, v in points), max(v for _, v in points)
        axes.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if points or limits:
        axes.legend(fontsize=8)
    return _to_data_uri(figure)


def density_plot(
    grid: Sequence[float],
    density: Sequence[float],
    *,
    lambda_max: float | None,
    threshold: float | None,
    title: str,
) -> str:
    """Plot a spectral density on a log axis, marking the top eigenvalue and the 2/lr line."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    values = [max(float(d), 1e-12) for d in density]
    axes.semilogy(grid, values, color="#1f4e79", label="density (Gaussian-broadened SLQ)")
    if lambda_max is not None:
        axes.axvline(lambda_max, color="#d2691e", linestyle=":", label=f"λmax {lambda_max:.4g}")
    if threshold is not None:
        axes.axvline(threshold, color="#b22222", linestyle="--", label=f"2/lr {threshold:.4g}")
    axes.set_ylim(bottom=max(min(values), 1e-8))
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _to_data_uri(figure)


def per_layer_plot(blocks: Sequence[str], values: Sequence[float | None], *, ylabel: str, title: str) -> str:
    """Bar chart of one curvature value per parameter block; missing values are left blank."""
    figure, axes = plt.subplots(figsize=(FIGURE_SIZE[0], 0.9 + 0.35 * max(len(blocks), 1)))
    positions = list(range(len(blocks)))
    axes.barh(positions, [0.0 if v is None else v for v in values], color="#1f4e79")
    axes.set_yticks(positions)
    axes.set_yticklabels(blocks, fontsize=8)
    axes.invert_yaxis()
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes.set_xlabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="x")
    return _to_data_uri(figure)


def interpolation_plot(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float | None]]], *, ylabel: str, title: str
) -> str:
    """Plot values along the interpolation from checkpoint A (a = 0) to B (a = 1).

    Each curve is (label, alphas, values). A dashed line joins each curve's two endpoints: the
    linear reference that a barrier is measured against.
    """
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    colors = ("#1f4e79", "#c05a00", "#2e7d32")
    for (label, alphas, values), color in zip(curves, colors):
        points = [(a, v) for a, v in zip(alphas, values) if v is not None]
        if not points:
            continue
        axes.plot(*zip(*points), "o-", markersize=3, color=color, label=label)
        (first_a, first_v), (last_a, last_v) = points[0], points[-1]
        axes.plot([first_a, last_a], [first_v, last_v], "--", color=color, alpha=0.6, label=f"{label}: straight line between the ends")
    axes.set_xlabel("interpolation weight a (0 = checkpoint A, 1 = checkpoint B)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _to_data_uri(figure)


def histogram_plot(
    edges: Sequence[float], counts: Sequence[int], *, markers: dict[str, float], xlabel: str, title: str
) -> str:
    """Bar chart of a histogram, with a dashed vertical line for each named marker inside the range."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    widths = [right - left for left, right in zip(edges[:-1], edges[1:])]
    axes.bar(edges[:-1], counts, width=widths, align="edge", color="#1f4e79", edgecolor="white")
    low, high = edges[0], edges[-1]
    span = max(high - low, 1e-12)
    for (label, value), color in zip(markers.items(), ("#b22222", "#c05a00", "#2e7d32", "#6a1b9a")):
        if low - 0.05 * span <= value <= high + 0.05 * span:
            axes.axvline(value, linestyle="--", color=color, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("samples")
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="y")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _to_data_uri(figure)
