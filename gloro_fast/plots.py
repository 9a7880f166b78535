"""PNG plots of a run with matplotlib (no display needed), written atomically.

- ``training_curves``: loss; clean accuracy and VRA (test and training); the Lipschitz
  constant K; the learning rate, train ε and TRADES λ — one panel each, against the epoch.
- ``robustness_curve``: certified accuracy against the radius r, the fraction of test points
  predicted correctly with a certified radius above r (the standard robustness curve),
  with the certified ε marked.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence

import torch

from .files import atomic_write_bytes

__all__ = ["training_curves", "robustness_curve", "certified_accuracy"]


def _figure(rows: int, cols: int, size):
    # A bare Figure with its own Agg canvas: no pyplot global state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _series(history: List[Dict[str, Any]], key: str):
    points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(history: List[Dict[str, Any]], epsilon: float, path) -> None:
    """Four panels from the per-epoch rows of ``metrics.json``."""
    fig, ax = _figure(2, 2, (10, 7))
    ax[0, 0].plot(*_series(history, "loss"), color="C0")
    ax[0, 0].set(title="training loss", xlabel="epoch")
    for key, label, style in (("clean_accuracy", "clean (test)", "C0-"), ("vra", f"VRA ε={epsilon:g} (test)", "C1-"),
                              ("vra_estimate", f"VRA ε={epsilon:g}, estimate (test)", "C2--"),
                              ("train_accuracy", "clean (train)", "C0:"), ("train_vra", "VRA train ε (train)", "C1:")):
        xs, ys = _series(history, key)
        if xs:
            ax[0, 1].plot(xs, [100 * y for y in ys], style, label=label)
    ax[0, 1].set(title="accuracy", xlabel="epoch", ylabel="%")
    ax[0, 1].legend(fontsize=8)
    xs, ys = _series(history, "lipschitz")
    if xs:
        ax[1, 0].plot(xs, ys, color="C2")
    ax[1, 0].set(title="Lipschitz constant K (body)", xlabel="epoch")
    right = ax[1, 1].twinx()
    ax[1, 1].plot(*_series(history, "lr"), color="C3", label="learning rate")
    ax[1, 1].set(title="schedules", xlabel="epoch", ylabel="learning rate")
    if any(row.get("lr", 0) > 0 for row in history):
        ax[1, 1].set_yscale("log")
    right.plot(*_series(history, "epsilon"), color="C4", label="train ε")
    right.plot(*_series(history, "lam"), color="C5", label="TRADES λ")
    right.set_ylabel("ε, λ")
    handles = ax[1, 1].get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax[1, 1].legend(handles=handles, fontsize=8, loc="best")
    _save(fig, path)


def certified_accuracy(radii: torch.Tensor, correct: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Fraction of points that are correct with certified radius > r, for each r in ``grid``
    (a point is certified at ε exactly when its radius exceeds ε)."""
    ok = correct.bool().reshape(1, -1) & (radii.double().reshape(1, -1) > grid.double().reshape(-1, 1))
    return ok.double().mean(dim=1)


def robustness_curve(radii: Dict[str, torch.Tensor], correct: torch.Tensor, epsilons: Sequence[float],
                     path, points: int = 200) -> Dict[str, List[float]]:
    """Plot certified accuracy against radius, one line per entry of ``radii`` (e.g. the sound
    and the estimated certificate), from 0 to 2 × the largest ε (at least the 95th
    percentile radius), marking each ε; returns the curves as lists."""
    everything = torch.cat([r[torch.isfinite(r)].double() for r in radii.values()])
    top = max([2 * max(epsilons)] + ([float(torch.quantile(everything, 0.95))] if everything.numel() else []))
    top = top if top > 0 else 1.0
    grid = torch.linspace(0, top, points, dtype=torch.float64)
    fig, ax = _figure(1, 1, (6, 4.2))
    axis = ax[0, 0]
    curves: Dict[str, List[float]] = {"radius": grid.tolist()}
    for k, (label, r) in enumerate(radii.items()):
        acc = certified_accuracy(r, correct, grid)
        curves[f"certified_accuracy_{label}"] = acc.tolist()
        axis.plot(grid.tolist(), (100 * acc).tolist(), color=f"C{k}", label=label)
        for eps in epsilons:
            value = float(certified_accuracy(r, correct, torch.tensor([eps]))[0])
            axis.annotate(f"{100 * value:.1f}%", (eps, 100 * value), textcoords="offset points",
                          xytext=(5, 5 - 12 * k), fontsize=8, color=f"C{k}")
    for eps in epsilons:
        axis.axvline(eps, color="grey", linestyle="--", linewidth=1)
    axis.set(title="certified accuracy against radius", xlabel="l2 radius r",
             ylabel="certified accuracy (%)", ylim=(0, 100), xlim=(0, top))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(fig, path)
    return curves
